"""Bandwidths and durations as people write them: ``10Mbps``, ``1.5MB/s``, ``40ms``.

Both parsers want a unit: a bare number is ambiguous (bits or bytes? ms or s?) and is
rejected with a hint, as is any unit they do not know.
"""

from __future__ import annotations

import re

from compactor.errors import UsageError

BANDWIDTH_EXAMPLES = "10Mbps, 10Mbit/s, 500kbps, 1.5MB/s, 1Gbps"
DURATION_EXAMPLES = "40ms, 0.04s, 500us"

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "ki": 1024.0, "mi": 1024.0**2, "gi": 1024.0**3}


def parse_bandwidth(text: str | float | int, what: str = "bandwidth") -> float:
    """Bits per second. ``b``/``bit`` are bits, an upper-case ``B``/``byte`` is bytes;
    ``k``/``M``/``G`` are powers of 1000, ``Ki``/``Mi``/``Gi`` of 1024."""
    if isinstance(text, (bool, int, float)):
        raise UsageError(
            f"{what} {text!r} has no unit",
            f"write it with a unit, e.g. {BANDWIDTH_EXAMPLES}",
        )
    m = re.fullmatch(_NUMBER + r"(.*?)\s*", str(text))
    if not m or not m.group(2):
        raise UsageError(
            f"{what} {text!r} has no unit" if m else f"{what} {text!r} is not a bandwidth",
            f"write a number and a unit, e.g. {BANDWIDTH_EXAMPLES}",
        )
    value, unit = float(m.group(1)), m.group(2)
    per_s = _bandwidth_unit(unit)
    if per_s is None:
        raise UsageError(
            f"{what} {text!r}: unknown unit {unit!r}",
            f"use bits or bytes per second, e.g. {BANDWIDTH_EXAMPLES}",
        )
    bps = value * per_s
    if bps <= 0:
        raise UsageError(f"{what} {text!r} must be above zero", f"e.g. {BANDWIDTH_EXAMPLES}")
    return bps


def _bandwidth_unit(unit: str) -> float | None:
    """Bits per second in one ``unit``, or None for a unit this parser does not know."""
    m = re.fullmatch(r"([kKmMgGtT]i?)?(B|b|bytes?|bits?)(/s|ps)", unit.replace(" ", ""))
    if not m:
        return None
    bits = 8.0 if m.group(2) in ("B", "byte", "bytes") else 1.0
    return bits * _PREFIX[(m.group(1) or "").lower()]


def parse_duration_ms(text: str | float | int, what: str = "duration") -> float:
    """Milliseconds, from ``40ms``, ``0.04s``, ``500us`` (or ``µs``)."""
    if isinstance(text, (bool, int, float)):
        raise UsageError(f"{what} {text!r} has no unit",
                         f"write it with a unit, e.g. {DURATION_EXAMPLES}")
    m = re.fullmatch(_NUMBER + r"(.*?)\s*", str(text))
    if not m or not m.group(2):
        raise UsageError(
            f"{what} {text!r} has no unit" if m else f"{what} {text!r} is not a duration",
            f"write a number and a unit, e.g. {DURATION_EXAMPLES}",
        )
    scale = {"s": 1000.0, "sec": 1000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3}.get(m.group(2))
    if scale is None:
        raise UsageError(f"{what} {text!r}: unknown unit {m.group(2)!r}",
                         f"use s, ms or us, e.g. {DURATION_EXAMPLES}")
    return float(m.group(1)) * scale


def fmt_bandwidth(bps: float) -> str:
    for unit, scale in (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.4g} {unit}"
    return f"{bps:.4g} bps"
