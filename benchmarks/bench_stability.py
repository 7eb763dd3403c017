"""Benchmark: how trustworthy and how quick compactor's measurement commands are.

1. ``compactor bench MODEL --profile P --json`` five times on the same model, each a
   separate process (as a user or CI job would run it): the spread of the reported p50
   at batch 1, (max - min) / median, must stay within 3%; so must the spread of the
   noise-robust estimate budgets are judged on (``quiet.p50``: the p50 of the faster half
   of the blocks of runs that had the cores to themselves). Two series: the built-in
   ``host-cpu`` (all cores) and a one-thread profile file, because on a small VM
   multi-threaded latency moves with how the hypervisor schedules the vCPUs together.
2. ``compactor check ARTIFACT`` from the manifest (hash verified, budgets re-judged, no
   re-measuring): wall time of the whole command, under 2 s.
3. ``compactor --help``: wall time, under 0.5 s.

The model is a small CNN built here with onnx.helper (fixed random weights, ~60M MACs);
the artifact for (2) comes from ``compactor optimize`` on a recipe that takes that ONNX
model as it is (no passes), so the benchmark needs no torch. Writes the ``stability``
section of benchmarks/RESULTS.md and benchmarks/results/stability.json.

Usage: python benchmarks/bench_stability.py [--runs 5] [--results-dir DIR]
Exit code: 0 when every target holds, 1 when one fails (results are written either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import HERE, machine, wait_for_idle, write_json, write_section  # noqa: E402

NAME = "stability"
PROFILE = "host-cpu"
ONE_THREAD = "name: host-1t\nclass: host\nintra_op_threads: 1\nbatch_sizes: [1]\n"
TARGETS = {
    "p50_spread": 0.03,  # (max - min) / median of the 5 reported p50s
    "check_s": 2.0,  # `compactor check ARTIFACT`, from the manifest
    "help_s": 0.5,  # `compactor --help`
}


def build_model(path: Path) -> None:
    """A 3-conv CNN on 3x64x64 images, ~60M MACs: about a millisecond on one core."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32),
                                       name)

    inits = [w("w1", 32, 3, 3, 3), w("b1", 32), w("w2", 64, 32, 3, 3), w("b2", 64),
             w("w3", 64, 64, 3, 3), w("b3", 64), w("fc", 64, 10), w("fcb", 10)]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "stability_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def compactor(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    exe = Path(sys.executable).with_name("compactor")
    cmd = [str(exe)] if exe.exists() else [
        sys.executable, "-c", "import sys; from compactor.cli import main; main()"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
    return proc, time.perf_counter() - t0


def bench_runs(model: Path, runs: int, profile: str, max_wait_s: float) -> list[dict]:
    out = []
    for i in range(runs):
        idle = wait_for_idle(max_wait_s=max_wait_s)
        proc, seconds = compactor("bench", str(model), "--profile", profile, "--json")
        if proc.returncode != 0:
            raise SystemExit(f"compactor bench failed:\n{proc.stderr}")
        r = json.loads(proc.stdout)
        l1 = r["latency_ms"]["1"]
        quiet = (l1.get("quiet") or {}).get("p50") or [None, None, None]
        out.append({"run": i + 1, "p50_ms": l1["p50"], "p90_ms": l1["p90"], "runs": l1["runs"],
                    "quiet_p50_ms": quiet[0], "quiet_p50_interval": quiet[1:],
                    "busy": l1.get("busy"), "blocks": l1.get("blocks"),
                    "quiet_blocks": l1.get("quiet_blocks"),
                    "ci": l1["ci"], "stable": l1["stable"], "cpu_share": l1["cpu_share"],
                    "idle_before": idle, "seconds": round(seconds, 2),
                    "notes": r["notes"]})
        print(f"  bench {i + 1}/{runs}: p50 {l1['p50']:.4f} ms ({l1['runs']} runs, median "
              f"±{l1['ci'] * 100:.2f}%, cpu share {l1['cpu_share']:.2f}, host "
              f"{(idle or 0) * 100:.0f}% idle before), {seconds:.1f} s", file=sys.stderr)
    return out


def make_artifact(model: Path, work: Path, name: str = "stability-cnn", samples: int = 64,
                  target: str | None = None) -> Path:
    """An artifact of ``model`` (fidelity on random images) for one target: by default a
    fast-timing profile with size/latency/memory budgets; ``target`` replaces that target's
    YAML (e.g. ``"profile: host-cpu"``)."""
    import numpy as np

    rng = np.random.default_rng(1)
    np.savez(work / "eval.npz",
             image=rng.standard_normal((samples, 3, 64, 64)).astype(np.float32))
    if target is None:
        target = ("profile: fast.yaml\n"
                  "    budgets: {max_size_mb: 1, max_latency_ms: {p90: 50}, max_memory_mb: 1024}")
        (work / "fast.yaml").write_text(
            "name: fast\nclass: host\nbatch_sizes: [1]\n"
            "timing: {warmup: 2, min_runs: 10, min_time_s: 0.1, max_time_s: 0.5}\n",
            encoding="utf-8")
    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nname: {name}\n"
        f"model: {{onnx: {model.name}}}\n"
        "data: {eval: eval.npz, batch_size: 32}\n"
        "metric: fidelity\n"
        f"targets:\n  - {target}\n"
        "output: artifact\n", encoding="utf-8")
    proc, _ = compactor("optimize", str(recipe))
    if proc.returncode != 0:
        raise SystemExit(f"compactor optimize failed:\n{proc.stderr}")
    return work / "artifact"


