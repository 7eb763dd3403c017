"""keep_float: the quantize pass ships its float input when int8 does not pay (not
resolvably faster in the paired timing, most MACs left in float, not smaller), says why in
the record and as a stage warning; ``keep_float: never`` ships int8 regardless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from toys import cnn_data, cnn_onnx, fake_timer, mlp_data, run_pass, toy_recipe
from toys.lopsided import lopsided_mlp_onnx

from compactor.quantization.keep_float import decide
from compactor.quantization.timing import Timing, median_lower_bound

QUANT_OPS = {"QuantizeLinear", "QLinearConv", "MatMulInteger", "DynamicQuantizeLinear",
             "QLinearMatMul", "ConvInteger"}


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _slower_int8(path: Path) -> float:
    return 3.0 if _ops(path) & QUANT_OPS else 2.0  # int8 0.67x, as ocr_cls measured


def test_int8_slower_than_float_keeps_the_float_model_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer(_slower_int8))
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    out = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static")
    rec = out.record
    assert rec["outcome"] == "kept_float", rec.get("keep_float")
    assert out.onnx_path.read_bytes() == cnn.read_bytes(), "the stage is the float input"
    assert not _ops(out.onnx_path) & QUANT_OPS
    assert "not resolvably faster" in rec["keep_float"]["reason"], rec["keep_float"]
    assert rec["keep_float"]["checks"]["speedup_vs_input"] == pytest.approx(0.667, abs=1e-3)
    (w,) = [w for w in out.warnings if "kept the float model" in w]
    assert "0.67x" in w and "keep_float: never" in w, w
    assert rec["search"]["chosen"], rec["search"]  # what int8 would have been stays recorded


def test_int8_faster_ships_int8(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    out = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static")
    assert out.record["outcome"] == "int8", out.record["keep_float"]
    assert _ops(out.onnx_path) & QUANT_OPS
    assert "reason" not in out.record["keep_float"]
    assert not [w for w in out.warnings if "float model" in w or "does not pay" in w]
    checks = out.record["keep_float"]["checks"]
    assert checks["int8_bytes"] < checks["float_bytes"], checks


def test_keep_float_never_ships_a_slower_int8_and_warns(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer(_slower_int8))
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    out = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static",
                   keep_float="never")
    assert out.record["outcome"] == "int8"
    assert _ops(out.onnx_path) & QUANT_OPS
    assert any("does not pay" in w and "never" in w for w in out.warnings), out.warnings


def test_a_fallback_that_leaves_most_macs_in_float_keeps_the_float_model(tmp_path,
                                                                        monkeypatch):
    # fc2 holds ~76% of the MACs and is what int8 breaks: the fallback puts it back in
    # float, though the (fake) timing calls int8 twice as fast.
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = lopsided_mlp_onnx(tmp_path / "mlp.onnx")
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    out = run_pass(tmp_path, recipe, mlp, mode="static", max_accuracy_drop=0.002,
                   repairs=["fallback"])
    rec = out.record
    assert "fc2" in [f["node"] for f in rec["float_nodes"] if "fallback" in f["reason"]]
    assert rec["outcome"] == "kept_float", rec["keep_float"]
    assert rec["keep_float"]["checks"]["float_mac_share"] > 0.5, rec["keep_float"]
    assert "fallback left" in rec["keep_float"]["reason"], rec["keep_float"]
    assert out.onnx_path.read_bytes() == mlp.read_bytes()
    assert out.verdict.status == "pass" and out.verdict.measured == 0.0, out.verdict


@pytest.mark.parametrize(
    ("speedup", "low", "nbytes", "share", "keep", "why"),
    [
        (2.0, 1.6, 100, 0.1, False, ""),
        (1.08, 0.97, 100, 0.1, True, "not resolvably faster"),  # within the spread
        (1.0, 1.0, 100, 0.1, True, "not resolvably faster"),
        (2.0, 1.6, 1000, 0.1, True, "not smaller"),
        (2.0, 1.6, 100, 0.6, True, "MACs in float"),
        (None, None, 100, 0.1, False, ""),  # not timed: speed not judged
    ],
)
def test_decide_rules(speedup, low, nbytes, share, keep, why):
    d = decide(speedup, low, nbytes, 1000, share)
    assert d.keep_float == keep and why in d.reason, d


def test_the_lower_bound_needs_every_round_when_rounds_are_few():
    assert median_lower_bound(np.array([1.5, 1.4, 0.9, 1.6, 1.5])) == 0.9
    many = np.concatenate([np.full(30, 1.5), np.full(2, 0.8)])
    assert median_lower_bound(many) == 1.5  # two outlier rounds of 32 do not decide it
    t = Timing({"float": 2.0, "c0": 1.0}, 1, "p", 1, 1, 0.0)
    assert t.speedup_low("c0", "float") == 2.0  # one figure per model: no spread known
