"""Every repair works on foreign graphs (opset 12, scalar constants, several outputs), and a
repair that cannot apply says why in the record, as a warning and in both reports."""

from __future__ import annotations

import numpy as np
import pytest
from toys import fake_timer, run_pass, toy_recipe
from toys.foreign import detector_data, scalar_const_detector_onnx

from compactor.quantization.candidates import Calibration, Candidate, build
from compactor.quantization.search import repairs_not_applied
from compactor.quantization.sensitivity import noise_ratio, rank_static, weight_noise


def test_noise_ratio_takes_0d_values_and_lists_of_them():
    # ORT's own helper raised "object of type 'numpy.float32' has no len()" on these
    assert noise_ratio(np.float32(2.0), np.float32(2.0)) == 0.0
    assert noise_ratio(np.float32(2.0), np.float32(1.0)) == pytest.approx(0.25)
    assert noise_ratio([np.ones(3), np.array(2.0)], [np.ones(3), np.array(1.0)]) == \
        pytest.approx(1 / 7)
    assert noise_ratio([np.ones(3)], [np.ones(3), np.ones(3)]) is None  # runs do not pair
    assert noise_ratio(np.ones(3), np.ones(4)) is None


def test_static_ranking_on_a_detector_with_scalar_constants_and_two_outputs(tmp_path):
    src = scalar_const_detector_onnx(tmp_path / "det.onnx", opset=13)
    feeds = [detector_data(2, seed=i) for i in range(4)]
    qdq = build(Candidate(mode="static", source=src), tmp_path / "q.onnx",
                Calibration(feeds, 8, tmp_path))
    w = weight_noise(src, qdq)
    assert {"scale", "shift"} & set(w), w  # the 0-d weights are compared too
    ranking = rank_static(src, qdq, feeds, tmp_path)
    assert {s.node for s in ranking} >= {"conv1", "box_head", "score_head"}, ranking
    assert all(np.isfinite(s.error) for s in ranking)


def test_the_fallback_runs_on_an_opset_12_detector(tmp_path, monkeypatch):
    """The shape of the PP-OCR text detector / YOLOv8 head crash: the float fallback's
    ranking died on a scalar Mul/Add constant; the repair was only in the repairs log."""
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    model = scalar_const_detector_onnx(tmp_path / "det.onnx", opset=12)
    recipe = toy_recipe(tmp_path, model, detector_data)
    out = run_pass(tmp_path, recipe, model, mode="static", max_accuracy_drop=1e-6,
                   repairs=["fallback"], search_speed=False)
    rec = out.record
    errors = [r for r in rec["search"]["repairs"] if "error" in r]
    assert errors == [], errors
    tried = [r["repair"] for r in rec["search"]["repairs"]]
    assert tried and all(t.startswith("fallback k=") for t in tried), tried
    assert "repairs_not_applied" not in rec


def test_a_repair_that_cannot_apply_says_why_in_record_warnings_and_reports(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    model = scalar_const_detector_onnx(tmp_path / "det.onnx", opset=13)
    recipe = toy_recipe(tmp_path, model, detector_data)
    # a CNN: SmoothQuant has no MatMul/Gemm input to smooth
    out = run_pass(tmp_path, recipe, model, mode="static", max_accuracy_drop=1e-6,
                   repairs=["smoothquant"], search_speed=False)
    skipped = out.record["repairs_not_applied"]
    assert skipped == [{"repair": "smoothquant",
                        "reason": "no MatMul/Gemm input it would help"}], skipped
    assert any("repair 'smoothquant' could not apply: no MatMul/Gemm input" in w
               for w in out.warnings), out.warnings


def test_repairs_not_applied_lists_each_repair_once_and_not_those_that_ran():
    log = [{"repair": "calibration: entropy", "error": "boom"},
           {"repair": "calibration: percentile", "label": "static ...", "search": {}},
           {"repair": "smoothquant", "skipped": "no MatMul/Gemm input it would help"},
           {"repair": "fallback", "error": "ranking the nodes by sensitivity failed: x"},
           {"repair": "fallback k=2", "error": "y"}]
    assert repairs_not_applied(log) == [
        {"repair": "smoothquant", "reason": "no MatMul/Gemm input it would help"},
        {"repair": "fallback", "reason": "ranking the nodes by sensitivity failed: x"}]
