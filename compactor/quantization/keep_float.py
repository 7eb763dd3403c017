"""Whether int8 pays: the checks that make the quantize pass ship its float input instead.

int8 is kept only when it is worth shipping. The float input is kept (``outcome:
kept_float``) when any of these holds for the chosen int8 candidate:

- **not resolvably faster**: its paired speed-up over the float input, measured in the
  search's own interleaved timing, does not exceed 1.0 by more than the timing's spread,
  i.e. the lower end of the ~95% confidence interval of the per-round ratios
  (:func:`compactor.quantization.timing.median_lower_bound`) is not above 1.0;
- **mostly float**: the accuracy fallback put nodes holding more than
  ``MAX_FLOAT_MAC_SHARE`` of the model's MACs back in float (nodes the recipe excludes
  are the user's choice and do not count);
- **not smaller**: its files are not smaller than the float input's.

A speed check needs a timing: with ``search_speed: false`` (no candidate timed) it is
skipped and the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_FLOAT_MAC_SHARE = 0.5


@dataclass(frozen=True)
class Decision:
    keep_float: bool
    reasons: tuple[str, ...]
    checks: dict[str, Any] = field(default_factory=dict)  # the figures each check used

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def decide(speedup: float | None, speedup_low: float | None, int8_bytes: int,
           float_bytes: int, float_mac_share: float | None) -> Decision:
    """The checks on the chosen int8 candidate (see the module's docstring)."""
    reasons: list[str] = []
    checks: dict[str, Any] = {"int8_bytes": int8_bytes, "float_bytes": float_bytes}
    if speedup is None:
        checks["speed"] = "not timed (search_speed: false): speed not checked"
    else:
        low = speedup if speedup_low is None else speedup_low
        spread = max(speedup - low, 0.0)
        checks.update(speedup_vs_input=round(speedup, 3), speedup_low=round(low, 3),
                      speedup_spread=round(spread, 3))
        if low <= 1.0:
            reasons.append(
                f"int8 is not resolvably faster than its float input (paired speed-up "
                f"{speedup:.2f}x, timing spread {spread:.2f}: it must exceed 1.0 by more "
                "than the spread)")
    if float_mac_share is not None:
        checks["float_mac_share"] = round(float_mac_share, 4)
        if float_mac_share > MAX_FLOAT_MAC_SHARE:
            reasons.append(f"the accuracy fallback left {float_mac_share:.0%} of the MACs "
                           f"in float (over {MAX_FLOAT_MAC_SHARE:.0%})")
    if int8_bytes >= float_bytes:
        reasons.append(f"the int8 model is not smaller ({_size(int8_bytes)} vs "
                       f"{_size(float_bytes)} float)")
    return Decision(bool(reasons), tuple(reasons), checks)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def float_mac_share(model, sample_shapes: dict[str, tuple[int, ...]],
                    float_nodes: tuple[str, ...]) -> float | None:
    """Share of the model's MACs in ``float_nodes`` (None when MACs cannot be counted)."""
    from compactor.measure.macs import macs_by_node

    macs = macs_by_node(model, sample_shapes)
    if not macs:
        return None
    total = sum(macs.values())
    if total <= 0:
        return None
    return sum(macs.get(n, 0) for n in set(float_nodes)) / total
