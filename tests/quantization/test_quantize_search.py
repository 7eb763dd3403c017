"""The int8 search: fastest candidate within budget, sensitivity fallback checked on held-out
data, cheaper fixes first, the time budget, and an impossible budget (exit 1, artifact kept).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from toys import (
    cnn_data,
    cnn_onnx,
    fake_timer,
    manifest,
    mlp_data,
    mlp_onnx,
    run_cli,
    run_pass,
    toy_recipe,
)

from compactor.pipeline.judge import warn_if_slower
from compactor.progress import Progress
from compactor.results import StageResult


def fallback_nodes(rec: dict) -> list[str]:
    return [f["node"] for f in rec["float_nodes"] if "fallback" in f["reason"]]


# --------------------------------------------------------------------------- speed


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("fastest", ["qoperator", "qdq"])
def test_the_fastest_candidate_within_budget_wins(tmp_path, monkeypatch, fastest):
    def latency(path: Path) -> float:
        ops = _ops(path)
        if not ops & {"QuantizeLinear", "QLinearConv"}:
            return 5.0  # float
        is_qop = "QLinearConv" in ops
        return 1.0 if is_qop == (fastest == "qoperator") else 2.0

    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer(latency))
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static",
                   activation_type="uint8", op_types="all").record
    assert rec["format"] == fastest, rec["search"]["candidates"]
    cands = rec["search"]["candidates"]
    assert len(cands) == 2 and cands[0]["note"] == "chosen", cands
    assert cands[0]["speedup_vs_float"] == 5.0 and cands[1]["speedup_vs_float"] == 2.5
    assert rec["search"]["speedup_vs_input"] == 5.0


def _signed_activations(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    return any(types.get(n.input[2]) == onnx.TensorProto.INT8
               for n in model.graph.node if n.op_type == "QuantizeLinear")


def test_a_faster_candidate_that_misses_the_budget_loses(tmp_path, monkeypatch):
    """S8S8 is 'fastest' but (by decree) misses the budget: the next fastest wins, and
    without repairs nothing else is tried."""
    from compactor.quantization import accuracy

    real_score = accuracy.AccuracyJudge.score

    def score(self, path, part="search"):
        s = real_score(self, path, part)
        ok = not _signed_activations(path)
        return accuracy.Score(s.value, s.drop if ok else 1.0, ok, s.samples)

    def latency(path: Path) -> float:
        if "QuantizeLinear" not in _ops(path):
            return 5.0
        return 1.0 if _signed_activations(path) else 2.0

    monkeypatch.setattr(accuracy.AccuracyJudge, "score", score)
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer(latency))
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, mlp, mlp_data), mlp, mode="static",
                   format="qdq", op_types="all", max_accuracy_drop=0.01, repairs=[]).record
    s8, u8 = rec["search"]["candidates"]
    assert "S8S8" in s8["label"] and s8["search"]["ok"] is False, s8
    assert "U8S8" in u8["label"] and u8["note"] == "chosen", u8
    assert rec["activation_type"] == "uint8" and rec["accuracy_budget"]["met"], rec
    assert rec["search"]["repairs"] == []


def test_real_timing_compares_against_float_in_one_run(tmp_path):
    """No fake: the candidates are timed interleaved with the float model."""
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static",
                   time_budget_s=20).record
    (timing,) = rec["search"]["timings"]
    assert timing["profile"] == "fast" and timing["batch_size"] == 1, timing
    assert timing["float_p50_ms"] > 0 and timing["rounds"] >= 5, timing
    cands = [c for c in rec["search"]["candidates"] if "p50_ms" in c]
    assert len(cands) >= 4, cands
    p50s = [c["p50_ms"] for c in cands]
    assert p50s[0] <= min(p50s) * 1.03, "the first is the fastest (ties: the smallest)"
    assert p50s[1:] == sorted(p50s[1:]) or p50s[1] <= min(p50s) * 1.03, p50s
    assert rec["search"]["chosen"] == cands[0]["label"] or cands[0]["search"]["ok"] is False


# --------------------------------------------------------------------------- accuracy fallback


def test_sensitive_node_goes_back_to_float_and_holds_on_held_out_data(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    out = run_pass(tmp_path, recipe, mlp, mode="dynamic", max_accuracy_drop=0.001,
                   repairs=["fallback"])
    rec = out.record
    acc = rec["accuracy_budget"]
    assert acc["met"] is True, acc
    assert fallback_nodes(rec) == ["fc2"], rec["float_nodes"]
    (entry,) = [f for f in rec["float_nodes"] if f["node"] == "fc2"]
    assert "sensitivity rank 1" in entry["reason"] and "emulated" in entry["reason"], entry
    assert acc["held_out"]["ok"] and acc["held_out"]["samples"] == 32, acc
    assert acc["search"]["samples"] == 32 and acc["search"]["drop"] <= 0.001, acc
    assert acc["held_out"]["drop"] <= 0.001, f"held-out drop {acc['held_out']['drop']:.2e}"
    assert "repair_cost_ms" in rec["search"], rec["search"]
    assert out.verdict.status == "pass" and out.verdict.budget == "quantize.max_accuracy_drop"


def test_static_fallback_ranks_with_qdq_loss_debug(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    rec = run_pass(tmp_path, recipe, mlp, mode="static", max_accuracy_drop=0.002,
                   repairs=["fallback"], search_speed=False).record
    assert rec["accuracy_budget"]["met"], rec["accuracy_budget"]
    assert "fc2" in fallback_nodes(rec), rec["float_nodes"]
    (entry,) = [f for f in rec["float_nodes"] if f["node"] == "fc2"]
    assert "qdq_loss_debug" in entry["reason"], entry


def test_smoothquant_fixes_an_activation_outlier_before_any_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    rec = run_pass(tmp_path, recipe, mlp, mode="dynamic", max_accuracy_drop=0.001).record
    assert rec["accuracy_budget"]["met"], rec["accuracy_budget"]
    assert fallback_nodes(rec) == [], rec["float_nodes"]
    assert rec["smoothquant"]["groups"], rec
    smoothed = {n for g in rec["smoothquant"]["groups"] for n in g["nodes"]}
    assert "fc2" in smoothed, rec["smoothquant"]
    assert "smoothed" in rec["search"]["chosen"]


def test_held_out_failure_sends_more_nodes_back_to_float(tmp_path, monkeypatch):
    """The search part is satisfied by one node in float; the held-out part (here: by
    decree) needs two. The choice follows the held-out part."""
    from compactor.quantization import accuracy

    real_score = accuracy.AccuracyJudge.score

    def score(self, path, part="search"):
        s = real_score(self, path, part)
        floats = {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"}
        ok = "fc2" in floats and (part == "search" or "fc1" in floats)
        return accuracy.Score(s.value, s.drop if ok else 1.0, ok, s.samples)

    monkeypatch.setattr(accuracy.AccuracyJudge, "score", score)
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    rec = run_pass(tmp_path, toy_recipe(tmp_path, mlp, mlp_data), mlp, mode="dynamic",
                   max_accuracy_drop=0.01, repairs=["fallback"]).record
    assert sorted(fallback_nodes(rec)) == ["fc1", "fc2"], rec["float_nodes"]
    notes = [r.get("note") for r in rec["search"]["repairs"]]
    assert "held on the search part, not on the held-out part" in notes, rec["search"]


# --------------------------------------------------------------------------- limits


def test_the_search_stops_at_its_time_budget(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    from compactor.quantization import accuracy

    real_score = accuracy.AccuracyJudge.score

    def slow_score(self, path, part="search"):  # every scoring takes 0.4 s
        time.sleep(0.4)
        s = real_score(self, path, part)
        return accuracy.Score(s.value, 1.0, False, s.samples)  # and never holds

    monkeypatch.setattr(accuracy.AccuracyJudge, "score", slow_score)
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    t0 = time.monotonic()
    out = run_pass(tmp_path, toy_recipe(tmp_path, mlp, mlp_data), mlp, mode="dynamic",
                   max_accuracy_drop=0.001, time_budget_s=1.5)
    rec = out.record
    elapsed = time.monotonic() - t0
    assert rec["search"]["timed_out"] is True, rec["search"]
    assert rec["accuracy_budget"]["met"] is False
    assert rec["search"]["seconds"] < 1.5 + 2.0, rec["search"]["seconds"]
    assert elapsed < 8, f"the pass took {elapsed:.1f} s with a 1.5 s budget"
    assert "time_budget_s" in " ".join(out.warnings), out.warnings


def test_an_impossible_budget_exits_1_and_keeps_the_best_candidate(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    # drop 0 cannot hold with anything in int8, and the fallback keeps one node int8
    # (keep_float: never: that candidate leaves most MACs float, which would ship float)
    path = toy_recipe(tmp_path, mlp, mlp_data,
                      quantize={"mode": "dynamic", "max_accuracy_drop": 0.0,
                                "time_budget_s": 60, "keep_float": "never"})
    result = run_cli("optimize", path)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "no int8 configuration meets the accuracy budget" in result.output, result.output
    assert "budget failed" in result.output
    m = manifest(tmp_path)
    assert m["passed"] is False
    rec = m["stages"][-1]["record"]
    verdict = m["stages"][-1]["verdict"]
    assert rec["accuracy_budget"]["met"] is False and verdict["status"] == "fail"
    (v,) = [v for t in m["targets"] for v in t["verdicts"]
            if v["budget"] == "quantize.max_accuracy_drop"]
    assert v["status"] == "fail" and v["measured"] > 0, v
    assert "failing" in " ".join(m["stages"][-1]["warnings"])
    assert rec["quantization_ops"], "the best int8 candidate is in the artifact"
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_no_budget_means_no_repairs_and_no_failure(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=100.0)
    rec = run_pass(tmp_path, toy_recipe(tmp_path, mlp, mlp_data), mlp, mode="dynamic").record
    acc = rec["accuracy_budget"]
    assert acc["source"] == "default" and acc["enforced"] is False, acc
    assert "verdict" not in rec and rec["search"]["repairs"] == []
    assert "fails nothing" in acc["note"], acc


# --------------------------------------------------------------------------- slower than float


def _stage(name: str, p50: float) -> StageResult:
    from compactor.measure.latency import Latency

    lat = Latency(1, p50, p50, p50, p50, 0.0, p50, 10, 1000.0 / p50)
    return StageResult(name=name, kind="onnx", lineage=(name,), record={}, metric=1.0,
                       delta=0.0, drop=0.0, size_bytes=1, params=1, macs=None,
                       latency={"host": {1: lat}})


class Notes(Progress):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_int8_slower_than_its_float_input_is_said_loudly():
    """The warning comes from a paired timing of the two models, and only when the int8
    one is resolvably slower (the interval's upper end under 1); unpaired, nothing."""
    from compactor.verdict import Interval

    def paired(value: float, low: float, high: float):
        return lambda before, after, prof: Interval(value, low, high)

    def stages(p50: float):
        before, after = _stage("export", 1.0), _stage("quantize", p50)
        before.onnx_path, after.onnx_path = Path("fp32.onnx"), Path("int8.onnx")
        return before, after

    progress = Notes()
    before, slow = stages(2.0)
    warn_if_slower(before, slow, progress, paired(0.5, 0.45, 0.55))
    (w,) = slow.warnings
    assert "SLOWER than its float input on host" in w and "0.50x" in w, w
    assert progress.notes == [f"quantize: {w}"]
    for interval in ((2.0, 1.9, 2.1), (0.95, 0.8, 1.1)):  # faster; not resolvably slower
        before, other = stages(1.0)
        warn_if_slower(before, other, progress, paired(*interval))
        assert not other.warnings
    before, unpaired = stages(2.0)
    warn_if_slower(before, unpaired, progress)
    assert not unpaired.warnings


def test_the_demo_recipe_shape_still_quantizes_fast_with_the_speed_search(tmp_path):
    """The default settings on a conv net: timed candidates, one chosen, record complete."""
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    path = toy_recipe(tmp_path, cnn, cnn_data, quantize={"mode": "static",
                                                         "time_budget_s": 30},
                      budgets={"max_accuracy_drop": "1%"})
    result = run_cli("optimize", path)
    assert result.exit_code in (0, 1), result.output
    rec = manifest(tmp_path)["stages"][-1]["record"]
    for key in ("isa", "int8_choice", "search", "accuracy_budget", "float_nodes"):
        assert key in rec, key
    assert rec["accuracy_budget"]["source"] == "targets[0] (fast.yaml) max_accuracy_drop"
    assert "verdict" not in rec, "a target's budget is judged by the target, not twice"
    assert rec["search"]["seconds"] < 30
    assert np.isfinite(rec["search"]["speedup_vs_input"])
    assert "quantize" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- emulation


@pytest.mark.parametrize("per_channel", [True, False])
def test_emulated_dynamic_int8_error_matches_onnx_runtime(tmp_path, per_channel):
    """The sensitivity ranking and SmoothQuant's scale choice rest on this emulation."""
    from onnxruntime.quantization import quantize_dynamic

    from compactor.quantization.sensitivity import capture, dynamic_matmul_error

    mlp = mlp_onnx(tmp_path / "mlp.onnx", outlier=30.0)
    q = tmp_path / "q.onnx"
    quantize_dynamic(str(mlp), str(q), per_channel=per_channel, nodes_to_quantize=["fc2"])
    feeds = [{"x": mlp_data(1, seed=i)["x"]} for i in range(8)]  # served one at a time
    want = capture(mlp, ["h", "b"], feeds)
    got = capture(q, ["b"], feeds)["b"]
    y, yq = np.concatenate(want["b"]), np.concatenate(got)
    actual = 10 * np.log10((y**2).sum() / ((yq - y) ** 2).sum())
    b = next(t for t in onnx.load(str(mlp)).graph.initializer if t.name == "B")
    err = dynamic_matmul_error(want["h"], onnx.numpy_helper.to_array(b), per_channel, False)
    emulated = 10 * np.log10(1 / err)
    assert abs(emulated - actual) < 0.5, f"emulated {emulated:.2f} dB, ORT {actual:.2f} dB"
