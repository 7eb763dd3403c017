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


# What an inconclusive verdict does to the exit code. "fail" by default: a CI gate that
# could not decide must not ship, and its own exit code (5, not 1) lets a job retry it on a
# quieter runner instead of reporting a broken model.
INCONCLUSIVE_POLICIES = ("fail", "warn", "pass")
# compactor.budgets.DEFAULT_SETTLE_S (written out: --help must not import the library;
# tests/cli/test_cli_options.py holds them equal)
DEFAULT_SETTLE_S = 30.0


def inconclusive_option() -> Callable:
    """``--inconclusive fail|warn|pass``, passed as ``inconclusive: str``."""
    return click.option(
        "--inconclusive", "inconclusive", type=click.Choice(INCONCLUSIVE_POLICIES),
        default="fail", show_default=True,
        help="What a verdict that stays undecided does (its interval straddles the limit, "
             "or the host was too busy to trust a fail, after re-measuring): fail = exit 5 "
             "(retry it), warn = exit 0 with a warning, pass = exit 0.")


def settle_option() -> Callable:
    """``--settle-time SECONDS``, passed as ``settle_s: float``."""
    return click.option(
        "--settle-time", "settle_s", type=float, default=DEFAULT_SETTLE_S, show_default=True,
        metavar="SECONDS",
        help="Time cap, per target, for re-measuring latency and speed-up verdicts whose "
             "interval straddles the limit.")


def gate_exit(passed: bool, undecided: int, policy: str) -> int:
    """The exit code of a gate: 1 when a verdict failed; 5 when one stayed inconclusive
    under ``--inconclusive fail``; else 0."""
    from compactor.errors import EXIT_BUDGET, EXIT_INCONCLUSIVE, EXIT_OK

    if not passed:
        return EXIT_BUDGET
    if undecided and policy == "fail":
        return EXIT_INCONCLUSIVE
    return EXIT_OK


def gate_line(passed: bool, undecided: int, policy: str, noun: str = "budgets") -> str:
    """A gate's last line (rich markup) for ``noun`` ("budgets", "checks"), matching
    :func:`gate_exit`'s code."""
    if not passed:
        return f"[bold red]{noun.removesuffix('s')} failed[/]"
    if not undecided:
        return f"[green]all {noun} hold[/]"
    what = {"fail": f"[bold yellow]{noun} inconclusive[/] (exit 5: re-run on a quieter host, "
                    "or raise --settle-time)",
            "warn": f"[yellow]warning[/]: {noun} undecided (--inconclusive warn)",
            "pass": f"[green]all decided {noun} hold[/] (--inconclusive pass)"}[policy]
    return f"{what}; {undecided} verdict(s) inconclusive"

