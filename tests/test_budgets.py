"""Budgets → verdicts: every budget key, profile limits, overrides, batching, regressions."""

from __future__ import annotations

import pytest

from compactor.budgets import (
    BUDGET_KEYS,
    Interval,
    evaluate_budgets,
    merge_budgets,
    parse_budget_overrides,
    parse_percent,
    regressions,
)
from compactor.errors import RecipeError, UsageError
from compactor.measure.batching import batching_hint
from compactor.measure.latency import Latency
from compactor.profiles import Profile
from compactor.recipe import Budgets, parse_recipe

LAT = {"p50": 2.0, "p90": 3.0, "p99": 5.0}


def judge(budgets: dict, **kw):
    args = dict(size_mb=1.2, latency_ms=LAT, baseline_latency_ms=6.0, metric_name="accuracy",
                metric_value=0.95, metric_drop=0.02, baseline_metric=0.97, memory_mb=120.0,
                speedup=Interval.point(3.0))
    args.update(kw)
    return {v.budget: v for v in evaluate_budgets(Budgets.model_validate(budgets), **args)}


def test_every_budget_passes_and_fails():
    ok = judge({"max_size_mb": 1.5, "max_latency_ms": {"p50": 2.5, "p90": 3.5, "p99": 6},
                "max_memory_mb": 200, "max_accuracy_drop": 0.03, "min_speedup": 2.5})
    assert {k: v.status for k, v in ok.items()} == {
        "max_size_mb": "pass", "max_latency_ms.p50": "pass", "max_latency_ms.p90": "pass",
        "max_latency_ms.p99": "pass", "max_memory_mb": "pass", "max_accuracy_drop": "pass",
        "min_speedup": "pass"}
    assert ok["min_speedup"].measured == pytest.approx(3.0)
    assert ok["max_memory_mb"].measured == 120.0 and ok["max_memory_mb"].unit == "MB"
    bad = judge({"max_size_mb": 1, "max_latency_ms": {"p90": 2.5}, "max_memory_mb": 100,
                 "max_accuracy_drop": 0.01, "min_speedup": 4})
    assert all(v.status == "fail" and not v.passed for v in bad.values()), bad


def test_relative_accuracy_drop():
    v = judge({"max_accuracy_drop": "3%"})["max_accuracy_drop"]
    assert v.limit == pytest.approx(0.03 * 0.97) and v.status == "pass"
    assert "allowed 3% of baseline" in v.detail
    assert judge({"max_accuracy_drop": "1%"})["max_accuracy_drop"].status == "fail"


def test_not_measured_is_neither_pass_nor_fail_and_carries_the_estimate():
    v = judge({"max_latency_ms": {"p50": 1, "p90": 1}, "max_memory_mb": 10, "min_speedup": 2},
              latency_ms=None, memory_mb=None, latency_estimate_ms=0.4, speedup=None)
    assert {k: x.status for k, x in v.items()} == dict.fromkeys(v, "not measured")
    assert all(x.passed for x in v.values())
    assert v["max_latency_ms.p50"].estimate == 0.4  # an estimate, never a measurement
    assert v["max_latency_ms.p50"].measured is None
    assert "estimate" in v["max_latency_ms.p50"].to_dict()
    assert v["max_latency_ms.p90"].estimate is None  # the roofline bound is for the median
    assert "estimate" not in v["max_memory_mb"].to_dict()


def test_profile_limits_are_checked_like_budgets():
    prof = Profile.model_validate({"name": "phone", "class": "mobile",
                                   "limits": {"memory_mb": 100, "model_size_mb": 2}})
    v = judge({}, profile=prof)
    assert v["limits.memory_mb"].status == "fail"  # 120 MB peak RSS > 100 MB
    assert v["limits.model_size_mb"].status == "pass"
    assert "phone profile limit" in v["limits.memory_mb"].detail
    assert judge({}, profile=Profile.model_validate({"name": "h", "class": "host"})) == {}


def test_recipe_takes_max_memory_mb_and_rejects_unknown_budget_keys():
    base = "version: 1\nname: t\nmodel: {onnx: m.onnx}\ndata: {eval: e.npz}\ntargets:\n"
    r = parse_recipe(base + "  - profile: edge-cpu\n    budgets: {max_memory_mb: 300}\n")
    assert r.targets[0].budgets.max_memory_mb == 300
    with pytest.raises(RecipeError) as e:
        parse_recipe(base + "  - profile: edge-cpu\n    budgets: {max_memory: 300}\n")
    assert "unknown key 'max_memory'" in e.value.message
    assert "did you mean 'max_memory_mb'?" in e.value.hint


# --------------------------------------------------------------------------- overrides


