"""Budgets → verdicts for every target, and the warnings a run owes its user."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactor.budgets import DEFAULT_SETTLE_S, Gate, Interval, Verdict, evaluate_budgets
from compactor.metrics import Metric
from compactor.profiles import Profile
from compactor.progress import Progress
from compactor.results import StageResult, TargetResult
from compactor.spec import Target


@dataclass(frozen=True)
class Timer:
    """How the judge times models now: ``latency(model, profile, seconds)`` re-measures one
    model's batch-1 latency (a fresh process) and gives each quantile's interval;
    ``paired(reference, model, profile, seconds)`` times two models interleaved in one
    process and gives the model's speed-up over the reference. ``settle_s`` caps the
    re-measuring of each target's undecided verdicts; ``pair_s`` is the first paired
    timing's length."""

    latency: Callable[[Path, Profile, float], Mapping[str, Interval]]
    paired: Callable[[Path, Path, Profile, float], Interval]
    settle_s: float = DEFAULT_SETTLE_S
    pair_s: float = 3.0


def make_timer(feeds: Mapping[str, Any], work_dir: Path, settle_s: float = DEFAULT_SETTLE_S,
               pair_s: float = 3.0) -> Timer:
    """A :class:`Timer` on batch-1 ``feeds`` (the run's latency shape)."""
    from compactor.measure.bench import remeasure_latency
    from compactor.measure.paired import paired_speedup

    def latency(model: Path, prof: Profile, seconds: float) -> Mapping[str, Interval]:
        return remeasure_latency(model, prof, feeds, seconds, work_dir)

    def paired(reference: Path, model: Path, prof: Profile, seconds: float) -> Interval:
        return paired_speedup(reference, model, prof, feeds, seconds)

    return Timer(latency, paired, settle_s, pair_s)


def judge(targets: Sequence[Target], profiles: Sequence[Profile], stages: Sequence[StageResult],
          metric: Metric, timer: Timer | None = None) -> list[TargetResult]:
    """Verdicts per target on the final stage. With a ``timer``, ``min_speedup`` is timed
    paired against the baseline's ONNX form now, and undecided latency and speed-up
    verdicts are re-measured; without one, ``min_speedup`` is not measured."""
    from compactor.measure.batching import batching_hint

    base, final = stages[0], stages[-1]
    out = []
    for target, prof in zip(targets, profiles, strict=True):
        lat, ci = None, None
        if final.latency.get(prof.name) and 1 in final.latency[prof.name]:
            l1 = final.latency[prof.name][1]
            lat = {"p50": l1.p50, "p90": l1.p90, "p99": l1.p99}
            found = {q: iv for q in lat if (iv := l1.interval(q)) is not None}
            ci = found or None
        gate, speedup = _gate(target, prof, base, final, timer, lat is not None)
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
            latency_ci=ci, speedup=speedup, gate=gate,
        )
        if prof is profiles[0]:
            verdicts += pass_verdicts(stages)
        notes = final.latency_notes.get(prof.name, "").splitlines()
        notes += [f"baseline: {n}" for n in base.latency_notes.get(prof.name, "").splitlines()
                  if n.startswith("busy host") and base is not final]
        if 1 not in prof.batch_sizes and target.budgets.max_latency_ms is not None:
            notes.append("latency budgets are judged at batch 1, which this profile does not "
                         "measure; add 1 to its batch_sizes")
        notes += precision_advice(prof, final.precision)
        hint = batching_hint(final.latency.get(prof.name) or {}, target.budgets, prof)
        out.append(TargetResult(prof, verdicts, notes, hint, target.budgets))
    return out


def _gate(target: Target, prof: Profile, base: StageResult, final: StageResult,
          timer: Timer | None, measured: bool) -> tuple[Gate | None, Interval | None]:
    """The gate that re-measures this target's undecided verdicts, and the final model's
    speed-up over the baseline timed paired now (None where it cannot be)."""
    if timer is None or not measured or final.onnx_path is None:
        return None, None
    model = final.onnx_path
    reference = base.onnx_path
    pairable = reference is not None and reference.is_file() and base is not final

    def latency(seconds: float) -> Mapping[str, Interval]:
        return timer.latency(model, prof, seconds)

    def speedup(seconds: float) -> Interval:
        assert reference is not None  # only given when pairable
        return timer.paired(reference, model, prof, seconds)

    gate = Gate(latency=latency, speedup=speedup if pairable else None,
                cap_s=timer.settle_s)
    first = None
    if base is final:  # no pass ran: the final model is the baseline
        first = Interval.point(1.0)
    elif pairable and target.budgets.min_speedup is not None:
        first = gate.spend(speedup, timer.pair_s)
    return gate, first


def pass_verdicts(stages: Sequence[StageResult]) -> list[Verdict]:
    """Budgets a pass judged on its own stage (quantize's accuracy budget, on eval data it
    held out from its search), and the final stage's failed or inconclusive output checks
    (a head worse than predicting the baseline's mean, or within noise of it; the passed
    ones are in the stage's record). They
    are listed with the first target, so a pass that kept its best candidate but missed its
    budget fails the run (exit 1)."""
    own = [s.verdict for s in stages[1:] if s.verdict is not None]
    # the shipped model's heads: one worse than a constant predictor fails the run
    return own + [v for v in stages[-1].checks
                  if len(stages) > 1 and v.status in ("fail", "inconclusive")]


def warn_if_slower(before: StageResult, after: StageResult, progress: Progress,
                   paired: Callable[[Path, Path, str], Interval | None] | None = None,
                   margin: float = 1.02) -> None:
    """Never ship an int8 model slower than its float input without saying so loudly.
    The two are timed paired, interleaved in one process (``paired(before, after,
    profile)`` gives the speed-up and its interval); the warning comes when the speed-up's
    upper bound is under 1 and the figure under 1/``margin``: resolvably slower, not a
    neighbour's noise. Without a way to pair them nothing is said: two stages timed
    minutes apart are not compared."""
    if paired is None or before.onnx_path is None or after.onnx_path is None:
        return
    for prof in after.latency:
        if after.p(prof) is None or before.p(prof) is None:
            continue
        iv = paired(before.onnx_path, after.onnx_path, prof)
        if iv is None or not (iv.high < 1.0 and iv.value < 1.0 / margin):
            continue
        msg = (f"the int8 model is SLOWER than its float input on {prof}: {iv.value:.2f}x "
               f"its speed at batch 1 (95% interval {iv.low:.2f}–{iv.high:.2f}x, timed "
               "paired); consider dropping the pass or another format/op_types")
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
