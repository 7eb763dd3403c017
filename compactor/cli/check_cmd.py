"""`compactor check ARTIFACT`: gate CI on an existing artifact. Needs no torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from compactor.cli.options import dim_option, gate_line, inconclusive_option, settle_option

if TYPE_CHECKING:
    from compactor.check import CheckResult


@click.command(short_help="Gate CI on an artifact: integrity, budgets, regressions.")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, metavar="PROFILE",
              help="Check only this target (repeatable). With --remeasure, any profile.")
@click.option("--budget", "budget_pairs", multiple=True, metavar="KEY=VALUE",
              help="Add or override a budget for the checked targets, e.g. "
                   "max_latency_ms.p90=5, max_accuracy_drop=1%, max_memory_mb=300.")
@click.option("--remeasure", is_flag=True,
              help="Measure latency and memory again on this host (in a fresh process) "
                   "instead of reading them from the manifest.")
@click.option("--against", type=click.Path(path_type=Path), metavar="OLD",
              help="An older artifact (folder or manifest.json) to catch regressions against.")
@click.option("--max-regression", default="5%", show_default=True, metavar="PCT",
              help="Largest allowed regression in size, p50 latency or the metric.")
@dim_option("With --remeasure: size of a symbolic input axis other than the batch.")
@click.option("--strict", is_flag=True, help="Fail on verdicts that could not be measured.")
@inconclusive_option()
@settle_option()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also write the verdicts as JUnit XML (for CI test reports).")
@click.option("--prometheus", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --remeasure: write latency and memory now vs the manifest's, and the "
                   "verdicts, as Prometheus gauges (node_exporter textfile; docs/deploy.md).")
def check(artifact: Path, targets: tuple[str, ...], budget_pairs: tuple[str, ...],
          remeasure: bool, against: Path | None, max_regression: str, dims: dict[str, int],
          strict: bool, inconclusive: str, settle_s: float, as_json: bool, junit: Path | None,
          prometheus: Path | None) -> int:
    """Check ARTIFACT (a folder `compactor optimize` wrote): verify the model's hash against
    the manifest, judge each target's budgets (from the manifest, or re-measured with
    --remeasure), and compare with an older artifact (--against).

    ARTIFACT may also be a `compactor publish` repository, one of its models (its live
    version) or a version folder.

    Exits 0 when every check holds, 1 when one fails or the artifact was tampered with, 5
    when one stays inconclusive (its interval straddles the limit, or the host was too busy
    to trust a fail) under --inconclusive fail. Under GitHub Actions (GITHUB_ACTIONS=true)
    failures are also printed as annotations and a summary is added to the job's step
    summary.
    """
    from compactor.budgets import parse_budget_overrides, parse_percent
    from compactor.check import check_artifact
    from compactor.cli.options import gate_exit
    from compactor.cli.render import check_report, console, safe

    overrides = parse_budget_overrides(budget_pairs)
    limit = parse_percent(max_regression)
    err = console(stderr=True)
    from compactor.deploy.repository import resolve_version

    found = resolve_version(artifact)  # a repository, model or version: that version
    artifact = found[0] if found else artifact
    if prometheus is not None and not remeasure:
        from compactor.errors import UsageError

        raise UsageError("--prometheus needs --remeasure", "the gauges compare latency "
                         "measured now on this host with the manifest's; add --remeasure")

    def on_measure(name: str) -> None:
        err.print(f"measuring {safe(artifact.name)} on {safe(name)} …", highlight=False)

    result = check_artifact(
        artifact, targets=targets, overrides=overrides, remeasure=remeasure, against=against,
        max_regression=limit, strict=strict, dims=dims, on_measure=on_measure,
        settle_s=settle_s,
    )
    _ci_outputs(result, junit, as_json)
    if prometheus is not None:
        from compactor.deploy.monitor import write_prometheus
        from compactor.manifest import load_manifest

        write_prometheus(prometheus, result, load_manifest(result.artifact),
                         found[2] if found else "", found[1] if found else None)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        check_report(console(), result.to_dict())
    _refuse_tampered(result)
    undecided = len(result.inconclusive)
    if not as_json:
        console().print(gate_line(result.passed, undecided, inconclusive, "checks"))
    elif undecided and inconclusive == "warn":
        err.print(f"[yellow]warning[/] {undecided} verdict(s) inconclusive (--inconclusive warn)")
    return gate_exit(result.passed, undecided, inconclusive)


def _ci_outputs(result: CheckResult, junit: Path | None, as_json: bool) -> None:
    """JUnit XML when asked; under GitHub Actions, annotations and the step summary."""
    from compactor.check import github_annotations, junit_xml, summary_markdown
    from compactor.cli.render import console, safe

    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result), encoding="utf-8")
    if os.environ.get("GITHUB_ACTIONS") != "true":
        return
    for line in github_annotations(result):
        click.echo(line, err=as_json)  # the runner reads both streams; keep JSON clean
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(summary_markdown(result))
        except OSError as e:
            console(stderr=True).print(
                f"[yellow]note[/] cannot write the step summary: {safe(e)}")


def _refuse_tampered(result: CheckResult) -> None:
    """Exit 1 through the CLI's one error handler when a file changed after compactor wrote
    it: the manifest's figures then describe another model."""
    from compactor.errors import BudgetFailed
    from compactor.manifest import visible

    if result.intact:
        return
    bad = [v for v in result.integrity if v.status != "pass"]
    raise BudgetFailed(
        visible(f"{result.artifact} was modified after compactor wrote it: "
                + "; ".join(f"{v.budget.removeprefix('integrity.')}: {v.detail}"
                            for v in bad)),
        "rebuild it with `compactor optimize`; its manifest's figures describe another model",
    )
