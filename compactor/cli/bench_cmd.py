"""`compactor bench MODEL --profile P`: measure any ONNX model the way `optimize` measures
each stage. Needs only onnxruntime (no torch), so it runs on the target device itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from compactor.cli.options import dim_option, inconclusive_option, settle_option

if TYPE_CHECKING:
    from compactor.profiles import Profile
    from compactor.spec import Budgets


@click.command(short_help="Measure a model on hardware profiles (needs no torch).")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "--profile", "profile_names", multiple=True, metavar="NAME|FILE.yaml",
              help="Profile to measure with (repeatable; default host-cpu).")
@dim_option("Size of a symbolic input axis other than the batch (default 1).")
@click.option("--budget", "budget_pairs", multiple=True, metavar="KEY=VALUE",
              help="Gate on a budget (max_size_mb, max_latency_ms[.p50|.p90|.p99], "
                   "max_memory_mb); exit 1 when one fails.")
@inconclusive_option()
@settle_option()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(model: Path, profile_names: tuple[str, ...], dims: dict[str, int],
          budget_pairs: tuple[str, ...], inconclusive: str, settle_s: float,
          as_json: bool) -> int:
    """Measure MODEL (.onnx or .ort) on each profile: latency p50/p90/p99 until the median
    is stable, throughput per batch size, cold start and peak memory (in a fresh process),
    and labelled estimates where this host lacks the profile's execution provider.

    Inputs are random, at the profile's batch sizes. With --budget, latency is judged on
    its quiet-block estimate and interval (re-measured within --settle-time when it
    straddles the limit); exit 1 when a budget fails, 5 when one stays inconclusive
    under --inconclusive fail."""
    from compactor.budgets import (
        MIN_SETTLE_S,
        check_time_cap,
        merge_budgets,
        parse_budget_overrides,
    )
    from compactor.cli.options import gate_exit
    from compactor.cli.render import console
    from compactor.errors import UsageError
    from compactor.measure.bench import bench as run_bench
    from compactor.profiles import load_profile
    from compactor.spec import Budgets

    overrides = parse_budget_overrides(budget_pairs)
    unsupported = [k for k in overrides if k in ("max_accuracy_drop", "min_speedup")]
    if unsupported:
        raise UsageError(f"bench cannot judge {', '.join(unsupported)}: it has no eval data "
                         "and no baseline",
                         "use `compactor check ARTIFACT --budget ...` for those")
    budgets = merge_budgets(Budgets(), overrides)
    check_time_cap(settle_s, MIN_SETTLE_S, "--settle-time")
    profiles = [load_profile(n, Path.cwd()) for n in (profile_names or ("host-cpu",))]

    err = console(stderr=True)
    results = []
    for prof in profiles:
        with err.status(f"measuring {model.name} on {prof.name} …"):
            r = run_bench(model, prof, dims)
        if budget_pairs:
            _judge(r, budgets, prof, model, dims, settle_s)
        results.append(r)

    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2,
                              default=str))
    else:
        from compactor.cli.render import bench_report

        out = console()
        for r in results:
            bench_report(out, r)
    failed = any(r.get("passed") is False for r in results)
    undecided = sum(v["status"] == "inconclusive" for r in results
                    for v in r.get("verdicts", []))
    if undecided and not as_json:
        console().print(f"[bold yellow]{undecided} verdict(s) inconclusive[/] "
                        f"(--inconclusive {inconclusive})")
    return gate_exit(not failed, undecided, inconclusive)


def _judge(r: dict[str, Any], budgets: Budgets, prof: Profile, model: Path,
           dims: dict[str, int], settle_s: float) -> None:
    """Add the budgets' verdicts to a bench result: size, batch-1 latency (three-valued, on
    its quiet-block estimate, re-measured to settle) and memory (no metric or baseline
    here)."""
    from compactor.budgets import Gate, evaluate_budgets
    from compactor.measure.bench import input_specs, random_feeds, remeasure_latency
    from compactor.measure.latency import Latency

    l1 = r["latency_ms"].get("1")
    ci = None
    if l1 is not None:
        lat = Latency.from_dict(l1)
        ci = {q: iv for q in ("p50", "p90", "p99") if (iv := lat.interval(q)) is not None}
    feeds = random_feeds(input_specs(model), 1, dims)[0]
    gate = Gate(latency=lambda s: remeasure_latency(model, prof, feeds, s), cap_s=settle_s)
    est = (r["estimates"].get("latency") or {}).get("latency_ms")
    verdicts = evaluate_budgets(
        budgets, size_mb=r["model"]["size_bytes"] / 1e6,
        latency_ms=None if l1 is None else {q: l1[q] for q in ("p50", "p90", "p99")},
        baseline_latency_ms=None, metric_name="", metric_value=None,
        metric_drop=None, baseline_metric=None,
        memory_mb=(r["memory"] or {}).get("peak_rss_mb"), profile=prof,
        latency_estimate_ms=est, latency_ci=ci or None, gate=gate)
    r["verdicts"] = [v.to_dict() for v in verdicts]
    r["passed"] = all(v.passed for v in verdicts)
