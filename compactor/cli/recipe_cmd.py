"""`compactor recipe validate|lock|schema`."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def recipe() -> None:
    """Validate a recipe, write its fully resolved lock, or print its JSON Schema."""


@recipe.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check FILE against the recipe schema and its profiles (no model is loaded)."""
    from compactor.profiles import load_profile
    from compactor.recipe import load_recipe

    r = load_recipe(file)
    for t in r.targets:
        load_profile(t.profile, r.base_dir)
    passes = " → ".join(name for name, _ in r.pass_list) or "no passes"
    targets = ", ".join(t.profile for t in r.targets)
    click.echo(f"ok: {r.name}: {passes}; targets: {targets}")


@recipe.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the lock here instead of stdout.")
def lock(file: Path, output: Path | None) -> None:
    """Print FILE fully resolved: every default filled in."""
    from compactor.recipe import load_recipe

    text = "# compactor recipe.lock: the resolved recipe\n" + load_recipe(file).to_yaml()
    if output:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as e:
            from compactor.errors import UsageError

            raise UsageError(f"cannot write {output}: {e.strerror or e}",
                             "check that its folder exists and is writable") from e
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@recipe.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editor validation)."""
    from compactor.recipe import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))
