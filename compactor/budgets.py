"""Budgets → verdicts, per target, on the final stage.

A target's verdicts come from its recipe budgets (``max_size_mb``, ``max_latency_ms``,
``max_memory_mb``, ``max_accuracy_drop``, ``min_speedup``) and from its profile's limits
(``limits.memory_mb``, ``limits.model_size_mb``), which hold whatever the recipe says.
A figure this host could not measure gives "not measured", never a pass or a fail on an
estimate; the estimate is shown beside it.

Latency and speed-up verdicts are three-valued (:func:`decide`): a figure comes with its
~95% interval, and the verdict is ``pass`` or ``fail`` only when the interval lies wholly
on one side of the limit. A latency measured on a busy host may pass (a neighbour only
slows a model down, so the quiet figure is lower still) but never fails. An undecided
verdict is re-measured (:class:`Gate`: longer each time, within a time cap) and only then
called ``inconclusive``, with the reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from compactor.errors import BudgetFailed, UsageError, did_you_mean
from compactor.spec import Budgets, Drop, LatencyBudget, Target
from compactor.verdict import Interval, Status, Verdict

if TYPE_CHECKING:
    from compactor.profiles import Profile
    from compactor.stage import Stage


# Every key `--budget KEY=VALUE` accepts, with what it means.
BUDGET_KEYS = {
    "max_size_mb": "model file size, MB",
    "max_latency_ms": "p50 latency at batch 1, ms (same as max_latency_ms.p50)",
    "max_latency_ms.p50": "p50 latency at batch 1, ms",
    "max_latency_ms.p90": "p90 latency at batch 1, ms",
    "max_latency_ms.p99": "p99 latency at batch 1, ms",
    "max_memory_mb": "peak RSS of the measuring process, MB",
    "max_accuracy_drop": "metric drop vs baseline: absolute (0.01) or relative (2%)",
    "min_speedup": "baseline p50 / final p50 at batch 1, timed paired in one process",
}


# --------------------------------------------------------------------------- three-valued


# On a busy host a latency fails only when even its fastest run was this many times over.
BUSY_FAIL_FACTOR = 2.0
# How long a gate may spend re-measuring undecided verdicts, in all, by default; and how
# long the first re-measurement lasts (each next one twice as long, within what is left).
DEFAULT_SETTLE_S = 30.0
FIRST_REMEASURE_S = 2.0
# One re-measurement takes at least this long (a paired timing: six rounds of two ~0.1 s
# blocks); a cap below it could not take one.
MIN_SETTLE_S = 1.0


@dataclass(frozen=True)
class Gate:
    """How a gate settles an undecided verdict: ``latency(seconds)`` re-times the model for
    about that long and gives an interval per quantile; ``speedup(seconds)`` re-times the
    paired ratio against the reference. Both stop within ``cap_s`` in all (``clock`` says
    how much is spent; tests give a fake one)."""

    latency: Callable[[float], Mapping[str, Interval]] | None = None
    speedup: Callable[[float], Interval] | None = None
    cap_s: float = DEFAULT_SETTLE_S
    clock: Callable[[], float] = time.monotonic
    _spent: list[float] = field(default_factory=lambda: [0.0])

    @property
    def left_s(self) -> float:
        return self.cap_s - self._spent[0]

    def spend(self, fn: Callable[[float], Any], seconds: float) -> Any:
        """``fn(seconds)``, counted against the cap as the longer of the time it took and
        the time it was given (so a measurement that returns early still ends the loop)."""
        t0 = self.clock()
        try:
            return fn(seconds)
        finally:
            self._spent[0] += max(self.clock() - t0, seconds)


def check_time_cap(cap_s: float, one_measurement_s: float, setting: str) -> None:
    """A cap too short to take a single measurement is a usage error naming the setting."""
    if not cap_s > 0 or cap_s < one_measurement_s:
        raise UsageError(
            f"{setting} {cap_s:g}: too short to take one measurement (re-measuring a "
            f"latency or a paired speed-up takes at least {one_measurement_s:g} s)",
            f"give {setting} at least {one_measurement_s:g} (default {DEFAULT_SETTLE_S:g})")


def decide(name: str, limit: float, iv: Interval, unit: str, at_most: bool,
           detail: str = "") -> Verdict:
    """``pass``/``fail`` when ``iv`` lies wholly on one side of ``limit``, else
    ``inconclusive`` with the reason. ``at_most``: the figure must stay at or below the
    limit (latency); else at or above it (speed-up). A busy-host interval may pass an
    at-most budget (the quiet figure is lower still) but fails it only when even the
    fastest single run took more than ``BUSY_FAIL_FACTOR`` times the limit."""
    cut = (f"{iv.value:.4g} {unit} (95% interval {iv.low:.4g}–{iv.high:.4g})")
    if at_most:
        over = iv.low > limit and (not iv.busy or (
            iv.fastest is not None and iv.fastest > BUSY_FAIL_FACTOR * limit))
        status = "pass" if iv.high <= limit else "fail" if over else "inconclusive"
    else:
        status = ("pass" if iv.low >= limit else
                  "fail" if iv.high < limit else "inconclusive")
    why = ""
    if status == "inconclusive":
        why = (f"measured on a busy host ({iv.note or 'other processes took the cores'}): "
               f"{cut} is over the limit, but a quiet host may be under it"
               if iv.busy and iv.low > limit else
               f"{cut} straddles the limit {limit:g} {unit}")
    parts = [p for p in (detail, why) if p]
    return Verdict(name, limit, iv.value, unit, status, "; ".join(parts), None,
                   iv.low, iv.high)


def settle(verdict: Verdict, remeasure: Callable[[float], Interval | None] | None, gate: Gate,
           at_most: bool, detail: str = "") -> Verdict:
    """Re-measure an inconclusive ``verdict`` (each time about twice as long, within the
    gate's cap) until it decides; still undecided, it says how long it tried."""
    if verdict.status != "inconclusive" or remeasure is None:
        return verdict
    seconds, tries = FIRST_REMEASURE_S, 0
    while verdict.status == "inconclusive" and gate.left_s > 0:
        iv = gate.spend(remeasure, min(seconds, gate.left_s))
        if iv is None:  # this host could not measure it again
            break
        tries += 1
        verdict = decide(verdict.budget, verdict.limit, iv, verdict.unit, at_most, detail)
        seconds *= 2
    if verdict.status == "inconclusive":
        return replace(verdict, detail=f"{verdict.detail}; re-measured {tries} time(s) within "
                       f"the {gate.cap_s:g} s cap")
    return replace(verdict, detail=f"{verdict.detail}; settled after re-measuring "
                   f"{tries} time(s)" if verdict.detail else
                   f"settled after re-measuring {tries} time(s)")


def _check(name: str, limit: float, measured: float | None, unit: str, ok_if_le: bool,
           detail: str = "", estimate: float | None = None) -> Verdict:
    if measured is None:
        return Verdict(name, limit, None, unit, "not measured", detail, estimate)
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
    memory_mb: float | None = None,
    profile: Profile | None = None,
    latency_estimate_ms: float | None = None,
    latency_ci: Mapping[str, Interval] | None = None,
    speedup: Interval | None = None,
    gate: Gate | None = None,
) -> list[Verdict]:
    """Verdicts for one target. ``latency_ms`` holds p50/p90/p99 at batch 1 (or None when
    the profile could not be measured on this host); ``latency_ci`` the noise-robust
    estimate of each with its interval, which latency budgets are judged on where given;
    ``memory_mb`` is the peak RSS of the process that measured it. ``speedup`` is the
    final model's speed-up over the baseline timed paired in one process (without it,
    ``min_speedup`` is not measured: two figures timed at different moments are not a
    ratio to judge). ``gate`` re-measures undecided verdicts. ``profile`` adds its limits
    as verdicts. ``baseline_latency_ms`` is kept for callers; it is not judged on."""
    del baseline_latency_ms  # a speed-up from two separate timings is never judged
    gate = gate or Gate()
    out: list[Verdict] = []
    if budgets.max_size_mb is not None:
        out.append(_check("max_size_mb", budgets.max_size_mb, size_mb, "MB", True))
    if budgets.max_latency_ms is not None:
        out += _latency_verdicts(budgets.max_latency_ms, latency_ms, latency_estimate_ms,
                                 latency_ci, gate)
    if budgets.max_memory_mb is not None:
        out.append(_check("max_memory_mb", budgets.max_memory_mb, memory_mb, "MB", True,
                          "peak RSS of the measuring process"))
    if budgets.max_accuracy_drop is not None:
        out.append(_accuracy_verdict(budgets.max_accuracy_drop, metric_name, metric_value,
                                     metric_drop, baseline_metric))
    if budgets.min_speedup is not None:
        out.append(_speedup_verdict(budgets.min_speedup, speedup, gate))
    if profile is not None:
        out += _limit_verdicts(profile, size_mb, memory_mb)
    return out


