"""compactor/measure/macs.py: a MAC count that cannot be had says why, instead of a bare None."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compactor.measure.macs import count_macs, mac_count, macs_by_node


def _matmul(first: list) -> onnx.ModelProto:
    """x → first node(s) → MatMul with an 8×4 weight."""
    graph = helper.make_graph(
        [*first, helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    )


def test_a_countable_graph_has_no_reason():
    got = mac_count(_matmul([helper.make_node("Relu", ["x"], ["h"])]), {"x": (2, 8)})
    assert got.per_node == {"mm": 2 * 4 * 8} and got.total == 64 and got.reason is None


def test_an_uncountable_graph_says_why_and_logs_it(caplog):
    # An op neither ONNX shape inference nor ONNX Runtime knows: no shape for the MatMul.
    model = _matmul([helper.make_node("Mystery", ["x"], ["h"], domain="custom")])
    with caplog.at_level(logging.INFO, logger="compactor.measure.macs"):
        got = mac_count(model, {"x": (2, 8)})
    assert got.per_node is None and got.total is None
    assert got.reason.startswith("1 heavy node(s) have shapes ONNX shape inference cannot "
                                 "follow, and running it on zeros failed: "), got.reason
    assert [r.getMessage() for r in caplog.records] == [f"MACs not computable: {got.reason}"]
    # The plain API keeps its numbers: None where there is no count.
    assert macs_by_node(model, {"x": (2, 8)}) is None
    assert count_macs(model, {"x": (2, 8)}) is None


def test_a_missing_input_shape_is_the_reason():
    model = _matmul([helper.make_node("Mystery", ["x"], ["h"], domain="custom")])
    got = mac_count(model, {})
    assert got.total is None and "no shape was given for input 'x'" in got.reason


def test_bench_notes_why_the_model_has_no_mac_count(tmp_path):
    from compactor.measure.bench import _model_info

    path = tmp_path / "mystery.onnx"
    onnx.save(_matmul([helper.make_node("Mystery", ["x"], ["h"], domain="custom")]), str(path))
    info = _model_info(path, {"x": (1, 8)})
    assert info["macs"] is None and "running it on zeros failed" in info["macs_reason"]
    ok = tmp_path / "relu.onnx"
    onnx.save(_matmul([helper.make_node("Relu", ["x"], ["h"])]), str(ok))
    assert _model_info(ok, {"x": (1, 8)})["macs"] == 32
    assert _model_info(ok, {"x": (1, 8)})["macs_reason"] is None


def test_inspect_shows_why_there_is_no_mac_count(tmp_path):
    from click.testing import CliRunner

    from compactor.cli import cli

    path = tmp_path / "mystery.onnx"
    onnx.save(_matmul([helper.make_node("Mystery", ["x"], ["h"], domain="custom")]), str(path))
    r = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["macs"] is None and "running it on zeros failed" in info["macs_reason"]
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    text = " ".join(r.stdout.split())  # rich wraps long lines
    assert r.exit_code == 0 and "MACs: not computable (1 heavy node(s)" in text


def test_macs_of_a_graph_whose_reshape_shape_inference_cannot_follow():
    """Transformers exported from torch compute their reshapes at run time (Shape, Cast,
    arithmetic): ONNX shape inference loses the shape, one ORT run on zeros finds it."""
    w = np.ones((16, 4), np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["nf", "two"], ["nf2"]),
        helper.make_node("Cast", ["nf2"], ["n2"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["n2", "zero"], ["n2v"]),
        helper.make_node("Concat", ["one_v", "n2v", "eight"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
    ]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one_v"),
             numpy_helper.from_array(np.array([16], np.int64), "eight"),
             numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # x [1, 6, 32] → r [1, 12, 16] → y [1, 12, 4]: 12 × 4 outputs × 16 MACs each
    assert macs_by_node(model, {"x": (1, 6, 32)}) == {"mm": 12 * 4 * 16}
