"""Benchmark: are compactor's latency gates right on a quiet host and on a loaded one?

The same gate, ``compactor check ARTIFACT --remeasure --budget max_latency_ms.p50=LIMIT``,
is run with two limits set from the model's quiet truth: 0.8x (the truth fails it) and
1.25x (the truth passes it); each ``--runs`` times on the quiet host and ``--runs`` times
while a competing load burns every core (one bounded CPU-burning process per core, which
this script starts before and stops after the loaded runs, and which stops itself after
``--load-cap`` seconds whatever happens). A wrong verdict is a ``pass`` where the truth
fails or a ``fail`` where it passes; ``inconclusive`` is never wrong, and is counted.

The truth is the same noise-robust estimate the gate judges (the p50 of the faster half of
the quiet blocks), measured for ``--truth-s`` seconds ``--truth-repeats`` times on an idle
host, the median taken. The model is the small CNN of bench_stability.py (about a
millisecond per run), measured on the built-in host-cpu profile (all cores).

Targets: 0 wrong verdicts of 4 x runs (40 with the default 10).
Writes the ``calibration`` section of benchmarks/RESULTS.md and
benchmarks/results/calibration.json.

Usage: python benchmarks/calibration.py [--runs 10] [--smoke] [--results-dir DIR]
(--smoke: 2 runs per cell and a short truth, to check the script end to end; its numbers
are not the benchmark's.) Exit code: 0 when no verdict was wrong, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import HERE, machine, wait_for_idle, write_json, write_section  # noqa: E402
from bench_stability import build_model, compactor, make_artifact  # noqa: E402

NAME = "calibration"
PROFILE = "host-cpu"
FACTORS = {"0.8x truth (truth fails)": 0.8, "1.25x truth (truth passes)": 1.25}
BURN = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
x = 0
while time.monotonic() < end:
    for _ in range(100000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
"""


class Load:
    """One CPU-burning process per core, each ending itself after ``cap_s`` seconds."""

    def __init__(self, cap_s: float, procs: int | None = None) -> None:
        self.cap_s = cap_s
        self.n = procs or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Load:
        self.procs = [subprocess.Popen([sys.executable, "-c", BURN, str(self.cap_s)])
                      for _ in range(self.n)]
        time.sleep(0.5)  # the scheduler spreads them before the gate starts
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def truth(model: Path, seconds: float, repeats: int, max_wait_s: float) -> dict:
    """The quiet p50 estimate, measured ``repeats`` times on an idle host."""
    from compactor.measure.bench import input_specs, random_feeds, remeasure_latency
    from compactor.profiles import load_profile

    prof = load_profile(PROFILE)
    feeds = random_feeds(input_specs(model), 1, {})[0]
    values = []
    for i in range(repeats):
        idle = wait_for_idle(max_wait_s=max_wait_s)
        iv = remeasure_latency(model, prof, feeds, seconds)["p50"]
        values.append({"p50_ms": iv.value, "low": iv.low, "high": iv.high, "busy": iv.busy,
                       "idle_before": idle})
        print(f"  truth {i + 1}/{repeats}: p50 {iv.value:.4f} ms ({iv.low:.4f}–{iv.high:.4f})"
              f"{' BUSY' if iv.busy else ''}, host {(idle or 0) * 100:.0f}% idle before",
              file=sys.stderr)
    return {"p50_ms": statistics.median(v["p50_ms"] for v in values), "runs": values}


def gate(artifact: Path, limit: float, settle_s: float) -> dict:
    proc, seconds = compactor("check", str(artifact), "--remeasure", "--target", PROFILE,
                              "--budget", f"max_latency_ms.p50={limit:.6f}", "--json",
                              "--settle-time", f"{settle_s:g}")
    if proc.returncode not in (0, 1, 5):
        raise SystemExit(f"compactor check failed ({proc.returncode}):\n{proc.stderr}")
    data = json.loads(proc.stdout)
    (v,) = [v for v in data["targets"][0]["verdicts"] if v["budget"] == "max_latency_ms.p50"]
    return {"status": v["status"], "measured": v["measured"], "low": v.get("low"),
            "high": v.get("high"), "exit": proc.returncode, "seconds": round(seconds, 2),
            "detail": v["detail"]}


def wrong(status: str, factor: float) -> bool:
    truth_passes = factor >= 1.0
    return (status == "pass" and not truth_passes) or (status == "fail" and truth_passes)


