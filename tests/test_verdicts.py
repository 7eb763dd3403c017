"""Three-valued verdicts: an interval against a limit, re-measuring with a fake timer until
it settles or the time cap is spent, the quiet-block estimator, and the CI outputs of an
inconclusive verdict."""

from __future__ import annotations

import numpy as np
import pytest

from compactor.budgets import (
    BUSY_FAIL_FACTOR,
    MIN_SETTLE_S,
    Gate,
    Interval,
    check_time_cap,
    decide,
    evaluate_budgets,
)
from compactor.errors import EXIT_USAGE, UsageError
from compactor.measure.latency import MIN_QUIET_BLOCKS, measure_latency, quiet_estimate
from compactor.spec import Budgets


class FakeClock:
    """Time that moves only when a fake measurement says it took so long."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted(clock: FakeClock, intervals: list[Interval]):
    """A re-measurement that returns the next scripted interval and takes the seconds it
    was given; records what it was asked for."""
    asked: list[float] = []

    def remeasure(seconds: float) -> dict[str, Interval]:
        asked.append(seconds)
        clock.now += seconds
        return {"p50": intervals[min(len(asked) - 1, len(intervals) - 1)]}

    return remeasure, asked


def latency_verdict(first: Interval, gate: Gate | None = None, limit: float = 1.0):
    (v,) = evaluate_budgets(Budgets.model_validate({"max_latency_ms": {"p50": limit}}),
                            size_mb=1, latency_ms={"p50": first.value, "p90": 0, "p99": 0},
                            baseline_latency_ms=None, metric_name="", metric_value=None,
                            metric_drop=None, baseline_metric=None,
                            latency_ci={"p50": first}, gate=gate)
    return v


def test_clear_pass_and_clear_fail_need_no_remeasuring():
    clock = FakeClock()
    remeasure, asked = scripted(clock, [Interval(0.5, 0.4, 0.6)])
    gate = Gate(latency=remeasure, cap_s=10, clock=clock)
    ok = latency_verdict(Interval(0.8, 0.7, 0.9), gate)
    bad = latency_verdict(Interval(1.3, 1.2, 1.4), gate)
    assert (ok.status, bad.status) == ("pass", "fail")
    assert (ok.low, ok.high) == (0.7, 0.9) and bad.measured == 1.3
    assert asked == [] and clock.now == 0


def test_a_straddling_interval_is_remeasured_until_it_settles():
    clock = FakeClock()
    remeasure, asked = scripted(clock, [Interval(1.0, 0.9, 1.1), Interval(0.95, 0.93, 0.97)])
    gate = Gate(latency=remeasure, cap_s=30, clock=clock)
    v = latency_verdict(Interval(1.0, 0.8, 1.2), gate)
    assert v.status == "pass", v
    assert asked == [2.0, 4.0]  # each re-measurement twice as long as the last
    assert "settled after re-measuring 2 time(s)" in v.detail


def test_a_straddling_interval_that_never_settles_is_inconclusive_within_the_cap():
    clock = FakeClock()
    remeasure, asked = scripted(clock, [Interval(1.0, 0.95, 1.05)])
    gate = Gate(latency=remeasure, cap_s=10, clock=clock)
    v = latency_verdict(Interval(1.0, 0.8, 1.2), gate)
    assert v.status == "inconclusive" and v.passed  # not a fail: the policy decides
    assert asked == [2.0, 4.0, 4.0]  # the last one gets only what is left of the cap
    assert clock.now == pytest.approx(10.0)
    assert "straddles the limit 1 ms" in v.detail and "within the 10 s cap" in v.detail


def test_without_a_way_to_remeasure_a_straddle_is_inconclusive_at_once():
    v = latency_verdict(Interval(1.0, 0.8, 1.2))
    assert v.status == "inconclusive" and "straddles" in v.detail


def test_a_busy_host_may_pass_but_fails_only_far_over_the_limit():
    busy = Interval(1.5, 1.4, 1.6, busy=True, note="2 of 30 blocks", fastest=1.3)
    v = decide("max_latency_ms.p50", 1.0, busy, "ms", True)
    assert v.status == "inconclusive"
    assert "busy host (2 of 30 blocks)" in v.detail
    assert decide("x", 2.0, busy, "ms", True).status == "pass"  # quiet would be faster still
    far = Interval(5, 4.5, 5.5, busy=True, fastest=BUSY_FAIL_FACTOR * 1.0 + 0.1)
    assert decide("x", 1.0, far, "ms", True).status == "fail"


def test_speedup_is_judged_on_its_paired_interval():
    def speedup(iv: Interval | None) -> str:
        (v,) = evaluate_budgets(Budgets(min_speedup=2.0), size_mb=1, latency_ms=None,
                                baseline_latency_ms=1.0, metric_name="", metric_value=None,
                                metric_drop=None, baseline_metric=None, speedup=iv)
        return v.status

    assert speedup(Interval(3.0, 2.5, 3.5)) == "pass"
    assert speedup(Interval(1.5, 1.2, 1.8)) == "fail"
    assert speedup(Interval(2.1, 1.8, 2.4)) == "inconclusive"
    assert speedup(None) == "not measured"  # two separate timings are never divided


def test_a_time_cap_too_short_for_one_measurement_names_the_setting():
    with pytest.raises(UsageError) as e:
        check_time_cap(0.1, MIN_SETTLE_S, "--settle-time")
    assert e.value.exit_code == EXIT_USAGE
    assert "--settle-time 0.1: too short to take one measurement" in e.value.message
    with pytest.raises(UsageError):
        check_time_cap(0, MIN_SETTLE_S, "--settle-time")
    check_time_cap(MIN_SETTLE_S, MIN_SETTLE_S, "--settle-time")


# --------------------------------------------------------------------------- the estimator


def test_quiet_estimate_leaves_a_neighbours_bursts_out():
    rng = np.random.default_rng(0)
    blocks = [rng.normal(1.0, 0.01, 50) for _ in range(40)]
    for i in range(0, 40, 3):  # a third of the blocks run 3x slower: a neighbour's bursts
        blocks[i] = blocks[i] * 3
    times = np.concatenate(blocks)
    ends = list(np.cumsum([len(b) for b in blocks]))
    est = quiet_estimate(times, ends, [False] * 40)
    p50, lo, hi = est["p50"]
    assert abs(p50 - 1.0) < 0.01 and lo <= p50 <= hi and hi - lo < 0.02, est["p50"]
    assert np.median(times) > 1.0  # the plain median moved with the bursts ...
    assert est["p90"][0] < 1.05  # ... the estimate's p90 did not


def test_quiet_estimate_uses_only_blocks_that_had_the_cores():
    fast, slow = np.full(20, 1.0), np.full(20, 2.0)
    blocks = [fast] * 4 + [slow] * 10
    busy = [True] * 4 + [False] * 10  # the fast blocks were flagged busy: left out
    ends = list(np.cumsum([len(b) for b in blocks]))
    assert quiet_estimate(np.concatenate(blocks), ends, busy)["p50"][0] == 2.0
    few = [False] * 4 + [True] * 10  # fewer than MIN_QUIET_BLOCKS quiet: all blocks count
    assert MIN_QUIET_BLOCKS > 4
    assert quiet_estimate(np.concatenate(blocks), ends, few)["p50"][0] == 1.0


class _Session:
    def __init__(self, clock: FakeClock, ms: float) -> None:
        self.clock, self.ms = clock, ms

    def run(self, _outputs, _feeds) -> None:
        self.clock.now += self.ms / 1000.0


def test_blocks_on_a_busy_host_are_flagged_and_the_estimate_says_busy():
    clock = FakeClock()
    cpu = [0.0]

    def starved() -> tuple[float, float | None]:  # half the CPU time the wall clock took
        cpu[0] = clock.now * 0.5
        return cpu[0], None

    lat = measure_latency(_Session(clock, 1.0), {}, 1, min_runs=5, min_time_s=2.0,
                          max_time_s=2.0, warmup=0, target_ci=1e-9, threads=1, clock=clock,
                          probe=starved)
    assert lat.blocks >= 15 and lat.quiet_blocks == 0 and lat.busy is True
    iv = lat.interval("p50")
    assert iv.busy and iv.fastest == pytest.approx(1.0) and "0 of" in iv.note

    def quiet() -> tuple[float, float | None]:
        return clock.now, None

    lat = measure_latency(_Session(clock, 1.0), {}, 1, min_runs=5, min_time_s=2.0,
                          max_time_s=2.0, warmup=0, target_ci=1e-9, threads=1, clock=clock,
                          probe=quiet)
    assert lat.busy is False and lat.quiet_blocks == lat.blocks
    assert lat.interval("p50").value == pytest.approx(1.0)
