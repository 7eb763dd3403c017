"""`compactor package --triton`, `publish`, `versions`, `rollback`: a Triton model
repository built from the manifest's measurements, with gated releases. docs/deploy.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from compactor.deploy.repository import PublishResult, VersionRow

_REGRESSION_HELP = "Largest allowed regression against the live version (size, p50, metric)."


def _common(f):
    for opt in reversed([
        click.option("--name", metavar="NAME",
                     help="Model name in the repository (default: the manifest's name)."),
        click.option("--profile", metavar="PROFILE",
                     help="The target whose measurements set the batching and threads "
                          "(default: the first cloud target, else the first)."),
        click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
                     help="Model instances Triton runs (instance_group count)."),
        click.option("--remeasure", is_flag=True,
                     help="Time the artifact on this host (and the live version paired with "
                          "it) instead of reading the manifests' figures."),
        click.option("--allow-inconclusive", is_flag=True,
                     help="Publish even when a verdict stays undecided (exit 5 otherwise)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return f


@click.command(short_help="Write a Triton model repository for an artifact.")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--triton", "repo", required=True, type=click.Path(path_type=Path),
              metavar="REPO", help="The repository folder to create (absent or empty).")
@click.option("--serve", default=1, show_default=True, type=click.IntRange(1, 100),
              help="How many versions Triton serves: the live one and the newest below it.")
@_common
def package(artifact: Path, repo: Path, serve: int, name: str | None, profile: str | None,
            instances: int, remeasure: bool, allow_inconclusive: bool, as_json: bool) -> int:
    """Write REPO/<model>/config.pbtxt and REPO/<model>/1/model.onnx (with its manifest)
    for Triton's ONNX Runtime backend, batching derived from the measured latency per
    batch size and the target's latency budget. Later versions: `compactor publish`."""
    from compactor.deploy.repository import Gate
    from compactor.deploy.repository import publish as do_publish

    result = do_publish(artifact, repo, name=name, profile=profile, instances=instances,
                        serve=serve, new_model=True,
                        gate=Gate(remeasure=remeasure, allow_inconclusive=allow_inconclusive))
    _show_publish(result, as_json)
    return 0


@click.command(short_help="Add an artifact as the next live version, if it does not regress.")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--repo", required=True, type=click.Path(path_type=Path), metavar="REPO",
              help="The repository (made when absent or empty).")
@click.option("--max-regression", default="5%", show_default=True, metavar="PCT",
              help=_REGRESSION_HELP)
@click.option("--serve", type=click.IntRange(1, 100), default=None,
              help="How many versions Triton serves (default: as the repository says; 1).")
@_common
def publish(artifact: Path, repo: Path, max_regression: str, serve: int | None,
            name: str | None, profile: str | None, instances: int, remeasure: bool,
            allow_inconclusive: bool, as_json: bool) -> int:
    """Publish ARTIFACT into REPO as version N+1 and make it live, only if it is intact,
    its own budgets hold, and `check --against` the live version holds within
    --max-regression. Exits 1 when refused (nothing is written), 2 when another publish
    or rollback holds the repository, 5 when a verdict stays undecided (a latency change
    read from two manifests timed apart: add --remeasure)."""
    from compactor.budgets import parse_percent
    from compactor.deploy.repository import Gate
    from compactor.deploy.repository import publish as do_publish

    gate = Gate(parse_percent(max_regression), remeasure, allow_inconclusive)
    result = do_publish(artifact, repo, name=name, profile=profile, instances=instances,
                        serve=serve, gate=gate)
    _show_publish(result, as_json)
    return 0


def _show_publish(result: PublishResult, as_json: bool) -> None:
    from compactor.cli.render import console, safe

    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    out = console()
    b = result.batching
    was = f" (was {result.previous})" if result.previous is not None else ""
    out.print(f"published [bold]{safe(result.model)}[/] version {result.version}: live{was}; "
              f"Triton serves {result.served}", highlight=False)
    out.print(f"  max_batch_size {b.max_batch_size}" + (
        f", dynamic batching: preferred {list(b.preferred)}, max queue delay "
        f"{b.max_queue_delay_us} µs" if b.dynamic else ", no dynamic batching"),
        highlight=False)
    for r in b.reasons:
        out.print(f"  {safe(r)}", highlight=False)
    out.print(f"  config: {safe(result.repo / result.model / 'config.pbtxt')}", highlight=False)
    for n in result.notes:
        out.print(f"  [yellow]note[/] {safe(n)}", highlight=False)


@click.command(short_help="List a repository's versions and which one is live.")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
def versions(repo: Path, as_json: bool) -> int:
    """List every version in REPO with its key measurements (size, p50/p99 at batch 1 on
    its profile, metric) and which one is live and served."""
    from compactor.deploy.repository import list_versions

    models = list_versions(repo)
    if as_json:
        click.echo(json.dumps({m: [r.to_dict() for r in rows] for m, rows in models.items()},
                              indent=2))
        return 0
    for model, rows in models.items():
        _versions_table(model, rows)
    return 0


def _versions_table(model: str, rows: list[VersionRow]) -> None:
    from rich.table import Table

    from compactor.cli.render import console, safe
    from compactor.report.format import fmt_num

    t = Table(title=safe(model), title_justify="left")
    for col in ("version", "", "published", "size MB", "p50 ms", "p99 ms", "metric", "profile"):
        t.add_column(col)
    for r in rows:
        flag = "live" if r.live else ("served" if r.served else "")
        if r.state != "ok":
            flag = r.state
        rec = r.record
        if rec is None:
            t.add_row(str(r.version), flag, "", "", "", "", "", "")
            continue
        t.add_row(str(r.version), flag, safe(rec.published), f"{rec.size_bytes / 1e6:.3f}",
                  "" if rec.p50_ms is None else fmt_num(rec.p50_ms),
                  "" if rec.p99_ms is None else fmt_num(rec.p99_ms),
                  f"{safe(rec.metric)} " + ("" if rec.metric_value is None
                                            else fmt_num(rec.metric_value)),
                  safe(rec.profile))
    console().print(t)


@click.command(short_help="Make an older version live again (deletes nothing).")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--to", "to", type=int, metavar="N",
              help="The version to make live (default: the newest below the live one).")
@click.option("--model", metavar="NAME", help="The model, when REPO holds several.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def rollback(repo: Path, to: int | None, model: str | None, as_json: bool) -> int:
    """Make version N of a model live again: the config's version_policy changes, every
    version stays on disk. Exits 2 when version N does not exist."""
    from compactor.cli.render import console, safe
    from compactor.deploy.repository import rollback as do_rollback

    result = do_rollback(repo, model=model, to=to)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console().print(f"{safe(result.model)}: version {result.version} is live (was "
                        f"{result.previous}); Triton serves {result.served}", highlight=False)
    return 0
