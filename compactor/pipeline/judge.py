"""Budgets → verdicts for every target, and the warnings a run owes its user."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compactor.budgets import Verdict, evaluate_budgets
from compactor.metrics import Metric
from compactor.profiles import Profile
from compactor.progress import Progress
from compactor.results import StageResult, TargetResult
from compactor.spec import Target


def judge(targets: Sequence[Target], profiles: Sequence[Profile], stages: Sequence[StageResult],
          metric: Metric) -> list[TargetResult]:
    from compactor.measure.batching import batching_hint

    base, final = stages[0], stages[-1]
    out = []
    for target, prof in zip(targets, profiles, strict=True):
        lat = None
        if final.latency.get(prof.name) and 1 in final.latency[prof.name]:
            l1 = final.latency[prof.name][1]
            lat = {"p50": l1.p50, "p90": l1.p90, "p99": l1.p99}
        est = final.estimates.get(prof.name, {}).get("latency")
        verdicts = evaluate_budgets(
            target.budgets,
            size_mb=final.size_bytes / 1e6,
            latency_ms=lat,
            baseline_latency_ms=base.p(prof.name),
            metric_name=metric.name,
            metric_value=final.metric,
            metric_drop=final.drop,
            baseline_metric=base.metric,
            memory_mb=final.runtime.get(prof.name, {}).get("peak_rss_mb"),
            profile=prof,
            latency_estimate_ms=None if est is None else est["latency_ms"],
        )
        if prof is profiles[0]:
            verdicts += pass_verdicts(stages)
        notes = final.latency_notes.get(prof.name, "").splitlines()
        if 1 not in prof.batch_sizes and target.budgets.max_latency_ms is not None:
            notes.append("latency budgets are judged at batch 1, which this profile does not "
                         "measure; add 1 to its batch_sizes")
        notes += precision_advice(prof, final.precision)
        hint = batching_hint(final.latency.get(prof.name) or {}, target.budgets, prof)
        out.append(TargetResult(prof, verdicts, notes, hint, target.budgets))
    return out


def pass_verdicts(stages: Sequence[StageResult]) -> list[Verdict]:
    """Budgets a pass judged on its own stage (quantize's accuracy budget, on eval data it
    held out from its search). They are listed with the first target, so a pass that kept
    its best candidate but missed its budget fails the run (exit 1)."""
    return [s.verdict for s in stages[1:] if s.verdict is not None]


def warn_if_slower(before: StageResult, after: StageResult, progress: Progress,
                   margin: float = 1.02) -> None:
    """Never ship an int8 model slower than its float input without saying so loudly."""
    for prof in after.latency:
        a, b = after.p(prof), before.p(prof)
        if a is not None and b is not None and a > b * margin:
            msg = (f"the int8 model is SLOWER than its float input on {prof}: p50 {a:.3f} ms "
                   f"vs {b:.3f} ms at batch 1 ({b / a:.2f}x); consider dropping the pass or "
                   "another format/op_types")
            after.warnings = (*after.warnings, msg)
            progress.note(f"quantize: {msg}")


def precision_advice(prof: Profile, precision: dict[str, Any]) -> list[str]:
    """A note when the final model's precision is not the one the target runs fastest."""
    from compactor.report.format import fmt_share

    want = prof.preferred_precision
    quantized = bool(precision.get("quantized"))
    if want == "fp16":
        return [f"{prof.name} runs fp16 fastest (tensor cores): " + (
            "int8 QDQ runs as int8 only under TensorRT; with CUDA alone, an fp16 conversion "
            "of the float model may serve better" if quantized else
            "convert the float model to fp16 (e.g. onnxconverter-common's float16) for it")]
    if want == "int8" and not quantized:
        return [f"{prof.name} runs int8 fastest: add a quantize pass"]
    heavy = precision.get("float_heavy_nodes") or []
    if want == "int8" and heavy:
        share = sum(n.get("macs_share", 0.0) for n in heavy)
        return [f"{len(heavy)} compute-heavy node(s) stayed float"
                + (f" ({fmt_share(share)} of MACs)" if share else "")]
    return []
