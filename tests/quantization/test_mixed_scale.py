"""Mixed-scale outputs: a detector output that concatenates pixels (0..640) and scores
(0..1) must not get one static int8 range, which collapses every score to one or two
values. The quantize pass keeps the mixing node float (each branch keeps its own range),
records it, and warns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from toys import cnn_data, cnn_onnx, fake_timer, run_pass, toy_recipe
from toys.detector import detector_images, detector_onnx

from compactor.quantization.mixed_scale import checked_tensors, find_mixed


def _scores(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    return out[:, :4], out[:, 4:]


def _run(tmp_path: Path, monkeypatch, **config):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    det = detector_onnx(tmp_path / "det.onnx")
    recipe = toy_recipe(tmp_path, det, detector_images, n_eval=32, n_calib=64)
    out = run_pass(tmp_path, recipe, det, mode="static", keep_float="never", op_types="all",
                   **config)
    x = detector_images(48, seed=7)["x"]  # images neither calibration nor eval saw
    return det, out, x


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_detector_scores_keep_their_own_int8_range(tmp_path, monkeypatch, fmt):
    det, out, x = _run(tmp_path, monkeypatch, format=fmt)
    rec = out.record
    assert rec["outcome"] == "int8", rec.get("keep_float")
    (m,) = rec["mixed_scale"]["tensors"]
    assert (m["tensor"], m["node"], m["axis"]) == ("output0", "/head/concat", 1), m
    assert m["narrow_slices"] == "4-21" and m["int8_levels"] < 1, m
    assert any(f["node"] == "/head/concat" and "mixed scales" in f["reason"]
               for f in rec["float_nodes"]), rec["float_nodes"]
    (w,) = [w for w in out.warnings if "mixes scales" in w]
    assert "output0" in w and "/head/concat" in w, w
    _, ref = _scores(det, x)
    boxes_ref, _ = _scores(det, x)
    boxes, scores = _scores(out.onnx_path, x)
    assert len(np.unique(scores)) >= 36, np.unique(scores)
    assert float(np.abs(scores - ref).max()) <= 0.05
    assert float(np.abs(boxes - boxes_ref).mean()) <= 3.0  # pixels, of 0..640
    assert rec["format"] == fmt
    assert {"QuantizeLinear", "QLinearConv"} & {
        n.op_type for n in onnx.load(str(out.onnx_path)).graph.node}, "still int8"


def test_without_the_check_one_range_collapses_the_scores(tmp_path, monkeypatch):
    """The trap itself (the behaviour before the check): with ``mixed_scale: off`` the
    output gets one range over pixels and scores, and the scores collapse."""
    det, out, x = _run(tmp_path, monkeypatch, mixed_scale="off")
    assert "mixed_scale" not in out.record
    _, ref = _scores(det, x)
    _, scores = _scores(out.onnx_path, x)
    assert len(np.unique(scores)) <= 2
    assert float(np.abs(scores - ref).max()) > 0.5


def test_a_plain_classifier_has_no_mixed_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    out = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static")
    assert out.record["mixed_scale"] == {"checked": True, "tensors": []}
    assert not [w for w in out.warnings if "mixes scales" in w]


def test_checked_tensors_walk_back_to_the_compute_nodes(tmp_path):
    model = onnx.load(str(detector_onnx(tmp_path / "det.onnx")))
    names = checked_tensors(model)
    assert names[0] == "output0"
    assert {"boxes", "scores", "bp", "bs", "b", "cs", "c"} <= set(names), names
    assert "r2" not in names  # behind a Conv: a hidden layer, not checked


def test_find_mixed_flags_orders_of_magnitude_not_noise():
    rng = np.random.default_rng(0)
    lo, hi = np.zeros(22), np.concatenate([np.full(4, 640.0), np.ones(18)])
    axis, narrow, levels, ratio = find_mixed("t", {1: (lo, hi)})
    assert axis == 1 and list(narrow) == list(range(4, 22)) and levels < 1 and ratio >= 600
    similar = rng.uniform(3, 12, 22)
    assert find_mixed("t", {1: (-similar, similar)}) is None
    # a constant slice (a class never seen) loses nothing: not mixed
    assert find_mixed("t", {1: (np.zeros(3), np.array([640.0, 500.0, 0.0]))}) is None


def test_a_bare_yaml_off_turns_the_check_off():
    import yaml

    from compactor.passes.quantize import QuantizeConfig

    assert QuantizeConfig(**yaml.safe_load("mixed_scale: off")).mixed_scale == "off"
    assert QuantizeConfig().mixed_scale == "auto"
    with pytest.raises(ValueError):
        QuantizeConfig(mixed_scale="sometimes")


def _graph(tmp_path: Path, op: str, x_shape: list, **attrs) -> Path:
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"], name=f"/head/{op.lower()}", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    return path


def test_places_and_probabilities_are_not_units(tmp_path):
    """No false alarms: a probability map near 0 in rows without text (its rows are
    places), and a softmax whose rare classes get tiny probabilities (one unit)."""
    from compactor.quantization.mixed_scale import detect

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 16, 16)).astype(np.float32) - 12.0
    x[:, :, 4:6] += 14.0  # two rows of "text"
    path = _graph(tmp_path, "Sigmoid", [8, 1, 16, 16])
    assert detect(path, onnx.load(str(path)), [{"x": x}], tmp_path) == []
    logits = rng.standard_normal((64, 20)).astype(np.float32)
    logits[:, 0] += 12.0  # class 0 wins, the others are rare
    path = _graph(tmp_path, "Softmax", [64, 20], axis=1)
    assert detect(path, onnx.load(str(path)), [{"x": logits}], tmp_path) == []
    # the same logits as a [B, C] output of another kind are flagged: units differ
    mixed = np.concatenate([logits[:, :4] * 200.0, logits[:, 4:] * 0.01], axis=1)
    path = _graph(tmp_path, "Identity", [64, 20])
    (m,) = detect(path, onnx.load(str(path)), [{"x": mixed}], tmp_path)
    assert m.axis == 1 and m.narrow == tuple(range(4, 20)), m
