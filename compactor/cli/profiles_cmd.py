"""`compactor profiles list|show`."""

from __future__ import annotations

import click
import yaml


@click.group()
def profiles() -> None:
    """Hardware profiles: the targets measurements and budgets refer to."""


@profiles.command("list")
def list_() -> None:
    """List the built-in profiles: one line each, name first."""
    from compactor.profiles import builtin_names, load_profile

    rows = []
    for name in builtin_names():
        p = load_profile(name)
        threads = "all cores" if p.intra_op_threads == 0 else f"{p.intra_op_threads} threads"
        limits = ", ".join(f"{label} {v:g} MB" for label, v in
                           (("memory", p.limits.memory_mb),
                            ("model", p.limits.model_size_mb)) if v)
        rows.append((name, p.target_class, threads, "batch " + "/".join(map(str, p.batch_sizes)),
                     ", ".join(p.execution_providers), p.format, limits))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@profiles.command()
@click.argument("name")
def show(name: str) -> None:
    """Show a profile (a built-in NAME or a .yaml file) with every field resolved."""
    from compactor.profiles import load_profile

    p = load_profile(name)
    click.echo(yaml.safe_dump(p.model_dump(mode="json", by_alias=True), sort_keys=False),
               nl=False)
