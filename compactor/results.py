"""What a run measured: one StageResult per stage, one TargetResult per target profile.

They are typed here, below the artifact, the pipeline and check, so each of those reads the
same fields; the manifest is their serialized form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compactor.measure.latency import Latency
    from compactor.profiles import Profile
    from compactor.spec import Budgets
    from compactor.verdict import Verdict


@dataclass(frozen=True)
class OutputResult:
    """One model output on one stage: its metric value (None where the recipe's metric
    does not score it), and its error against the baseline's output next to the error of
    predicting the baseline's per-element mean (None where that means nothing: the
    baseline output does not vary, or it is the baseline)."""

    name: str
    shape: tuple[int, ...]  # the first eval batch's
    metric: str | None = None
    value: float | None = None
    mse: float | None = None
    constant_mse: float | None = None
    note: str | None = None  # how the metric treated the output (mixed units...)
    # mse / constant_mse: its ~95% interval (a bootstrap over the eval samples) and what it
    # says: pass (better than the constant), fail (worse), inconclusive (within noise)
    ratio_low: float | None = None
    ratio_high: float | None = None
    check: str | None = None
    check_part: str = ""  # the unit group the check judged (an output mixing units)

    @property
    def broken(self) -> bool:
        """Worse than predicting the baseline's mean for every sample, beyond noise."""
        return self.check == "fail"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": list(self.shape)}
        if self.metric is not None:
            d.update(metric=self.metric, value=self.value)
        if self.mse is not None:
            d.update(mse=self.mse, constant_mse=self.constant_mse, broken=self.broken,
                     ratio_interval=[self.ratio_low, self.ratio_high], check=self.check)
            if self.check_part:
                d["check_part"] = self.check_part
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class StageResult:
    name: str
    kind: str
    lineage: tuple[str, ...]
    record: dict[str, Any]
    metric: float
    delta: float  # value - baseline value
    drop: float  # how much worse than baseline (positive = worse)
    size_bytes: int
    params: int
    macs: int | None
    latency: dict[str, dict[int, Latency] | None]  # profile -> batch -> Latency
    runtime: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_notes: dict[str, str] = field(default_factory=dict)
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # labelled estimates
    precision: dict[str, Any] = field(default_factory=dict)  # int8 vs float ops
    eval_export: dict[str, Any] | None = None
    seconds: float = 0.0  # evaluating the stage
    onnx_path: Path | None = None
    warnings: tuple[str, ...] = ()  # what the pass (or the run, about it) warns of
    verdict: Verdict | None = None  # a budget the pass judged on its own stage
    pass_seconds: float | None = None  # running the pass that made the stage
    # the symbolic axes' sizes latency (and MACs) were measured at: data.LatencyShape
    latency_shape: dict[str, Any] | None = None
    # every output of the model, by name, in the graph's order
    outputs: tuple[OutputResult, ...] = ()
    # checks the run made on the stage's outputs (a head worse than a constant predictor)
    checks: tuple[Verdict, ...] = ()

    def p(self, profile: str, q: str = "p50", batch: int = 1) -> float | None:
        lat = self.latency.get(profile)
        if not lat or batch not in lat:
            return None
        return getattr(lat[batch], q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "lineage": list(self.lineage),
            "record": self.record,
            "metric": self.metric,
            "delta": self.delta,
            "drop": self.drop,
            "size_bytes": self.size_bytes,
            "params": self.params,
            "macs": self.macs,
            "latency_ms": {
                prof: (None if lat is None else {str(b): v.to_dict() for b, v in lat.items()})
                for prof, lat in self.latency.items()
            },
            "runtime": {
                prof: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                for prof, r in self.runtime.items()
            },
            "latency_notes": self.latency_notes,
            "estimates": self.estimates,
            "precision": self.precision,
            "eval_export": self.eval_export,
            "seconds": round(self.seconds, 3),
            "pass_seconds": self.pass_seconds,
            "warnings": list(self.warnings),
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
            **({} if self.latency_shape is None else {"latency_shape": self.latency_shape}),
            **({"outputs": {o.name: o.to_dict() for o in self.outputs}} if self.outputs
               else {}),
            **({"checks": [v.to_dict() for v in self.checks]} if self.checks else {}),
        }


@dataclass
class TargetResult:
    profile: Profile
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)
    batching: dict[str, Any] | None = None  # best-throughput batch size within the limit
    budgets: Budgets | None = None  # what the verdicts judged, kept so `check` can re-judge

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "settings": self.profile.model_dump(mode="json", by_alias=True),
            "passed": self.passed,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "notes": self.notes,
            "batching": self.batching,
            "budgets": None if self.budgets is None
            else self.budgets.model_dump(mode="json", exclude_none=True),
        }