SPEEDUP_DETAIL = "p50 at batch 1 vs baseline, timed paired in one process"


def _speedup_verdict(limit: float, speedup: Interval | None, gate: Gate) -> Verdict:
    if speedup is None:
        return Verdict("min_speedup", limit, None, "x", "not measured",
                       "the baseline and the final model were not timed paired")
    v = decide("min_speedup", limit, speedup, "x", False, SPEEDUP_DETAIL)
    return settle(v, gate.speedup, gate, False, SPEEDUP_DETAIL)


def _latency_verdicts(limits: LatencyBudget, latency_ms: Mapping[str, float] | None,
                      estimate_ms: float | None, ci: Mapping[str, Interval] | None,
                      gate: Gate) -> list[Verdict]:
    """One verdict per quantile that has a limit; an unmeasured p50 shows the estimate."""
    out = []
    for q in ("p50", "p90", "p99"):
        limit = getattr(limits, q)
        if limit is None:
            continue
        name = f"max_latency_ms.{q}"
        got = None if latency_ms is None else latency_ms[q]
        if got is not None and ci is not None and q in ci:
            detail = "batch 1; quiet-block estimate"
            v = decide(name, limit, ci[q], "ms", True, detail)
            remeasure = None if gate.latency is None else (
                lambda s, q=q: gate.latency(s).get(q))  # type: ignore[misc] - checked above
            out.append(settle(v, remeasure, gate, True, detail))
            continue
        est = estimate_ms if q == "p50" else None
        detail = "batch 1" if got is not None else (
            "batch 1; not measured on this host" + (
                "; estimate is a roofline lower bound" if est is not None else ""))
        out.append(_check(name, limit, got, "ms", True, detail, est))
    return out


