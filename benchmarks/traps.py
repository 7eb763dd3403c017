"""Benchmark: models built to fool a naive accuracy check, and whether compactor's verdict
matches the truth on each.

Every row runs ``compactor optimize`` (in-process, the same pipeline as the CLI) on a toy
that hides damage from a per-sample cosine of output 0, then measures the truth on inputs
that neither calibration nor eval saw, with code independent of ``compactor.metrics``:

- ``vad`` (tests/toys/probability.py): one output ``p [B, 1]``, a speech probability.
  Truth: decisions ``p > 0.5`` equal to fp32's on >= 95% of samples.
- ``detector`` (tests/toys/detector.py): ``output0 [B, 4+18, 64]``, xywh pixels beside
  class scores. Truth: anchor-level F1 (same class, score >= 0.25, IoU >= 0.5) vs fp32
  >= 0.9.
- ``three_heads`` (tests/toys/multihead.py, torch): ``logits``, ``box`` (pixels),
  ``landmarks``. Truth: every head's MSE to the teacher below the teacher's variance
  (better than a constant).

Treatments: the ONNX toys are quantized *naively* (``keep_float: never``, no repairs,
``mixed_scale: off``: int8 forced through, the trap sprung), as compactor runs by default
(which may keep the float model when int8 does not pay), and with int8 forced but
compactor's protections on (repairs, ``mixed_scale: auto``). The torch three-head toy is
pruned (to 40% or 10% of its MACs) and distilled, once training every output (the default)
and once the first output alone (``outputs: {box: {weight: 0}, landmarks: {weight: 0}}``,
what distillation did before), then exported; the last row repeats the 10% first-output-
only run with 2048 eval samples instead of 192. Each recipe sets ``metric: fidelity`` (now
every output, per unit group) and the row's ``max_accuracy_drop``; the VAD also runs with
the task metric ``agreement``. compactor's verdict is *broken* when the run fails a budget
or a check (exit 1), *inconclusive* when a check's interval straddles its limit, else
*ok*; the row holds when it is the truth's, or inconclusive (never green) where the truth
is broken.

Usage: python benchmarks/traps.py [--results-dir DIR] [--quick] [--only MODEL] [--epochs N]
``--quick``: a smoke run (2 distillation epochs); ``--only``: the rows whose model name
contains MODEL; with any of these, results go to results/traps-quick.json only, not
RESULTS.md. Nothing here is a timing: no idle-host wait is needed.
Exit code: 0 when every row's verdict matches the truth, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NAME = "traps"
HERE = Path(__file__).resolve().parent
FRESH_SEED = 99  # truth inputs: neither calibration (seed 2) nor eval (seed 1) saw them
VAD_AGREEMENT = 0.95
DETECTION_F1 = 0.9


@dataclass
class Row:
    model: str
    treatment: str
    metric: str
    budget: str
    compactor: str = "?"  # ok | broken | inconclusive
    figure: str = ""  # compactor's metric value, per output
    check: str = ""  # each output's MSE / the constant predictor's, on the eval data
    failed: list[str] = field(default_factory=list)
    outcome: str = ""  # quantize's outcome (int8 | float kept), or the passes run
    truth: str = "?"
    truth_figure: str = ""
    seconds: float = 0.0
    error: str | None = None

    @property
    def holds(self) -> bool:
        """Compactor's verdict is the truth's; or it is inconclusive (never green: exit 5
        under the default --inconclusive policy) on a model the truth finds broken."""
        if self.error is not None:
            return False
        return self.compactor == self.truth or (
            self.compactor == "inconclusive" and self.truth == "broken")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "holds": self.holds}


# --------------------------------------------------------------------------- running


def _write(folder: Path, **recipe: Any) -> Path:
    from toys.recipes import write_recipe

    return write_recipe(folder, **recipe)


def _optimize(recipe: Path, row: Row) -> Path:
    """Run the recipe; fill compactor's verdict; return the shipped model."""
    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    t0 = time.perf_counter()
    result = optimize(load_recipe(recipe))
    row.seconds = round(time.perf_counter() - t0, 1)
    m = result.manifest
    final = m["stages"][-1]
    statuses = {v["status"] for t in m["targets"] for v in t["verdicts"]}
    row.compactor = ("broken" if "fail" in statuses or not m["passed"] else
                     "inconclusive" if "inconclusive" in statuses else "ok")
    row.failed = [f"{v['budget']} ({v['status']})" for t in m["targets"]
                  for v in t["verdicts"] if v["status"] in ("fail", "inconclusive")]
    per = final.get("outputs", {})
    row.figure = f"{final['metric']:.4f}" + (" (" + ", ".join(
        f"{k} {o['value']:.3f}" + (" BROKEN" if o.get("broken") else "")
        for k, o in per.items() if o.get("value") is not None) + ")" if len(per) > 1 else "")
    row.check = ", ".join(f"{k} {o['mse'] / o['constant_mse']:.2f}" for k, o in per.items()
                          if o.get("mse") is not None and o.get("constant_mse"))
    rec = final.get("record", {})
    row.outcome = rec.get("outcome") or " → ".join(s["name"] for s in m["stages"][1:])
    return recipe.parent / "out" / "model.onnx"