def timed(label: str, n: int, *args: str) -> list[float]:
    times = []
    for _ in range(n):
        proc, seconds = compactor(*args)
        if proc.returncode != 0:
            raise SystemExit(f"compactor {' '.join(args)} failed:\n{proc.stderr}")
        times.append(round(seconds, 3))
    print(f"  {label}: median {statistics.median(times):.3f} s, max {max(times):.3f} s",
          file=sys.stderr)
    return times


def spread_of(p50s: list[float]) -> float:
    return (max(p50s) - min(p50s)) / statistics.median(p50s)


def spread(runs: list[dict], key: str = "p50_ms") -> float | None:
    values = [b[key] for b in runs if b.get(key) is not None]
    return spread_of(values) if len(values) == len(runs) else None


def render(r: dict) -> str:
    lines = [
        "## stability: `compactor bench` repeatability, `check` and `--help` speed",
        "",
        f"Run {r['date']} on {r['machine']['cpu']} ({r['machine']['cores']} cores, 1-min load "
        f"average {r['machine']['load_avg_1m']:.2f} at the end), onnxruntime "
        f"{r['onnxruntime']}. Model: a 3-conv CNN built with onnx.helper (~60M MACs), "
        "batch 1; each bench a separate `compactor bench --json` process.",
        "",
        f"Before each bench the script waits (up to {r['max_wait_s']:g} s) for the host to "
        "be ≥ 90% idle; "
        "`cpu share` is the CPU time the measuring process got / (wall time × its threads): "
        "well below 1 means another process took a core mid-measurement.",
        "",
        "| profile | bench run | p50 ms | quiet p50 ms (quiet blocks) | p90 ms | timed runs | "
        "median 95% CI | cpu share | host idle before | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for series in r["bench"]:
        for b in series["runs"]:
            idle = "n/a" if b["idle_before"] is None else f"{b['idle_before'] * 100:.0f}%"
            lines.append(
                f"| {series['profile']} | {b['run']} | {b['p50_ms']:.4f} | "
                + (f"{b['quiet_p50_ms']:.4f} ({b['quiet_blocks']}/{b['blocks']})"
                   if b.get("quiet_p50_ms") is not None else "n/a")
                + f" | {b['p90_ms']:.4f} | "
                f"{b['runs']} | ±{b['ci'] * 100:.2f}% | {b['cpu_share']:.2f} | {idle} | "
                f"{b['seconds']:.1f} |")
    lines += ["", "Only the runs that compactor itself reported stable (median CI ≤ ±2%, "
              "`stable: true`):", ""]
    for series in r["bench"]:
        ok = [b["p50_ms"] for b in series["runs"] if b["stable"]]
        lines.append(
            f"- {series['profile']}: {len(ok)} of {len(series['runs'])} runs stable"
            + (f", p50 spread among them {spread_of(ok) * 100:.2f}%" if len(ok) > 1 else ""))
    lines += [
        "",
        "| target | limit | measured | |",
        "|---|---:|---:|---|",
    ]
    for c in r["checks"]:
        lines.append(f"| {c['target']} | {c['limit']} | {c['measured']} | "
                     f"{'PASS' if c['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--max-wait", type=float, default=120.0, metavar="S",
                    help="seconds to wait for an idle host before each bench (default 120)")
    args = ap.parse_args(argv)
    import datetime as dt

    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="compactor-bench-stability-") as tmp:
        work = Path(tmp)
        model = work / "cnn.onnx"
        build_model(model)
        one = work / "host-1t.yaml"
        one.write_text(ONE_THREAD, encoding="utf-8")
        series = []
        for label, prof in ((PROFILE, PROFILE), ("host-1t (1 thread)", str(one))):
            print(f"benchmark {NAME}: {args.runs} x compactor bench on {label}",
                  file=sys.stderr)
            runs = bench_runs(model, args.runs, prof, args.max_wait)
            series.append({"profile": label, "runs": runs, "p50_spread": spread(runs),
                           "quiet_p50_spread": spread(runs, "quiet_p50_ms"),
                           "p50_median_ms": statistics.median(b["p50_ms"] for b in runs)})
        print("  making an artifact for check", file=sys.stderr)
        artifact = make_artifact(model, work)
        check_times = timed("compactor check (from the manifest)", 5, "check", str(artifact))
        help_times = timed("compactor --help", 10, "--help")

    checks = [
        {"target": f"{s['profile']}: spread of p50 over {args.runs} bench runs, "
                   "(max-min)/median",
         "limit": f"≤ {TARGETS['p50_spread'] * 100:g}%",
         "measured": f"{s['p50_spread'] * 100:.2f}%",
         "passed": s["p50_spread"] <= TARGETS["p50_spread"]}
        for s in series
    ] + [
        {"target": f"{s['profile']}: spread of the quiet p50 estimate over {args.runs} bench "
                   "runs, (max-min)/median",
         "limit": f"≤ {TARGETS['p50_spread'] * 100:g}%",
         "measured": f"{s['quiet_p50_spread'] * 100:.2f}%",
         "passed": s["quiet_p50_spread"] <= TARGETS["p50_spread"]}
        for s in series if s["quiet_p50_spread"] is not None
    ] + [
        {"target": "`compactor check ARTIFACT` wall time (max of 5)",
         "limit": f"< {TARGETS['check_s']:g} s", "measured": f"{max(check_times):.3f} s",
         "passed": max(check_times) < TARGETS["check_s"]},
        {"target": "`compactor --help` wall time (max of 10)",
         "limit": f"< {TARGETS['help_s']:g} s", "measured": f"{max(help_times):.3f} s",
         "passed": max(help_times) < TARGETS["help_s"]},
    ]
    r = {
        "name": NAME,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "onnxruntime": onnxruntime.__version__,
        "bench": series,
        "max_wait_s": args.max_wait,
        "check_seconds": check_times,
        "help_seconds": help_times,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }
    write_json(NAME, r, args.results_dir)
    md = render(r)
    write_section(NAME, md, args.results_dir)
    print(md)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