def _accuracy_verdict(drop: Drop, metric_name: str, metric_value: float | None,
                      metric_drop: float | None, baseline_metric: float | None) -> Verdict:
    allowed = drop.allowed(baseline_metric or 0.0)
    detail = f"{metric_name}: {baseline_metric:.4g} → {metric_value:.4g}" if (
        metric_value is not None and baseline_metric is not None) else ""
    if drop.relative:
        detail += f" (allowed {drop.value * 100:g}% of baseline)"
    return _check("max_accuracy_drop", allowed, metric_drop, metric_name, True, detail)


def _limit_verdicts(profile: Profile, size_mb: float, memory_mb: float | None
                    ) -> list[Verdict]:
    """The profile's own limits (whatever the recipe's budgets say)."""
    out = []
    lim = profile.limits
    if lim.model_size_mb is not None:
        out.append(_check("limits.model_size_mb", lim.model_size_mb, size_mb, "MB", True,
                          f"{profile.name} profile limit"))
    if lim.memory_mb is not None:
        out.append(_check("limits.memory_mb", lim.memory_mb, memory_mb, "MB", True,
                          f"{profile.name} profile limit; peak RSS of the measuring "
                          "process"))
    return out


# --------------------------------------------------------------------------- before the passes


@dataclass(frozen=True)
class SizeFloor:
    """The least room a model's weights can take: the weight elements every stage keeps
    (matrices and kernels only; biases and norm vectors an exporter may fold away are left
    out) and the fewest bytes each takes. Passes shrink it (``Pass.size_floor``)."""

    weights: float
    bytes_per_weight: float

    @property
    def mb(self) -> float:
        return self.weights * self.bytes_per_weight / 1e6


def weight_floor(stage: Stage) -> SizeFloor | None:
    """The baseline's :class:`SizeFloor`, from its tensors' shapes (no data is read)."""
    if stage.module is not None:
        seen: set[int] = set()
        n = nbytes = 0
        for t in stage.module.parameters():  # shared (tied) weights once
            if t.dim() >= 2 and id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
                nbytes += t.numel() * t.element_size()
        return SizeFloor(n, nbytes / n) if n else None
    if stage.onnx_path is None:
        return None
    import onnx
    from onnx import helper

    model = onnx.load(str(stage.onnx_path), load_external_data=False)
    n = nbytes = 0
    for init in model.graph.initializer:
        if len(init.dims) < 2:
            continue
        count = 1
        for d in init.dims:
            count *= int(d)
        try:
            item = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        n += count
        nbytes += count * item
    return SizeFloor(n, nbytes / n) if n else None


