"""Subgraphs and recurrent ops are counted: params, MACs, op histograms and the int8
coverage include If/Loop/Scan bodies, and an LSTM that stays float is named as float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from toys.foreign import (
    LSTM_HIDDEN,
    LSTM_IN,
    LSTM_SEQ,
    if_weights_onnx,
    lstm_onnx,
    vad_onnx,
)

from compactor.measure.macs import iter_nodes, mac_count
from compactor.measure.precision import node_precisions, precision_summary
from compactor.measure.size import param_count


def test_weights_in_if_branches_are_counted(tmp_path):
    model = onnx.load(str(if_weights_onnx(tmp_path / "if.onnx")))
    assert len(model.graph.initializer) == 0  # every weight lives in a branch
    assert param_count(model) == 2 * 16 * 32
    got = mac_count(model, {"x": (3, 16), "flag": ()})
    # one branch runs per call: the larger one is counted, and the count says so
    assert got.total == 3 * 16 * 32, got
    assert any("If 'choose'" in n and "one branch runs per call" in n for n in got.notes)
    keys = [k for k, _ in iter_nodes(model.graph)]
    assert "choose/then_branch/then_matmul" in keys and "choose/else_branch/else_matmul" in keys


def test_a_loop_body_is_counted_once_and_labelled_per_iteration():
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "W")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["h_out"], name="step"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep")],
        "body",
        # as exporters write bodies: typed, shapes left to inference from the Loop's inputs
        [helper.make_tensor_value_info("i", TensorProto.INT64, None),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, None),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, None),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)], [w])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="unroll", body=body)],
        "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                 helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    got = mac_count(model, {"x": (2, 8), "trips": ()})
    assert got.total == 2 * 8 * 8, got
    assert any("Loop 'unroll'" in n and "per iteration" in n for n in got.notes), got.notes
    assert param_count(model) == 64


def test_lstm_macs_are_gates_times_input_plus_hidden_times_hidden_per_step(tmp_path):
    model = onnx.load(str(lstm_onnx(tmp_path / "lstm.onnx")))
    got = mac_count(model, {"x": (LSTM_SEQ, 2, LSTM_IN)})
    want = LSTM_SEQ * 2 * 4 * LSTM_HIDDEN * (LSTM_IN + LSTM_HIDDEN)
    assert got.per_node["lstm"] == want, got.per_node
    assert got.total == want + 2 * 4 * LSTM_HIDDEN  # and the Gemm head


def test_an_lstm_left_float_by_static_int8_is_named_float(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    src = lstm_onnx(tmp_path / "lstm.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((LSTM_SEQ, 2, LSTM_IN))
              .astype(np.float32)} for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    dst = tmp_path / "int8.onnx"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ)
    model = onnx.load(str(dst))
    macs = mac_count(model, {"x": (LSTM_SEQ, 1, LSTM_IN)})
    summary = precision_summary(model, macs.per_node)
    assert summary["quantized"], summary
    heavy = {n["node"]: n for n in summary["float_heavy_nodes"]}
    assert "lstm" in heavy and heavy["lstm"]["op"] == "LSTM", summary
    # the LSTM is nearly all the MACs: int8 covers only the head
    assert summary["int8_macs_share"] < 0.05 and heavy["lstm"]["macs_share"] > 0.95, summary


def test_int8_coverage_reaches_into_if_branches(tmp_path):
    """ORT's dynamic int8 quantizes the main graph's MatMul but leaves the If branches'
    (the model's real weight) float: the summary must say so, not 'all int8'."""
    from onnxruntime.quantization import quantize_dynamic

    src = vad_onnx(tmp_path / "vad.onnx")
    dst = tmp_path / "int8.onnx"
    quantize_dynamic(str(src), str(dst))
    model = onnx.load(str(dst))
    kinds = {k: kind for k, _, kind in node_precisions(model)}
    assert kinds["head_quant"] == "int8", kinds
    macs = mac_count(model, {"input": (1, 576), "state": (2, 1, 128), "sr": ()})
    summary = precision_summary(model, macs.per_node)
    floats = [n["node"] for n in summary["float_heavy_nodes"]]
    assert "rate_branch/then_branch/rate16k_matmul" in floats, summary
    assert "rate_branch/else_branch/rate8k_matmul" in floats, summary
    assert summary["quantized"] and summary["int8_macs_share"] < 0.01, summary


@pytest.mark.parametrize("shapes", [{"input": (1, 576), "state": (2, 1, 128), "sr": ()}])
def test_the_vad_toy_counts_its_branch_macs(tmp_path, shapes):
    model = onnx.load(str(vad_onnx(tmp_path / "vad.onnx")))
    got = mac_count(model, shapes)
    assert got.total == 576 * 128 + 128, got
    assert param_count(model) == 2 * 576 * 128 + 128
