"""Toy ONNX graphs with the shapes of problem real, foreign models have (built with
``onnx.helper``, no torch, milliseconds to make):

- ``scalar_const_detector_onnx``: an opset-12 detector-like CNN whose Conv outputs are
  scaled and shifted by 0-d (scalar) constants, with several outputs (the shape of the
  PP-OCR text detector and YOLOv8-style heads that crashed the float fallback's ranking)
- ``if_weights_onnx``: weights that live only in ``If`` branches (a graph that counted
  0 params and 0 MACs)
- ``lstm_onnx``: an LSTM, which static int8 leaves in float
- ``vad_onnx``: a recurrent voice-activity model: ``input [B, 576]``, ``state [2, B, 128]``
  (batch on axis 1), a scalar int64 ``sr`` choosing an ``If`` branch, and the new state as
  a second output
- ``dynamic_seq_onnx``: a U-Net-like block with symbolic height and width that runs at
  16 x 16 but not at 1 x 1 (ONNX Runtime's ``Concat`` fails), so size-1 defaults break
- ``row_bias_gemm_onnx``: Dense layers as tf2onnx/jax2tf write them, Gemms whose bias is a
  ``[1, N]`` row or a 0-d scalar (magika's model: ORT's per-channel static quantizer failed
  on the row bias)
- ``text_line_onnx`` / ``text_line_batches``: a text-line recognizer-like CNN over images
  of symbolic width, fed batches of different widths (PP-OCR's recognizer: ORT's histogram
  calibration stacked the batches' activations and failed)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FOREIGN = Path(__file__).resolve()

VAD_CHUNK = 576
VAD_STATE = 128


def _model(graph, opset: int, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset <= 12 else 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _init(name: str, a: np.ndarray):
    return numpy_helper.from_array(np.asarray(a), name)


def scalar_const_detector_onnx(path: Path, opset: int = 12, seed: int = 0) -> Path:
    """x[N, 3, 16, 16] → Conv → Mul by a 0-d scale → Add a 0-d shift → Relu → two heads:
    ``boxes`` (Conv) and ``scores`` (Conv → Sigmoid)."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    wb = (r.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    ws = (r.standard_normal((2, 8, 1, 1)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "scale"], ["m1"], name="scale_mul"),
        helper.make_node("Add", ["m1", "shift"], ["a1"], name="shift_add"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "WB"], ["boxes"], name="box_head"),
        helper.make_node("Conv", ["r1", "WS"], ["s"], name="score_head"),
        helper.make_node("Sigmoid", ["s"], ["scores"], name="score_act"),
    ]
    inits = [_init("W1", w1), _init("WB", wb), _init("WS", ws),
             _init("scale", np.float32(0.5)), _init("shift", np.float32(0.1))]
    graph = helper.make_graph(
        nodes, "scalar_const_detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4, 16, 16]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2, 16, 16])],
        inits)
    return _model(graph, opset, path)


def detector_data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16))
            .astype(np.float32)}


def _branch(name: str, w: np.ndarray, x: str, out: str):
    """A subgraph: ``out = x @ w`` with ``w`` an initializer of the branch itself."""
    return helper.make_graph(
        [helper.make_node("MatMul", [x, f"{name}_W"], [out], name=f"{name}_matmul")],
        name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [_init(f"{name}_W", w)])


