"""`compactor sensitivity RECIPE`: how the metric moves as each prunable layer is pruned,
and per-layer amounts for a MACs target, ready to paste into the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _amounts(_ctx, _param, value: str) -> tuple[float, ...]:
    try:
        amounts = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected fractions like 0.25,0.5,0.75") from None
    if not amounts or any(not 0 < a < 1 for a in amounts):
        raise click.BadParameter(f"{value!r}: each amount must be in (0, 1)")
    return amounts


@click.command(short_help="Prune each layer alone; suggest per-layer amounts for a target.")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--amounts", default="0.25,0.5,0.75", show_default=True, callback=_amounts,
              help="Fractions of each layer's channels (or heads) removed, comma-separated.")
@click.option("--target-macs", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, help="Fraction of the baseline's MACs to keep for the suggestion "
              "(default: the recipe's prune target, else 0.5).")
@click.option("--importance", type=click.Choice(["l1", "l2", "taylor", "bn_scale", "random"]),
              default=None, help="Channel ranking (default: the recipe's prune pass, else l2).")
@click.option("--ignore", multiple=True, metavar="GLOB",
              help="Module-name globs to leave alone (default: the recipe's prune.ignore).")
@click.option("--batches", "max_batches", type=click.IntRange(min=1), default=None,
              help="Use only the first N eval batches (faster, noisier).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for sensitivity.json/.md/.svg (default: the recipe's output "
                   "folder + '-sensitivity').")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def sensitivity(recipe: Path, amounts: tuple[float, ...], target_macs: float | None,
                importance: str | None, ignore: tuple[str, ...], max_batches: int | None,
                output: Path | None, as_json: bool) -> int:
    """Prune each prunable layer of RECIPE's model alone by each amount and measure the
    metric (exported to ONNX, in ONNX Runtime, on the recipe's eval data); then suggest
    per-layer amounts that keep at most --target-macs of the MACs where the metric suffers
    least. Writes a table (sensitivity.md), a chart (sensitivity.svg) and everything
    (sensitivity.json); the suggestion is a `prune:` entry to paste into the recipe."""
    from compactor.cli.render import RichProgress, console
    from compactor.recipe import load_recipe
    from compactor.sensitivity import analyze, write

    r = load_recipe(recipe)
    if target_macs is None:
        cfg = next((c for n, c in r.pass_list if n == "prune"), None)
        target = getattr(cfg, "target", None)
        target_macs = target.macs if target is not None and target.macs is not None else 0.5
    err = console(stderr=True)
    with RichProgress(err) as progress:
        result = analyze(r, amounts, target_macs, importance, ignore or None, max_batches,
                         progress)
    folder = output or Path(str(r.output_dir) + "-sensitivity")
    paths = write(result, folder)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "files": {k: str(v) for k, v in
                                                             paths.items()}}, indent=2))
        return 0
    out = console()
    out.print(_table(result))
    for w in result.warnings:
        out.print(f"[yellow]note[/] {w}")
    s = result.suggestion
    if s is not None:
        head = f"suggestion for MACs ≤ {s.target_macs:g} of the baseline"
        if not s.reachable:
            out.print(f"[yellow]{head}: not reachable with amounts up to {max(amounts):g}; "
                      "the largest plan found:[/]")
        else:
            out.print(f"[bold]{head}[/]")
        if s.metric is not None:
            out.print(f"  measured: MACs {s.macs_ratio:.3f} of the baseline, {result.metric} "
                      f"{s.metric:.4g} (drop {s.drop:.3g})" if s.macs_ratio is not None else
                      f"  measured: {result.metric} {s.metric:.4g} (drop {s.drop:.3g})")
        out.print("  paste into the recipe:", style="dim")
        click.echo("passes:\n" + s.yaml())
    out.print(f"wrote {paths['markdown']}, {paths['chart'].name}, {paths['json'].name}")
    return 0


def _table(result):
    from rich.table import Table

    from compactor.sensitivity import sparkline

    t = Table(title=f"{result.recipe}: {result.metric} with one layer pruned (baseline "
                    f"{result.baseline_metric:.4g}; ONNX Runtime, {result.eval_samples} "
                    "samples)", title_justify="left")
    t.add_column("layer")
    t.add_column("kind")
    t.add_column("width", justify="right")
    for a in result.amounts:
        t.add_column(f"{a:g}", justify="right")
    t.add_column("drop")
    worst = max((p.drop for layer in result.layers for p in layer.points), default=0.0)
    for layer in result.layers:
        by = {p.amount: p for p in layer.points}
        cells = [f"{by[a].metric:.4g}" if a in by else "n/a" for a in result.amounts]
        t.add_row(layer.name, layer.kind, str(layer.width), *cells, sparkline(layer, worst))
    return t