def test_budget_overrides_parse_and_merge():
    o = parse_budget_overrides(["max_latency_ms.p90=5", "max_accuracy_drop=2%",
                                "max_size_mb=1.5", "max_latency_ms=3", "min_speedup=2x"])
    assert o == {"max_latency_ms": {"p90": 5.0, "p50": 3.0}, "max_accuracy_drop": "2%",
                 "max_size_mb": 1.5, "min_speedup": 2.0}
    base = Budgets.model_validate({"max_latency_ms": {"p99": 9}, "max_size_mb": 4,
                                   "max_memory_mb": 100})
    merged = merge_budgets(base, o)
    assert merged.max_latency_ms.model_dump() == {"p50": 3.0, "p90": 5.0, "p99": 9.0}
    assert merged.max_size_mb == 1.5 and merged.max_memory_mb == 100
    assert merged.max_accuracy_drop.relative and merged.max_accuracy_drop.value == 0.02


@pytest.mark.parametrize(("pair", "message", "hint"), [
    ("max_latncy_ms.p90=5", "unknown budget 'max_latncy_ms.p90'",
     "did you mean 'max_latency_ms.p90'?"),
    ("max_size=1", "unknown budget 'max_size'", "did you mean 'max_size_mb'?"),
    ("max_size_mb", "expected KEY=VALUE", "--budget"),
    ("max_size_mb=big", "'big' is not a number", ""),
    ("max_size_mb=-1", "must be positive", ""),
    ("max_accuracy_drop=lots%", "max_accuracy_drop", ""),
])
def test_bad_budget_override(pair, message, hint):
    with pytest.raises(UsageError) as e:
        merge_budgets(Budgets(), parse_budget_overrides([pair]))
    assert message in e.value.message and hint in (e.value.hint or "")
    assert e.value.exit_code == 2


def test_every_documented_budget_key_parses():
    for key in BUDGET_KEYS:
        value = "1%" if key == "max_accuracy_drop" else "1"
        merge_budgets(Budgets(), parse_budget_overrides([f"{key}={value}"]))


# --------------------------------------------------------------------------- batching


def _lat(bs: int, p50: float, p90: float) -> Latency:
    return Latency(bs, p50, p90, p90, p50, 0.0, p50, 10, bs * 1000.0 / p50)


SWEEP = {1: _lat(1, 1.0, 1.2), 8: _lat(8, 4.0, 5.0), 32: _lat(32, 12.0, 20.0)}


def test_batching_hint_picks_the_best_throughput_within_the_limit():
    prof = Profile.model_validate({"name": "c", "class": "cloud", "limits": {"latency_ms": 10}})
    hint = batching_hint(SWEEP, Budgets(), prof)  # no target budget: the profile's p90 limit
    assert hint["batch_size"] == 8 and hint["within"] == "p90 ≤ 10 ms"
    assert "limits.latency_ms" in hint["source"]
    target = Budgets.model_validate({"max_latency_ms": {"p90": 25}})
    assert batching_hint(SWEEP, target, prof)["batch_size"] == 32
    tight = Budgets.model_validate({"max_latency_ms": {"p50": 0.5}})
    hint = batching_hint(SWEEP, tight, prof)
    assert hint["batch_size"] is None and "no measured batch size" in hint["reason"]
    free = Profile.model_validate({"name": "h", "class": "host"})
    assert batching_hint(SWEEP, None, free)["batch_size"] == 32
    assert batching_hint({1: SWEEP[1]}, None, free) is None


# --------------------------------------------------------------------------- regressions


def _manifest(size: int, p50: float, metric: float, higher: bool = True) -> dict:
    return {"metric": {"name": "accuracy", "higher_is_better": higher},
            "stages": [{"size_bytes": size, "metric": metric,
                        "latency_ms": {"edge": {"1": {"p50": p50}}, "gpu": None}}]}


def test_regressions_against_an_older_artifact():
    old = _manifest(1_000_000, 1.0, 0.90)
    same = {v.budget: v.status for v in regressions(old, _manifest(1_040_000, 1.04, 0.89), 0.05)}
    assert same == {"regression.size": "pass", "regression.latency_p50.edge": "pass",
                    "regression.latency_p50.gpu": "not measured", "regression.accuracy": "pass"}
    worse = {v.budget: v for v in regressions(old, _manifest(1_100_000, 1.2, 0.80), 0.05)}
    assert worse["regression.size"].status == "fail"
    assert worse["regression.size"].measured == pytest.approx(10.0)
    # two manifests timed at different moments never fail a latency regression: beyond the
    # limit it is undecided, and --remeasure times both models paired
    assert worse["regression.latency_p50.edge"].status == "inconclusive"
    assert "--remeasure" in worse["regression.latency_p50.edge"].detail
    assert worse["regression.accuracy"].status == "fail"
    # smaller and faster is never a regression
    better = regressions(old, _manifest(500_000, 0.5, 0.95), 0.0)
    assert all(v.status != "fail" for v in better)
    # lower-is-better metrics regress upwards
    lo = regressions(_manifest(1, 1, 1.0, False), _manifest(1, 1, 1.2, False), 0.05)
    assert {v.budget: v.status for v in lo}["regression.accuracy"] == "fail"


def test_parse_percent():
    assert parse_percent("5%") == pytest.approx(0.05)
    assert parse_percent("0.1") == pytest.approx(0.1)
    with pytest.raises(UsageError):
        parse_percent("five")
