"""A budget's verdict: what was judged, the limit, the measured figure and the outcome.

A latency or memory verdict is three-valued: ``pass`` or ``fail`` only when the measured
figure's confidence interval lies wholly on one side of the limit, ``inconclusive`` when
it still straddles the limit (or the host was too busy to trust a fail) after
re-measuring; ``detail`` then says why. What an inconclusive verdict does to the exit code
is the caller's policy (``--inconclusive``), not the verdict's.

It sits below the stage so a pass can carry a verdict it judged on its own stage as a typed
field (quantize's accuracy budget), and every layer above reads the same type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["pass", "fail", "inconclusive", "not measured"]


@dataclass(frozen=True)
class Interval:
    """A measured figure and its ~95% confidence interval; ``busy`` when it was measured
    while other processes took the cores (``note`` says how)."""

    value: float
    low: float
    high: float
    busy: bool = False
    note: str = ""
    # the fastest single run, where it is a latency: on a busy host, the one figure a
    # neighbour is least likely to have inflated
    fastest: float | None = None

    @classmethod
    def point(cls, value: float) -> Interval:
        return cls(value, value, value)

    @classmethod
    def from_quiet(cls, quiet: Mapping[str, Sequence[float]] | None, q: str,
                   busy: bool | None, quiet_blocks: int | None, blocks: int | None,
                   others_cores: float | None, fastest: float | None = None
                   ) -> Interval | None:
        """Quantile ``q`` of a latency's noise-robust estimate (``quiet``: per quantile
        [estimate, low, high]) as an Interval; None for records from before it."""
        if not quiet or q not in quiet:
            return None
        est, lo, hi = (float(x) for x in quiet[q])
        note = ""
        if busy:
            note = (f"{quiet_blocks or 0} of {blocks or 0} blocks of runs had the cores to "
                    "themselves" + (f"; other processes took {others_cores:.1f} cores"
                                    if others_cores else ""))
        return cls(est, lo, hi, bool(busy), note, fastest)


@dataclass(frozen=True)
class Verdict:
    budget: str  # e.g. "max_latency_ms.p90", or "limits.memory_mb" for a profile limit
    limit: float
    measured: float | None
    unit: str
    status: Status
    detail: str = ""
    estimate: float | None = None  # labelled estimate, when the figure was not measured
    # the measured figure's ~95% confidence interval, where it has one
    low: float | None = None
    high: float | None = None

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    @property
    def inconclusive(self) -> bool:
        return self.status == "inconclusive"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("estimate", "low", "high"):
            if d[k] is None:
                del d[k]
        return d
