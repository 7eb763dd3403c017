"""Budgets → verdicts, per target, on the final stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from compactor.recipe import Budgets

Status = Literal["pass", "fail", "not measured"]


@dataclass(frozen=True)
class Verdict:
    budget: str  # e.g. "max_latency_ms.p90"
    limit: float
    measured: float | None
    unit: str
    status: Status
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, limit: float, measured: float | None, unit: str, ok_if_le: bool,
           detail: str = "") -> Verdict:
    if measured is None:
        return Verdict(name, limit, None, unit, "not measured", detail)
    ok = measured <= limit if ok_if_le else measured >= limit
    return Verdict(name, limit, measured, unit, "pass" if ok else "fail", detail)


def evaluate_budgets(
    budgets: Budgets,
    *,
    size_mb: float,
    latency_ms: dict[str, float] | None,
    baseline_latency_ms: float | None,
    metric_name: str,
    metric_value: float | None,
    metric_drop: float | None,
    baseline_metric: float | None,
) -> list[Verdict]:
    """Verdicts for one target. ``latency_ms`` holds p50/p90/p99 at batch 1 (or None when
    the profile could not be measured on this host)."""
    out: list[Verdict] = []
    if budgets.max_size_mb is not None:
        out.append(_check("max_size_mb", budgets.max_size_mb, size_mb, "MB", True))
    if budgets.max_latency_ms is not None:
        for q in ("p50", "p90", "p99"):
            limit = getattr(budgets.max_latency_ms, q)
            if limit is not None:
                got = None if latency_ms is None else latency_ms[q]
                out.append(_check(f"max_latency_ms.{q}", limit, got, "ms", True, "batch 1"))
    if budgets.max_accuracy_drop is not None:
        drop = budgets.max_accuracy_drop
        allowed = drop.allowed(baseline_metric or 0.0)
        detail = f"{metric_name}: {baseline_metric:.4g} → {metric_value:.4g}" if (
            metric_value is not None and baseline_metric is not None) else ""
        if drop.relative:
            detail += f" (allowed {drop.value * 100:g}% of baseline)"
        out.append(_check("max_accuracy_drop", allowed, metric_drop, metric_name, True, detail))
    if budgets.min_speedup is not None:
        speedup = None
        if latency_ms is not None and baseline_latency_ms:
            speedup = baseline_latency_ms / latency_ms["p50"]
        out.append(_check("min_speedup", budgets.min_speedup, speedup, "x", False,
                          "p50 at batch 1 vs baseline, same run"))
    return out