def run_cells(artifact: Path, p50: float, runs: int, settle_s: float, load_cap: float,
              max_wait_s: float) -> list[dict]:
    cells = []
    for host in ("quiet", "loaded"):
        for label, factor in FACTORS.items():
            limit = p50 * factor
            results = []
            for i in range(runs):
                if host == "quiet":
                    wait_for_idle(max_wait_s=max_wait_s)
                    r = gate(artifact, limit, settle_s)
                else:
                    with Load(load_cap):
                        r = gate(artifact, limit, settle_s)
                r["wrong"] = wrong(r["status"], factor)
                results.append(r)
                print(f"  {host} {label} {i + 1}/{runs}: {r['status']}"
                      f"{' WRONG' if r['wrong'] else ''} (measured {r['measured']}, "
                      f"{r['seconds']} s)", file=sys.stderr)
            cells.append({"host": host, "limit": label, "factor": factor,
                          "limit_ms": round(limit, 5), "results": results,
                          "wrong": sum(r["wrong"] for r in results),
                          "inconclusive": sum(r["status"] == "inconclusive" for r in results),
                          "counts": {s: sum(r["status"] == s for r in results)
                                     for s in ("pass", "fail", "inconclusive")}})
    return cells


def render(r: dict) -> str:
    m = r["machine"]
    lines = [
        "## calibration: latency gates against the quiet truth, on a quiet and a loaded host",
        "",
        f"Run {r['date']} on {m.get('cpu')} ({m.get('cores')} cores, ISA "
        f"{', '.join(r['isa']) or 'unknown'}), onnxruntime {r['onnxruntime']}"
        + (" — **smoke run: not the benchmark's numbers**" if r["smoke"] else "") + ".",
        "",
        f"Gate: `compactor check ARTIFACT --remeasure --budget max_latency_ms.p50=LIMIT "
        f"--settle-time {r['settle_s']:g}` on {PROFILE}; quiet truth (p50 of the faster half "
        f"of the quiet blocks, median of {len(r['truth']['runs'])} runs of "
        f"{r['truth_s']:g} s): **{r['truth']['p50_ms']:.4f} ms**. Loaded: one CPU-burning "
        "process per core while the gate runs.",
        "",
        "| host | limit | limit ms | pass | fail | inconclusive | wrong | median wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cells"]:
        k = c["counts"]
        lines.append(f"| {c['host']} | {c['limit']} | {c['limit_ms']:.4f} | {k['pass']} | "
                     f"{k['fail']} | {k['inconclusive']} | {c['wrong']} | "
                     f"{statistics.median(x['seconds'] for x in c['results']):.1f} |")
    lines += ["", f"Wrong verdicts: **{r['wrong']} of {r['verdicts']}** (target 0); "
              f"inconclusive: {r['inconclusive']} of {r['verdicts']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="gate runs per cell (default 10)")
    ap.add_argument("--truth-s", type=float, default=20.0)
    ap.add_argument("--truth-repeats", type=int, default=3)
    ap.add_argument("--settle-time", type=float, default=30.0, dest="settle_s")
    ap.add_argument("--load-cap", type=float, default=300.0, metavar="S",
                    help="each burner stops itself after this long (default 300)")
    ap.add_argument("--max-wait", type=float, default=120.0, metavar="S",
                    help="seconds to wait for an idle host before each quiet run")
    ap.add_argument("--smoke", action="store_true",
                    help="2 runs per cell, a 4 s truth, --settle-time 6: checks the script")
    ap.add_argument("--results-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.truth_s, args.truth_repeats, args.settle_s = 2, 4.0, 1, 6.0
        args.max_wait = min(args.max_wait, 10.0)
    import datetime as dt

    import onnxruntime

    from compactor.measure.host import isa_flags

    with tempfile.TemporaryDirectory(prefix="compactor-calibration-") as tmp:
        work = Path(tmp)
        model = work / "cnn.onnx"
        build_model(model)
        print(f"benchmark {NAME}: truth on {PROFILE}", file=sys.stderr)
        t = truth(model, args.truth_s, args.truth_repeats, args.max_wait)
        artifact = make_artifact(model, work, name="calibration-cnn", samples=32,
                                 target=f"profile: {PROFILE}")
        cells = run_cells(artifact, t["p50_ms"], args.runs, args.settle_s, args.load_cap,
                          args.max_wait)
    verdicts = sum(len(c["results"]) for c in cells)
    r = {
        "name": NAME,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "isa": isa_flags(),
        "onnxruntime": onnxruntime.__version__,
        "smoke": args.smoke,
        "profile": PROFILE,
        "truth_s": args.truth_s,
        "settle_s": args.settle_s,
        "truth": t,
        "cells": cells,
        "verdicts": verdicts,
        "wrong": sum(c["wrong"] for c in cells),
        "inconclusive": sum(c["inconclusive"] for c in cells),
    }
    r["passed"] = r["wrong"] == 0
    write_json(NAME, r, args.results_dir)
    md = render(r)
    write_section(NAME, md, args.results_dir)
    print(md)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
