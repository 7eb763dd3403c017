"""Click option types shared by several commands: one parser per idea."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


class DimType(click.ParamType):
    """``NAME=N``: the size of a named input axis, N a positive integer. Parses to a
    ``(name, size)`` pair; :func:`dim_option` collects the pairs into a dict."""

    name = "NAME=N"

    def __init__(self, example: str = "--dim seq=128") -> None:
        self.example = example

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        from compactor.errors import UsageError

        if isinstance(value, tuple):  # already parsed (a default, or a second pass)
            return value
        text = str(value)
        name, _, size = text.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            # A UsageError, not click's BadParameter: every command shows it the same way,
            # with a hint and exit code 2.
            raise UsageError(
                f"--dim {text!r}: expected NAME=N with N a positive integer", f"e.g. {self.example}"
            )
        return name, int(size)


def _as_dict(
    _ctx: click.Context, _param: click.Parameter, value: tuple[tuple[str, int], ...]
) -> dict[str, int]:
    return dict(value)  # a name given twice: the last size wins


def dim_option(help: str, example: str = "--dim seq=128") -> Callable:
    """``--dim NAME=N`` (repeatable), passed to the command as ``dims: dict[str, int]``."""
    return click.option(
        "--dim",
        "dims",
        type=DimType(example),
        multiple=True,
        metavar="NAME=N",
        callback=_as_dict,
        help=help,
    )