class _ShrinksWeights(Protocol):
    name: str

    def size_floor(self, floor: SizeFloor) -> SizeFloor | None: ...


def reachable_floor(baseline: SizeFloor | None,
                    passes: Iterable[_ShrinksWeights]) -> SizeFloor | None:
    """The smallest the passes, in order, could make ``baseline``'s weights; None when a
    pass cannot say (then nothing is judged early)."""
    floor = baseline
    for p in passes:
        if floor is None:
            return None
        floor = p.size_floor(floor)
    return floor


def judge_before_passes(targets: Sequence[Target], profiles: Sequence[Profile],
                        baseline: SizeFloor | None, reachable: SizeFloor | None) -> None:
    """Raise BudgetFailed, before any pass runs, when even the smallest model the passes
    could reach breaks a target's size or memory limit (the process measuring a model holds
    its weights, so its peak memory is at least their size)."""
    if baseline is None or reachable is None:
        return
    for target, prof in zip(targets, profiles):
        limits = [
            ("max_size_mb", target.budgets.max_size_mb, "model size"),
            ("limits.model_size_mb", prof.limits.model_size_mb, "model size"),
            ("max_memory_mb", target.budgets.max_memory_mb, "peak memory"),
            ("limits.memory_mb", prof.limits.memory_mb, "peak memory"),
        ]
        for name, limit, what in limits:
            if limit is not None and reachable.mb > limit:
                raise BudgetFailed(
                    f"target {prof.name}: {name} is {limit:g} MB, and no run of these passes "
                    f"can get there: the baseline's weights are {baseline.mb:.3g} MB and the "
                    f"smallest the passes could reach is an estimated {reachable.mb:.3g} MB "
                    f"({what} at least that); stopped before any pass ran",
                    "prune harder, add '- quantize: {}' (int8), distill into a smaller "
                    f"student, or raise {name}",
                )


# --------------------------------------------------------------------------- overrides


def parse_budget_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["max_latency_ms.p90=5", "max_accuracy_drop=2%"]`` → a Budgets-shaped dict.

    Raises UsageError for an unknown key (with a did-you-mean) or a malformed value."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"--budget {pair!r}: expected KEY=VALUE",
                             "e.g. --budget max_latency_ms.p90=5 --budget max_accuracy_drop=1%")
        if key not in BUDGET_KEYS:
            hint = did_you_mean(key, BUDGET_KEYS)
            raise UsageError(f"--budget {pair!r}: unknown budget {key!r}",
                             (hint + " " if hint else "") + "budgets: " + ", ".join(BUDGET_KEYS))
        if key == "max_accuracy_drop":
            parsed: Any = value if value.endswith("%") else _number(pair, value)
        else:
            parsed = _number(pair, value)
        if key.startswith("max_latency_ms"):
            q = key.partition(".")[2] or "p50"
            out.setdefault("max_latency_ms", {})[q] = parsed
        else:
            out[key] = parsed
    return out


def _number(pair: str, value: str) -> float:
    try:
        v = float(value.removesuffix("x"))
    except ValueError:
        raise UsageError(f"--budget {pair!r}: {value!r} is not a number",
                         "budget values are numbers, e.g. max_size_mb=1.5") from None
    if v <= 0 and not pair.startswith("max_accuracy_drop"):
        raise UsageError(f"--budget {pair!r}: must be positive", "e.g. max_size_mb=1.5")
    return v


def merge_budgets(base: Budgets, overrides: Mapping[str, Any]) -> Budgets:
    """``base`` with ``overrides`` (from :func:`parse_budget_overrides`) applied on top."""
    from pydantic import ValidationError

    raw = base.model_dump(mode="json", exclude_none=True)
    for k, v in overrides.items():
        if k == "max_latency_ms":
            raw["max_latency_ms"] = {**(raw.get("max_latency_ms") or {}), **v}
        else:
            raw[k] = v
    try:
        return Budgets.model_validate(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"--budget {loc}: {err['msg']}", "see `compactor check --help`") from None


# --------------------------------------------------------------------------- batching


# --------------------------------------------------------------------------- regressions


