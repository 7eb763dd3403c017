"""Benchmark: static int8 of the demo CNN, fast and within 0.3 accuracy points.

The bundled demo model (a 5-block CNN trained on scikit-learn's handwritten digits, cached
after the first run) goes through ``export`` and ``quantize: {mode: static}`` with an
accuracy budget of 0.3 points (``max_accuracy_drop: 0.003``), measured on a 2-thread,
batch-1 profile. The quantize pass times its candidate configurations (QDQ / QOperator,
U8S8 / S8S8, all ops / compute ops) against the float model on that profile and keeps the
fastest within budget; the speed-up reported is the pipeline's own measurement of the
``export`` (fp32) and ``quantize`` (int8) stages, taken in the same run.

Usage: python benchmarks/quant_cnn.py [--results-dir DIR]
Exit code: 0 when every target holds, 1 when one fails (results are written either way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

NAME = "quant_cnn"
THREADS = 2
TARGETS = {"speedup": 1.8, "max_drop_points": 0.3}
HERE = Path(__file__).resolve().parent
IDLE_WAIT_S = 600  # timings wait (up to this long) for other processes to quiet down

PROFILE = f"""\
name: bench-2t
class: host
description: this host, {THREADS} threads, batch 1
execution_providers: [CPUExecutionProvider]
intra_op_threads: {THREADS}
inter_op_threads: 1
batch_sizes: [1]
graph_optimization_level: all
"""

RECIPE = """\
version: 1
name: digits-int8
model:
  factory: compactor.examples.digits:build_pretrained
  inputs:
    - {name: image, shape: [batch, 1, 16, 16], dtype: float32}
  outputs: [logits]
data:
  calibration: compactor.examples.digits:calibration_batches
  eval: compactor.examples.digits:eval_batches
metric: accuracy
passes:
  - export: {opset: 18}
  - quantize: {mode: static}
targets:
  - profile: bench-2t.yaml
    budgets: {max_accuracy_drop: 0.003}
output: out
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _results import PrintProgress, machine, wait_for_idle, write_json, write_section

    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quant-cnn-") as tmp:
        work = Path(tmp)
        (work / "bench-2t.yaml").write_text(PROFILE, encoding="utf-8")
        (work / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
        idle = {"before_optimize": wait_for_idle(0.8, IDLE_WAIT_S)}
        result = optimize(load_recipe(work / "recipe.yaml"), progress=PrintProgress())
        m = result.manifest
    stages = {s["name"]: s for s in m["stages"]}
    fp32, int8 = stages["export"], stages["quantize"]
    p50 = {k: s["latency_ms"]["bench-2t"]["1"]["p50"] for k, s in stages.items()}
    speedup = p50["export"] / p50["quantize"]
    drop_points = (fp32["metric"] - int8["metric"]) * 100
    rec = int8["record"]
    passed = {"speedup": speedup >= TARGETS["speedup"],
              "accuracy": drop_points <= TARGETS["max_drop_points"]}
    summary = {
        "name": NAME,
        "targets": TARGETS,
        "passed": passed,
        "speedup_b1": round(speedup, 3),
        "p50_ms": {k: round(v, 4) for k, v in p50.items()},
        "accuracy": {k: s["metric"] for k, s in stages.items()},
        "drop_points": round(drop_points, 3),
        "eval_samples": m["metric"]["eval_samples"],
        "size_mb": {k: round(s["size_bytes"] / 1e6, 3) for k, s in stages.items()},
        "chosen": rec["search"]["chosen"],
        "search_speedup_vs_input": rec["search"].get("speedup_vs_input"),
        "candidates": rec["search"]["candidates"],
        "repairs": rec["search"]["repairs"],
        "isa": rec["isa"]["int8_path"],
        "int8_choice": rec["int8_choice"],
        "float_nodes": rec["float_nodes"],
        "quantize_pass_seconds": int8.get("pass_seconds"),
        "compactor_run_passed": result.passed,
        "machine": machine(),
        "cpu_idle": idle,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(NAME, summary, args.results_dir)
    write_section(NAME, _markdown(summary), args.results_dir)
    print(_markdown(summary))
    return 0 if all(passed.values()) else 1


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"


def _markdown(s: dict) -> str:
    def mark(ok: bool) -> str:
        return "✅" if ok else "❌"

    def fmt(c: dict) -> str:
        acc = ""
        if "search" in c:
            acc = f"drop {c['search']['drop'] * 100:.2f} pt"
        return (f"| {c['label']} | {c.get('p50_ms', float('nan')):.3f} | "
                f"{c.get('speedup_vs_float', float('nan')):.2f}× | {acc} | "
                f"{c.get('note', '')} |")

    cands = "\n".join(fmt(c) for c in s["candidates"])
    t, p50, acc = s["targets"], s["p50_ms"], s["accuracy"]
    rows = "\n".join([
        f"| int8 speed-up over fp32, p50 at batch 1 | ≥ {t['speedup']}× | "
        f"{s['speedup_b1']:.2f}× ({p50['export']:.3f} → {p50['quantize']:.3f} ms) | "
        f"{mark(s['passed']['speedup'])} |",
        f"| accuracy drop, fp32 → int8 | ≤ {t['max_drop_points']} pt | "
        f"{s['drop_points']:.2f} pt ({acc['export'] * 100:.2f}% → "
        f"{acc['quantize'] * 100:.2f}%) | {mark(s['passed']['accuracy'])} |",
    ])
    return f"""## quant_cnn

The demo CNN (scikit-learn digits, {s['eval_samples']} eval images) → `export` →
`quantize: {{mode: static}}` with `max_accuracy_drop: 0.003`, on a {THREADS}-thread batch-1
profile. fp32 is the `export` stage, int8 the `quantize` stage, both measured by the
pipeline in the same run.

| target | limit | measured | |
|---|---|---|---|
{rows}

Candidates the pass timed against fp32 (interleaved, in-process, on the same profile;
fastest first) — chosen: **{s['chosen']}**. CPU int8 path: {s['isa']}
({s['int8_choice']['reason']}).

| candidate | p50 ms | vs fp32 | accuracy (search part) | |
|---|---|---|---|---|
{cands}

Quantize pass: {s['quantize_pass_seconds']:.1f} s; nodes kept in float:
{len(s['float_nodes'])}. Machine: {s['machine']['cpu']}, {s['machine']['cores']} cores; CPU
idle before the run {_pct(s['cpu_idle']['before_optimize'])}, load average
{s['machine']['load_avg_1m']:.1f} at the end. Whole benchmark: {s['seconds']:.0f} s.
"""


if __name__ == "__main__":
    sys.exit(main())
