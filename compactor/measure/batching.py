"""The batching hint: which measured batch size serves the most samples per second while
its latency stays within the target's limit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compactor.measure.latency import Latency
    from compactor.profiles import Profile
    from compactor.spec import Budgets


def batching_hint(latency: Mapping[int, Latency], budgets: Budgets | None,
                  profile: Profile) -> dict[str, Any] | None:
    """The batch size with the best measured throughput whose latency stays within the
    target's ``max_latency_ms`` (or, without one, the profile's ``limits.latency_ms`` on p90).

    None when fewer than two batch sizes were measured."""
    if len(latency) < 2:
        return None
    limits: dict[str, float] = {}
    source = "none"
    if budgets is not None and budgets.max_latency_ms is not None:
        limits = {q: v for q in ("p50", "p90", "p99")
                  if (v := getattr(budgets.max_latency_ms, q)) is not None}
        source = "target budget max_latency_ms"
    elif profile.limits.latency_ms is not None:
        limits = {"p90": profile.limits.latency_ms}
        source = f"{profile.name} limits.latency_ms"
    within = "; ".join(f"{q} ≤ {v:g} ms" for q, v in limits.items()) or "no latency limit"
    fits = [lat for lat in latency.values()
            if all(getattr(lat, q) <= v for q, v in limits.items())]
    if not fits:
        return {"batch_size": None, "within": within, "source": source,
                "reason": f"no measured batch size keeps {within}"}
    best = max(fits, key=lambda lat: lat.throughput)
    return {
        "batch_size": best.batch_size,
        "throughput": best.throughput,
        "p50_ms": best.p50,
        "p90_ms": best.p90,
        "within": within,
        "source": source,
        "measured_batch_sizes": sorted(latency),
    }