def parse_percent(text: str) -> float:
    """``"5%"`` or ``"0.05"`` → 0.05."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", text)
    if not m:
        raise UsageError(f"{text!r} is not a percentage", "write e.g. 5% or 0.05")
    v = float(m.group(1))
    return v / 100.0 if m.group(2) else v


def regressions(old: Mapping[str, Any], new: Mapping[str, Any], max_regression: float,
                profiles: Iterable[str] | None = None,
                paired: Mapping[str, Interval] | None = None,
                gate: Gate | None = None,
                repair: Callable[[str, float], Interval] | None = None) -> list[Verdict]:
    """Compare two manifests' final stages: size, p50 latency at batch 1 for each profile
    both measured, and the metric. A regression beyond ``max_regression`` (relative) fails.

    Latency is judged on ``paired[profile]`` where given: the new model's speed-up over the
    old one, both timed interleaved in one process (``repair(profile, seconds)`` times it
    again to settle an undecided verdict, within ``gate``'s cap). Without it the two
    manifests' figures were timed at different moments, maybe on different hosts: within
    the limit passes, beyond it is inconclusive, never a fail."""
    o, n = old["stages"][-1], new["stages"][-1]
    out: list[Verdict] = []
    pct = max_regression * 100

    def worse(name: str, before: float, after: float, unit: str, detail: str,
              higher_is_worse: bool = True) -> Verdict:
        if before == 0:
            change = 0.0 if after == before else float("inf")
        else:
            change = (after - before) / abs(before)
        if not higher_is_worse:
            change = -change
        status: Status = "fail" if change > max_regression + 1e-12 else "pass"
        return Verdict(f"regression.{name}", pct, round(change * 100, 3), "%", status,
                       f"{detail}: {before:.4g} → {after:.4g} {unit}")

    out.append(worse("size", o["size_bytes"] / 1e6, n["size_bytes"] / 1e6, "MB", "model size"))
    wanted = set(profiles) if profiles is not None else None
    for prof, lat in (n.get("latency_ms") or {}).items():
        if wanted is not None and prof not in wanted:
            continue
        name = f"latency_p50.{prof}"
        if paired is not None and prof in paired:
            out.append(_paired_regression(name, pct, paired[prof], gate or Gate(),
                                          None if repair is None else
                                          (lambda s, p=prof: repair(p, s))))
            continue
        before = ((o.get("latency_ms") or {}).get(prof) or {}).get("1")
        after = (lat or {}).get("1")
        if before is None or after is None:
            out.append(Verdict(f"regression.{name}", pct, None, "%", "not measured",
                               "p50 at batch 1 missing in one of the two artifacts"))
            continue
        v = worse(name, before["p50"], after["p50"], "ms", f"{prof} p50 at batch 1")
        if v.status == "fail":
            v = replace(v, status="inconclusive", detail=v.detail + "; from the two manifests, "
                        "timed at different moments: --remeasure times both models paired")
        out.append(v)
    out.append(_metric_regression(old, new, o, n, max_regression, pct))
    return out


def _paired_regression(name: str, pct: float, speedup: Interval, gate: Gate,
                       repair: Callable[[float], Interval] | None) -> Verdict:
    """A latency regression from the paired speed-up of new over old: (1/speed-up - 1)."""
    detail = "p50 at batch 1, old and new model timed paired in one process"

    def as_change(iv: Interval) -> Interval:
        return Interval(100 * (1 / iv.value - 1), 100 * (1 / iv.high - 1),
                        100 * (1 / iv.low - 1), iv.busy, iv.note)

    v = decide(f"regression.{name}", pct, as_change(speedup), "%", True, detail)
    return settle(v, None if repair is None else (lambda s: as_change(repair(s))), gate, True,
                  detail)


def _metric_regression(old: Mapping[str, Any], new: Mapping[str, Any], o: Mapping[str, Any],
                       n: Mapping[str, Any], max_regression: float, pct: float) -> Verdict:
    metric = new["metric"]["name"]
    if metric != old["metric"]["name"]:
        return Verdict(f"regression.{metric}", pct, None, "%", "not measured",
                       f"the old artifact measured {old['metric']['name']}, not {metric}")
    higher_better = new["metric"].get("higher_is_better", True)
    b, a = o["metric"], n["metric"]
    change = (b - a) if higher_better else (a - b)
    rel = change / (abs(b) or 1.0)
    status: Status = "fail" if rel > max_regression + 1e-12 else "pass"
    return Verdict(f"regression.{metric}", pct, round(rel * 100, 3), "%", status,
                   f"{metric}: {b:.4g} → {a:.4g}")
