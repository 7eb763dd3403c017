"""`compactor bench MODEL --profile P`: measure any ONNX model the way `optimize` measures
each stage. Needs only onnxruntime (no torch), so it runs on the target device itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from compactor.cli.options import dim_option

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
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(model: Path, profile_names: tuple[str, ...], dims: dict[str, int],
          budget_pairs: tuple[str, ...], as_json: bool) -> int:
    """Measure MODEL (.onnx or .ort) on each profile: latency p50/p90/p99 until the median
    is stable, throughput per batch size, cold start and peak memory (in a fresh process),
    and labelled estimates where this host lacks the profile's execution provider.

    Inputs are random, at the profile's batch sizes."""
    from compactor.budgets import merge_budgets, parse_budget_overrides
    from compactor.cli.render import console
    from compactor.errors import EXIT_BUDGET, EXIT_OK, UsageError
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
    profiles = [load_profile(n, Path.cwd()) for n in (profile_names or ("host-cpu",))]

    err = console(stderr=True)
    results = []
    for prof in profiles:
        with err.status(f"measuring {model.name} on {prof.name} …"):
            r = run_bench(model, prof, dims)
        if budget_pairs:
            _judge(r, budgets, prof)
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
    return EXIT_BUDGET if failed else EXIT_OK


def _judge(r: dict[str, Any], budgets: Budgets, prof: Profile) -> None:
    """Add the budgets' verdicts to a bench result: size, batch-1 latency and memory (no
    metric or baseline here)."""
    from compactor.budgets import evaluate_budgets

    l1 = r["latency_ms"].get("1")
    est = (r["estimates"].get("latency") or {}).get("latency_ms")
    verdicts = evaluate_budgets(
        budgets, size_mb=r["model"]["size_bytes"] / 1e6,
        latency_ms=None if l1 is None else {q: l1[q] for q in ("p50", "p90", "p99")},
        baseline_latency_ms=None, metric_name="", metric_value=None,
        metric_drop=None, baseline_metric=None,
        memory_mb=(r["memory"] or {}).get("peak_rss_mb"), profile=prof,
        latency_estimate_ms=est)
    r["verdicts"] = [v.to_dict() for v in verdicts]
    r["passed"] = all(v.passed for v in verdicts)
