"""`compactor optimize [RECIPE]`."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from compactor.cli.options import gate_exit, gate_line, inconclusive_option, settle_option
from compactor.errors import EXIT_OK


def demo_recipe() -> Path:
    return Path(str(resources.files("compactor.examples").joinpath("digits.yaml")))


@click.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact folder (default: the recipe's 'output', relative to the recipe; "
                   "./out/digits-cnn for the demo). It must be absent, empty, or an artifact "
                   "compactor wrote and nobody changed: anything else is refused, never "
                   "deleted.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the manifest as JSON on stdout (progress stays on stderr).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: reuse its finished stages and continue "
                   "training from the last checkpoint (refused when the recipe changed in a "
                   "way that invalidates them). Saved files are loaded as weights only, and "
                   "only when they match the signed hashes recorded when they were written.")
@inconclusive_option()
@settle_option()
def optimize(recipe: Path | None, output: Path | None, as_json: bool, resume: bool,
             inconclusive: str, settle_s: float) -> int:
    """Run RECIPE: passes, measurements, budgets, artifact.

    With no RECIPE, runs the bundled demo (a CNN on handwritten digits: prune → distill →
    ONNX → int8). Exits 1 when a budget fails (the artifact is still written, its verdicts
    failing), 5 when one stays inconclusive under --inconclusive fail.
    """
    from compactor.cli.render import RichProgress, console, stage_table, verdict_table
    from compactor.pipeline import optimize as run
    from compactor.recipe import load_recipe

    err = console(stderr=True)
    if recipe is None:
        recipe = demo_recipe()
        output = output or Path("out/digits-cnn")
        err.print(f"[bold]compactor demo[/]: {recipe.name} (a CNN on scikit-learn's digits; "
                  "the first run trains it, ~30 s)")
    r = load_recipe(recipe)
    if _worker_rank():  # under torchrun, rank 0 draws progress and reports
        from compactor.progress import Progress

        run(r, progress=Progress(), output=output, resume=resume, settle_s=settle_s)
        return EXIT_OK
    with RichProgress(err) as progress:
        result = run(r, progress=progress, output=output, resume=resume, settle_s=settle_s)
    undecided = len(result.inconclusive)
    if as_json:
        click.echo(json.dumps({"artifact": str(result.artifact), **result.manifest}, indent=2,
                              default=str))
    else:
        from compactor.manifest import Manifest
        from compactor.report.markdown import target_facts

        manifest = Manifest.model_validate(result.manifest)
        out = console()
        out.print(stage_table(manifest))
        vt = verdict_table(manifest)
        if vt is not None:
            out.print(vt)
        for line in target_facts(manifest):
            out.print(line.removeprefix("- "), highlight=False, markup=False)
        for t in manifest.targets:
            for note in t.notes:
                out.print(f"[yellow]note[/] {t.profile}: {note}")
        out.print(f"{gate_line(result.passed, undecided, inconclusive, 'budgets')}; artifact: "
                  f"{result.artifact} ({result.seconds:.0f} s)")
    if as_json and undecided and inconclusive == "warn":
        err.print(f"[yellow]warning[/] {undecided} verdict(s) inconclusive (--inconclusive warn)")
    return gate_exit(result.passed, undecided, inconclusive)


def _worker_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") not in ("", "0") and \
        os.environ.get("WORLD_SIZE", "1") not in ("", "1")
