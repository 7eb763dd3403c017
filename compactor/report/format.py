"""Figures and verdicts as plain text: the one formatting every renderer shares.

The terminal (``cli.render``), report.md and report.html show the same numbers and the
same verdict rows; each picks only its markup, so a figure cannot read one way in a pull
request comment and another in the terminal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["pass", "fail", "not measured"]


def fmt_bytes(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def fmt_count(n: int | None) -> str:
    if n is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_num(v: float) -> str:
    """A limit or a measured figure: 4 significant digits, never scientific notation."""
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def fmt_share(share: float) -> str:
    """A fraction as a percentage that never rounds a part to all or nothing."""
    if 0 < share < 0.001:
        return "<0.1%"
    if 0.999 < share < 1:
        return ">99.9%"
    return f"{share * 100:.1f}%".replace(".0%", "%")


def fmt_metric(name: str, v: float) -> str:
    return f"{v * 100:.2f}%" if name in ("accuracy", "top5") else f"{v:.4g}"


def fmt_delta(name: str, d: float) -> str:
    return f"{d * 100:+.2f} pt" if name in ("accuracy", "top5") else f"{d:+.4g}"


def fmt_ms(v: float) -> str:
    """A latency in a chart or a card: as many digits as its size deserves."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


# --------------------------------------------------------------------------- verdicts


class VerdictLike(Protocol):
    """What a verdict row is made from: a run's ``budgets.Verdict`` or a manifest's
    ``VerdictRecord`` alike."""

    @property
    def budget(self) -> str: ...
    @property
    def limit(self) -> float: ...
    @property
    def measured(self) -> float | None: ...
    @property
    def unit(self) -> str: ...
    @property
    def status(self) -> Status: ...
    @property
    def detail(self) -> str: ...
    @property
    def estimate(self) -> float | None: ...


@dataclass(frozen=True)
class VerdictRow:
    """One verdict's cells as plain text (nothing escaped: the renderer does that)."""

    target: str
    budget: str
    limit: str  # "5 ms"
    measured: str | None  # "1.234 ms"; None when this host could not measure it
    estimate: str | None  # "≥ 0.00134 ms", the labelled estimate of a figure not measured
    status: Status
    detail: str
    relation: str  # "≥" for a floor (min_*), "≤" for a ceiling

    @property
    def measured_text(self) -> str:
        """The measured cell, saying so when it was not measured."""
        if self.measured is not None:
            return self.measured
        return "not measured" + (f" (estimate {self.estimate})" if self.estimate else "")

    @property
    def integrity(self) -> bool:
        """A file-hash check (``integrity.*``) rather than a budget."""
        return self.budget.startswith("integrity.")


def verdict_row(target: str, v: VerdictLike) -> VerdictRow:
    return VerdictRow(
        target=target,
        budget=v.budget,
        limit=f"{fmt_num(v.limit)} {v.unit}",
        measured=None if v.measured is None else f"{fmt_num(v.measured)} {v.unit}",
        estimate=None if v.estimate is None else f"≥ {v.estimate:.3g} {v.unit}",
        status=v.status,
        detail=v.detail,
        relation="≥" if v.budget.startswith("min_") else "≤",
    )


def verdict_rows(groups: Iterable[tuple[str, Iterable[VerdictLike]]]) -> list[VerdictRow]:
    """Rows for ``(target, verdicts)`` pairs, in order."""
    return [verdict_row(target, v) for target, vs in groups for v in vs]
