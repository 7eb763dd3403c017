"""`compactor profiles list|show`."""

from __future__ import annotations

import click
import yaml


@click.group()
def profiles() -> None:
    """Hardware profiles: the targets measurements and budgets refer to."""


@profiles.command("list")
def list_() -> None:
    """List the built-in profiles."""
    from compactor.profiles import builtin_names, load_profile

    for name in builtin_names():
        p = load_profile(name)
        threads = "all cores" if p.intra_op_threads == 0 else f"{p.intra_op_threads} threads"
        click.echo(f"{name:<12} {p.target_class:<7} {threads:<10} "
                   f"{', '.join(p.execution_providers)}")


@profiles.command()
@click.argument("name")
def show(name: str) -> None:
    """Show a profile (a built-in NAME or a .yaml file) with every field resolved."""
    from compactor.profiles import load_profile

    p = load_profile(name)
    click.echo(yaml.safe_dump(p.model_dump(mode="json", by_alias=True), sort_keys=False),
               nl=False)
