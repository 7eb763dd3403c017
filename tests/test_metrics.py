"""Metrics: the built-ins on known arrays, a user metric, and each through a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import toys
from toys import assert_clean_error, leftovers, ref, run_cli, write_recipe

from compactor.errors import DataError, RecipeError
from compactor.metrics import BUILTIN, get_metric
from compactor.pipeline import optimize
from compactor.recipe import load_recipe

# --------------------------------------------------------------------------- on arrays


def test_accuracy_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    acc = BUILTIN["accuracy"].compute(logits, np.array([1, 1, 1, 0]), None)
    assert acc == pytest.approx(0.75)
    one_hot = np.eye(2)[[1, 1, 1, 0]]
    assert BUILTIN["accuracy"].compute(logits, one_hot, None) == pytest.approx(0.75)


def test_top5_counts_a_hit_within_the_five_best():
    logits = np.tile(np.arange(10, dtype=np.float64)[::-1], (2, 1))  # class i has rank i
    top5 = BUILTIN["top5"]
    assert top5.compute(logits, np.array([4, 4]), None) == 1.0
    assert top5.compute(logits, np.array([4, 5]), None) == 0.5
    assert BUILTIN["accuracy"].compute(logits, np.array([4, 5]), None) == 0.0
    # Fewer than five classes: every label is in the top five.
    assert top5.compute(np.zeros((3, 3)), np.array([0, 1, 2]), None) == 1.0


def test_mse_is_lower_is_better():
    mse = BUILTIN["mse"]
    got = mse.compute(np.array([[1.0, 2.0]]), np.array([[1.0, 4.0]]), None)
    assert got == pytest.approx(2.0)
    assert mse.higher_is_better is False
    assert mse.drop(baseline=0.1, value=0.3) == pytest.approx(0.2)  # worse: positive
    assert BUILTIN["accuracy"].drop(baseline=0.9, value=0.8) == pytest.approx(0.1)


def test_fidelity_is_cosine_to_the_baseline():
    fid = BUILTIN["fidelity"]
    ref_out = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert fid.compute(ref_out, None, ref_out) == pytest.approx(1.0)
    assert fid.compute(ref_out * 3.0, None, ref_out) == pytest.approx(1.0)
    flipped = ref_out.copy()
    flipped[2] = [0.0, 1.0, 0.0]  # orthogonal: cosine 0 on one of three samples
    assert fid.compute(flipped, None, ref_out) == pytest.approx(2.0 / 3.0)
    with pytest.raises(DataError):
        fid.compute(ref_out[:, :2], None, ref_out)


def test_label_metric_without_labels_names_fidelity():
    with pytest.raises(DataError) as e:
        BUILTIN["accuracy"].compute(np.zeros((2, 3)), None, None)
    assert e.value.exit_code == 3
    assert "fidelity" in e.value.hint


def test_nan_metric_is_a_data_error():
    with pytest.raises(DataError, match="nan"):
        BUILTIN["mse"].compute(np.array([np.nan]), np.array([0.0]), None)


def test_user_metric_from_a_file(tmp_path):
    metric = get_metric(ref("cross_entropy"), tmp_path)
    assert metric.higher_is_better is False
    logits = np.array([[10.0, 0.0], [0.0, 10.0]])
    good = metric.compute(logits, np.array([0, 1]), None)
    bad = metric.compute(logits, np.array([1, 0]), None)
    assert good < 1e-3 < 9.0 < bad, (good, bad)
    assert metric.drop(good, bad) > 0


def test_unknown_user_metric_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as e:
        get_metric(ref("cross_entropi"), tmp_path)
    assert "cross_entropy" in e.value.hint


# --------------------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> Path:
    return toys.export_cnn_onnx(tmp_path_factory.mktemp("onnx") / "cnn.onnx")


RUNS = {
    # metric: (eval data, higher is better)
    "top5": ("cnn_eval_batches", True),
    "mse": ("cnn_logit_batches", False),
    "fidelity": ("cnn_unlabelled_batches", True),
    ref("cross_entropy"): ("cnn_eval_batches", False),
}


@pytest.mark.parametrize("metric", list(RUNS), ids=["top5", "mse", "fidelity", "user"])
def test_metric_in_a_run(tmp_path, cnn_onnx, metric):
    data, higher = RUNS[metric]
    path = write_recipe(
        tmp_path,
        model={"onnx": str(cnn_onnx)},
        data={"calibration": ref("cnn_calibration_batches"), "eval": ref(data)},
        metric=metric,
        passes=[{"quantize": {"mode": "static", "keep_float": "never"}}],  # int8 is tested
        budgets={"max_accuracy_drop": 1000},
    )
    result = optimize(load_recipe(path))
    m = result.manifest
    assert m["metric"]["name"] == metric
    assert m["metric"]["higher_is_better"] is higher
    base, quant = m["stages"]
    assert quant["delta"] == pytest.approx(quant["metric"] - base["metric"])
    # drop is "how much worse": the sign flips for a lower-is-better metric.
    assert quant["drop"] == pytest.approx(-quant["delta"] if higher else quant["delta"])
    (verdict,) = m["targets"][0]["verdicts"]
    assert verdict["measured"] == pytest.approx(quant["drop"]) and verdict["unit"] == metric
    if metric == "top5":
        assert base["metric"] == 1.0
    elif metric == "mse":
        # The targets are the teacher's own logits: only int8 adds error.
        assert base["metric"] < 1e-8, f"baseline mse {base['metric']:.3g}"
        assert quant["metric"] > base["metric"] and quant["drop"] > 0, quant
    elif metric == "fidelity":
        assert base["metric"] == pytest.approx(1.0, abs=1e-9)
        assert quant["metric"] >= 0.95, f"int8 fidelity {quant['metric']:.4f}"


def test_accuracy_without_labels_exits_3(tmp_path, cnn_onnx):
    path = write_recipe(
        tmp_path,
        model={"onnx": str(cnn_onnx)},
        data={"eval": ref("cnn_unlabelled_batches")},
        metric="accuracy",
    )
    result = run_cli("optimize", path)
    assert_clean_error(result, 3, "needs labels", "fidelity")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []



# --------------------------------------------------------------------------- untrusted fidelity


def test_fidelity_on_one_value_per_sample_sees_flipped_decisions():
    from compactor.data import PerBatch
    from compactor.metrics import fidelity_caveat

    ref_p = np.array([[0.9], [0.1], [0.8], [0.2]])
    fid = BUILTIN["fidelity"]
    assert fid.compute(ref_p, None, ref_p) == pytest.approx(1.0)
    half = np.full_like(ref_p, 0.5)  # every decision at the threshold: a cosine says 1.0
    assert fid.compute(half, None, ref_p) == pytest.approx(0.0, abs=1e-9)
    flipped = 1.0 - ref_p
    value = fid.compute(flipped, None, ref_p)
    assert value < 0, f"fidelity {value:.3f} for every decision flipped"
    assert fidelity_caveat(PerBatch.of([ref_p])) is not None
    assert "same value" in fidelity_caveat(PerBatch.of([np.ones((4, 3))]))
    assert fidelity_caveat(PerBatch.of([np.arange(12.0).reshape(4, 3)])) is None


def test_int8_that_flips_a_probability_head_warns_and_scores_below_one(tmp_path, monkeypatch):
    from toys import fake_timer, toy_recipe
    from toys.probability import probability_data, probability_onnx

    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    model = probability_onnx(tmp_path / "vad.onnx")
    recipe = toy_recipe(tmp_path, model, probability_data,
                        quantize={"mode": "static", "keep_float": "never", "op_types": "all",
                                  "repairs": []})
    result = optimize(load_recipe(recipe))
    base, final = result.stages[0], result.stages[-1]
    assert final.record["outcome"] == "int8"
    x = probability_data(64, seed=1)["x"]
    import onnxruntime as ort

    (want,) = ort.InferenceSession(str(model)).run(None, {"x": x})
    (got,) = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"x": x})
    agree = float(((want > 0.5) == (got > 0.5)).mean())
    assert agree < 0.8, f"the toy must flip decisions; agreement {agree:.2f}"
    assert final.metric < 0.5, f"fidelity {final.metric:.3f} with {agree:.0%} agreement"
    (w,) = [w for w in final.warnings if "fidelity cannot be trusted" in w]
    assert "'p'" in w and "[16, 1]" in w and "metric: module:fn" in w, w
    assert not [w for w in base.warnings if "fidelity" in w], base.warnings