def if_weights_onnx(path: Path, seed: int = 0) -> Path:
    """x[N, 16], flag[] (bool) → If(flag: x @ A[16, 32], else: x @ B[16, 32]) → y[N, 32].
    Every weight is an initializer of a branch: the main graph holds none."""
    r = np.random.default_rng(seed)
    a = r.standard_normal((16, 32)).astype(np.float32)
    b = r.standard_normal((16, 32)).astype(np.float32)
    node = helper.make_node("If", ["flag"], ["y"], name="choose",
                            then_branch=_branch("then", a, "x", "y_then"),
                            else_branch=_branch("else", b, "x", "y_else"))
    graph = helper.make_graph(
        [node], "if_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])])
    return _model(graph, 13, path)


LSTM_SEQ, LSTM_IN, LSTM_HIDDEN = 10, 8, 16


def lstm_onnx(path: Path, seed: int = 0) -> Path:
    """x[seq=10, N, 8] → LSTM(hidden 16) → last hidden state → Gemm → y[N, 4]."""
    r = np.random.default_rng(seed)
    h = LSTM_HIDDEN
    w = (r.standard_normal((1, 4 * h, LSTM_IN)) * 0.3).astype(np.float32)
    rr = (r.standard_normal((1, 4 * h, h)) * 0.3).astype(np.float32)
    bias = np.zeros((1, 8 * h), np.float32)
    fc = (r.standard_normal((4, h)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "Bias"], ["", "h_n"], name="lstm",
                         hidden_size=h),
        helper.make_node("Squeeze", ["h_n", "axes0"], ["h"], name="squeeze"),
        helper.make_node("Gemm", ["h", "FC"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [LSTM_SEQ, "N", LSTM_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [_init("W", w), _init("R", rr), _init("Bias", bias), _init("FC", fc),
         _init("axes0", np.array([0], np.int64))])
    return _model(graph, 13, path)


def vad_onnx(path: Path, seed: int = 0) -> Path:
    """input[B, 576], state[2, B, 128], sr[] (int64) → (output[B, 1], stateN[2, B, 128]).
    ``sr == 16000`` picks the branch whose weight is used (both weights live in the
    branches); the new state mixes the old one with the features."""
    r = np.random.default_rng(seed)
    w16 = (r.standard_normal((VAD_CHUNK, VAD_STATE)) * 0.05).astype(np.float32)
    w8 = (r.standard_normal((VAD_CHUNK, VAD_STATE)) * 0.05).astype(np.float32)
    head = (r.standard_normal((VAD_STATE, 1)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is_16k"),
        helper.make_node("If", ["is16k"], ["feat"], name="rate_branch",
                         then_branch=_branch("rate16k", w16, "input", "feat16k"),
                         else_branch=_branch("rate8k", w8, "input", "feat8k")),
        helper.make_node("Tanh", ["feat"], ["f"], name="tanh"),
        helper.make_node("Unsqueeze", ["f", "axes0"], ["f3"], name="unsqueeze"),
        helper.make_node("Mul", ["state", "half"], ["kept"], name="decay"),
        helper.make_node("Add", ["kept", "f3"], ["stateN"], name="mix"),
        helper.make_node("MatMul", ["f", "Head"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["output"], name="prob"),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", VAD_CHUNK]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", VAD_STATE]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "B", VAD_STATE])],
        [_init("sr16k", np.int64(16000)), _init("axes0", np.array([0], np.int64)),
         _init("half", np.float32(0.5)), _init("Head", head)])
    return _model(graph, 13, path)


def dynamic_seq_onnx(path: Path, seed: int = 0) -> Path:
    """x[batch, 4, height, width] → MaxPool(2, ceil) → Resize ×2 → Concat with x → Conv.
    At 16 x 16 the two halves of the Concat agree; at 1 x 1 the pooled-and-upsampled half
    is 2 x 2 and ONNX Runtime's Concat fails."""
    r = np.random.default_rng(seed)
    w = (r.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2], ceil_mode=1),
        helper.make_node("Resize", ["p", "", "scales"], ["u"], name="up", mode="nearest"),
        helper.make_node("Concat", ["x", "u"], ["cat"], name="skip", axis=1),
        helper.make_node("Conv", ["cat", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                       ["batch", 4, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       ["batch", 8, "height", "width"])],
        [_init("W", w), _init("scales", np.array([1, 1, 2, 2], np.float32))])
    return _model(graph, 13, path)


def row_bias_gemm_onnx(path: Path, seed: int = 0) -> Path:
    """x[N, 16] → Gemm(W[16, 32], C[1, 32]) → Relu → Gemm(W2[8, 32], transB, C[] 0-d)
    → y[N, 8]."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((16, 32)) * 0.3).astype(np.float32)
    b1 = (r.standard_normal((1, 32)) * 0.1).astype(np.float32)
    w2 = (r.standard_normal((8, 32)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="dense1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="dense2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "row_bias_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("W1", w1), _init("B1", b1), _init("W2", w2), _init("B2", np.float32(0.05))])
    return _model(graph, 13, path)


def row_bias_data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}


TEXT_LINE_HEIGHT = 8
TEXT_LINE_WIDTHS = (20, 32, 26, 44, 20, 38)  # one width per batch, as PP-OCR batches lines


def text_line_onnx(path: Path, seed: int = 0) -> Path:
    """x[N, 3, 8, width] → Conv 3x3 → Relu → Conv 3x3 → Relu → ReduceMean over the height
    → Transpose → MatMul → y[N, width, 10]: per-column class scores, a CTC recognizer's
    output shape. Opset 12, with ONNX Runtime's unnamed dynamic axes ('?')."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (r.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    head = (r.standard_normal((8, 10)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("ReduceMean", ["r2"], ["m"], name="pool_h", axes=[2], keepdims=0),
        helper.make_node("Transpose", ["m"], ["t"], name="to_columns", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "Head"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "text_line",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                       ["?", 3, TEXT_LINE_HEIGHT, "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", "?", 10])],
        [_init("W1", w1), _init("W2", w2), _init("Head", head)])
    return _model(graph, 12, path)


def _text_lines(seed: int) -> list[tuple[dict[str, np.ndarray]]]:
    r = np.random.default_rng(seed)
    out = []
    for w in TEXT_LINE_WIDTHS:
        x = r.standard_normal((6, 3, TEXT_LINE_HEIGHT, w)).astype(np.float32)
        x[:, :, :, w * 3 // 4:] = 0.0  # lines padded with zeros to the batch's widest
        out.append(({"x": x},))
    return out


def text_line_eval() -> list[tuple[dict[str, np.ndarray]]]:
    """Six batches of 6 lines, each batch its own width (20 to 44 columns)."""
    return _text_lines(1)


def text_line_calibration() -> list[tuple[dict[str, np.ndarray]]]:
    return _text_lines(2)
