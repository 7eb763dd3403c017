"""A budget's verdict: what was judged, the limit, the measured figure and the outcome.

It sits below the stage so a pass can carry a verdict it judged on its own stage as a typed
field (quantize's accuracy budget), and every layer above reads the same type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["pass", "fail", "not measured"]


@dataclass(frozen=True)
class Verdict:
    budget: str  # e.g. "max_latency_ms.p90", or "limits.memory_mb" for a profile limit
    limit: float
    measured: float | None
    unit: str
    status: Status
    detail: str = ""
    estimate: float | None = None  # labelled estimate, when the figure was not measured

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["estimate"] is None:
            del d["estimate"]
        return d