def _run(sess_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(sess_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# --------------------------------------------------------------------------- truths


def vad_truth(fp32: Path, shipped: Path) -> tuple[float, bool]:
    from toys.probability import probability_data

    x = probability_data(512, FRESH_SEED)
    (want,), (got,) = _run(fp32, x), _run(shipped, x)
    agree = float(((want > 0.5) == (got > 0.5)).mean())
    return agree, agree >= VAD_AGREEMENT


def anchor_f1(want: np.ndarray, got: np.ndarray, score: float = 0.25, iou: float = 0.5
              ) -> float:
    """Per anchor of ``[B, 4+C, N]`` (xywh): positive when its best class score is >= score;
    a true positive when positive in both, same class, boxes at IoU >= iou."""
    def decode(a):
        cls, conf = a[:, 4:].argmax(axis=1), a[:, 4:].max(axis=1)
        xy, wh = a[:, :2], np.abs(a[:, 2:4]) / 2
        return cls, conf >= score, np.concatenate([xy - wh, xy + wh], axis=1)

    (wc, wp, wb), (gc, gp, gb) = decode(want), decode(got)
    lt, rb = np.maximum(wb[:, :2], gb[:, :2]), np.minimum(wb[:, 2:], gb[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda b: np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)  # noqa: E731
    union = area(wb) + area(gb) - inter
    overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
    tp = int((wp & gp & (wc == gc) & (overlap >= iou)).sum())
    n = int(wp.sum() + gp.sum())
    return 1.0 if n == 0 else 2 * tp / n


def detector_truth(fp32: Path, shipped: Path) -> tuple[float, bool]:
    from toys.detector import detector_images

    x = detector_images(64, FRESH_SEED)
    (want,), (got,) = _run(fp32, x), _run(shipped, x)
    f1 = anchor_f1(want, got)
    return f1, f1 >= DETECTION_F1


def ratio_truth(got: np.ndarray, want: np.ndarray, seed: int = 1) -> tuple[float, str]:
    """A head's MSE to the reference over the reference's variance, on fresh samples, and
    what it says: broken (worse than a constant beyond the ~95% bootstrap interval), ok
    (better), inconclusive (the interval straddles 1)."""
    err = ((got - want) ** 2).reshape(len(want), -1).mean(axis=1)
    dev = ((want - want.mean(axis=0)) ** 2).reshape(len(want), -1).mean(axis=1)
    idx = np.random.default_rng(seed).integers(0, len(want), size=(2000, len(want)))
    boot = err[idx].mean(axis=1) / dev[idx].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    ratio = float(err.mean() / dev.mean())
    return ratio, "broken" if low > 1 else "ok" if high <= 1 else "inconclusive"


def _worst(verdicts: list[str]) -> str:
    return next((v for v in ("broken", "inconclusive") if v in verdicts), "ok")


def heads_truth(shipped: Path) -> tuple[dict[str, float], str]:
    import torch
    from toys.multihead import OUTPUTS, build_teacher

    x = np.random.default_rng(FRESH_SEED).normal(size=(2048, 16)).astype(np.float32)
    with torch.inference_mode():
        teacher = [t.numpy() for t in build_teacher()(torch.from_numpy(x))]
    got = _run(shipped, {"x": x})
    each = {name: ratio_truth(g, t) for name, g, t in zip(OUTPUTS, got, teacher, strict=True)}
    return ({k: r for k, (r, _) in each.items()},
            _worst([v for _, v in each.values()]))


# --------------------------------------------------------------------------- rows


NAIVE = {"mode": "static", "keep_float": "never", "op_types": "all", "repairs": [],
         "mixed_scale": "off"}
FORCED = {"mode": "static", "keep_float": "never", "op_types": "all"}  # protections on
DEFAULT = {"mode": "static"}


def _onnx_row(folder: Path, row: Row, model: Path, data, quantize: dict, metric: Any,
              drop: float, truth) -> None:
    np.savez(folder / "eval.npz", **data(64, seed=1))
    np.savez(folder / "calib.npz", **data(64, seed=2))
    recipe = _write(folder, model={"onnx": str(model)},
                    data={"eval": "eval.npz", "calibration": "calib.npz", "batch_size": 16},
                    metric=metric, passes=[{"quantize": quantize}],
                    budgets={"max_accuracy_drop": drop})
    shipped = _optimize(recipe, row)
    value, verdict = truth(model, shipped)
    if isinstance(verdict, bool):
        verdict = "ok" if verdict else "broken"
    row.truth, row.truth_figure = verdict, f"{value:.3f}"


def vad_rows(work: Path) -> list[tuple[Row, Any]]:
    from toys.probability import probability_data, probability_onnx

    out = []
    for name, q, metric, drop in [
        ("int8, naive", NAIVE, "fidelity", 0.05),
        ("int8, compactor default", DEFAULT, "fidelity", 0.05),
        ("int8 forced, compactor's repairs", FORCED, "fidelity", 0.05),
        ("int8, naive", NAIVE, {"outputs": {"p": {"name": "agreement", "threshold": 0.5}}},
         1 - VAD_AGREEMENT),
    ]:
        label = metric if isinstance(metric, str) else "agreement(p > 0.5)"
        row = Row("vad [B,1]", name, label, f"max drop {drop:g}")

        def go(folder, row=row, q=q, metric=metric, drop=drop):
            model = probability_onnx(folder / "vad.onnx")
            _onnx_row(folder, row, model, probability_data, q, metric, drop, vad_truth)
        out.append((row, go))
    return out


def detector_rows(work: Path) -> list[tuple[Row, Any]]:
    from toys.detector import detector_images, detector_onnx

    out = []
    for name, q in [("int8, naive (one range)", NAIVE),
                    ("int8, compactor default", DEFAULT),
                    ("int8 forced, mixed_scale auto", FORCED)]:
        row = Row("detector [B,22,64]", name, "fidelity", "max drop 0.01")

        def go(folder, row=row, q=q):
            model = detector_onnx(folder / "det.onnx")
            _onnx_row(folder, row, model, detector_images, q, "fidelity", 0.01,
                      detector_truth)
        out.append((row, go))
    return out


def onnx_heads_truth(fp32: Path, shipped: Path) -> tuple[float, str]:
    from toys.heads import heads_data

    x = heads_data(2048, FRESH_SEED)
    each = [ratio_truth(g, w) for g, w in zip(_run(shipped, x), _run(fp32, x), strict=True)]
    return max(r for r, _ in each), _worst([v for _, v in each])


def onnx_heads_rows() -> list[tuple[Row, Any]]:
    from toys.heads import heads_data, three_heads_onnx

    out = []
    for name, q in [("int8, naive", NAIVE), ("int8 forced, compactor's repairs", FORCED)]:
        row = Row("three_heads (onnx)", name, "fidelity", "max drop 0.05")

        def go(folder, row=row, q=q):
            model = three_heads_onnx(folder / "heads.onnx")
            _onnx_row(folder, row, model, heads_data, q, "fidelity", 0.05, onnx_heads_truth)
            row.truth_figure = "worst head MSE/var " + row.truth_figure
        out.append((row, go))
    return out


ONE_HEAD = {"box": {"weight": 0}, "landmarks": {"weight": 0}}


def heads_rows(epochs: int) -> list[tuple[Row, Any]]:
    from toys.multihead import INPUT, OUTPUTS, ref_multihead

    out = []
    for name, macs, outputs, n_eval in [
        ("prune 40% + distill every output", 0.4, {}, None),
        ("prune 40% + distill output 0 only", 0.4, ONE_HEAD, None),
        ("prune 10% + distill every output", 0.10, {}, None),
        ("prune 10% + distill output 0 only", 0.10, ONE_HEAD, None),
        ("prune 10% + distill output 0 only, eval 2048", 0.10, ONE_HEAD, 2048),
    ]:
        row = Row("three_heads (torch)", name, "fidelity", "max drop 0.5")

        def go(folder, row=row, outputs=outputs, macs=macs, n_eval=n_eval):
            distill = {"epochs": epochs, **({"outputs": outputs} if outputs else {})}
            eval_ref = ref_multihead("eval_batches")
            if n_eval:  # more eval samples: a narrower interval for the check
                x = np.random.default_rng(300).normal(size=(n_eval, 16)).astype(np.float32)
                np.savez(folder / "eval.npz", x=x)
                eval_ref = "eval.npz"
            recipe = _write(
                folder,
                model={"factory": ref_multihead("build_teacher"), "inputs": [INPUT],
                       "outputs": list(OUTPUTS)},
                data={"train": ref_multihead("train_batches"), "eval": eval_ref,
                      "batch_size": 64},
                metric="fidelity",
                passes=[{"prune": {"target": {"macs": macs}}}, {"distill": distill},
                        {"export": {}}],
                budgets={"max_accuracy_drop": 0.5})
            shipped = _optimize(recipe, row)
            ratios, row.truth = heads_truth(shipped)
            row.truth_figure = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
        out.append((row, go))
    return out


# --------------------------------------------------------------------------- report


def render(rows: list[Row], host: dict[str, Any]) -> str:
    lines = [
        "## traps", "",
        f"Host: {host['cpu']} ({host['cores']} cores, int8 ISA path **{host['isa']}**); "
        "nothing here is a timing. compactor's verdict: *broken* when the run failed a "
        "budget or a check (exit 1), *inconclusive* when a check's interval straddles its "
        "limit. Truth on fresh inputs: VAD decision agreement with "
        f"fp32 (ok >= {VAD_AGREEMENT}); detector anchor F1 vs fp32 (ok >= {DETECTION_F1}); "
        "three heads: each head's MSE / the reference's variance on 2048 fresh samples, "
        "with a ~95% bootstrap interval (broken: above 1, worse than a constant; ok: below "
        "1; inconclusive: straddling 1; the row's truth is its worst head).", "",
        "| model | treatment | metric (budget) | compactor: value | MSE / constant's (eval) | "
        "failed | compactor | truth: figure | truth | match |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = ", ".join(r.failed) or "—"
        lines.append(
            f"| {r.model} | {r.treatment} ({r.outcome}) | {r.metric} ({r.budget}) | "
            f"{r.figure} | {r.check or '—'} | {failed} | {r.compactor} | {r.truth_figure} | "
            f"{r.truth} | "
            + (("✅" if r.compactor == r.truth else "✅ not green") if r.holds
               else f"❌ {r.error or ''}") + " |")
    held = sum(r.holds for r in rows)
    lines += ["", f"{held}/{len(rows)} rows hold: compactor's verdict is the truth's, or "
              "(*not green*) inconclusive on a model the truth finds broken (exit 5 under "
              "the default `--inconclusive fail`: never green on a broken model).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--quick", action="store_true", help="smoke run; JSON only")
    ap.add_argument("--only", default="", help="rows whose model contains this (JSON only)")
    ap.add_argument("--epochs", type=int, default=None, help="distillation epochs")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    from _results import machine, write_json, write_section

    from compactor.quantization.isa import detect

    host = {**machine(), "isa": detect().path}
    epochs = args.epochs or (2 if args.quick else 30)
    work = Path(tempfile.mkdtemp(prefix="compactor-traps-"))
    jobs = [j for j in vad_rows(work) + detector_rows(work) + onnx_heads_rows()
            + heads_rows(epochs) if args.only in j[0].model]
    rows = []
    for i, (row, go) in enumerate(jobs):
        folder = work / f"row{i}"
        folder.mkdir()
        try:
            go(folder)
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(f"{row.model:22} {row.treatment:36} compactor {row.compactor:6} "
              f"truth {row.truth:6} {'ok' if row.holds else 'MISMATCH'} {row.error or ''}",
              flush=True)
    data = {"host": host, "quick": args.quick, "epochs": epochs,
            "rows": [r.to_dict() for r in rows]}
    if args.quick or args.only or args.epochs:
        write_json(f"{NAME}-quick", data, args.results_dir)
    else:
        write_json(NAME, data, args.results_dir)
        write_section(NAME, render(rows, host), args.results_dir)
    print(render(rows, host))
    return 0 if all(r.holds for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
