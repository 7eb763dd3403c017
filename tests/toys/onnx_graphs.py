"""Toy ONNX models: the teacher CNN exported by torch, and graphs built with ``onnx.helper``
(no torch, milliseconds to make): a convolution network, a MatMul network whose middle
layer can be given an activation outlier, and a two-input graph that defeats ORT's
symbolic shape inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from toys.factories import CNN_SHAPE, cnn_eval_batches, teacher_cnn
from toys.onnx_save import save_graph

MLP_WIDTH = 64
MLP_TOKENS = 8  # per sample


def export_cnn_onnx(path: Path, opset: int = 17) -> Path:
    """The teacher CNN as an ONNX file (legacy exporter: fast, and any opset)."""
    import warnings

    model = teacher_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, *CNN_SHAPE),), str(path), dynamo=False,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
        )
    return path


def mlp_onnx(path: Path, outlier: float = 1.0, opset: int = 17, seed: int = 0,
             hidden: int = MLP_WIDTH) -> Path:
    """x[batch, 8, 64] → fc1 (64→hidden) → Relu → fc2 (hidden→hidden) → Relu → head, all
    MatMuls. ``outlier`` scales channel 0 of fc2's input up and fc2's row 0 down by the
    same factor: the float model is unchanged, but a per-tensor int8 range of fc2's input
    is wrecked."""
    r = np.random.default_rng(seed)
    d = MLP_WIDTH
    a = (r.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
    b = (r.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    c = (r.standard_normal((hidden, 16)) / np.sqrt(hidden)).astype(np.float32)
    a[:, 0] *= outlier
    b[0, :] /= outlier
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["h"], name="act1"),
        helper.make_node("MatMul", ["h", "B"], ["b"], name="fc2"),
        helper.make_node("Relu", ["b"], ["h2"], name="act2"),
        helper.make_node("MatMul", ["h2", "C"], ["y"], name="head"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_TOKENS, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", MLP_TOKENS, 16])
    return save_graph(path, nodes, {"A": a, "B": b, "C": c}, [x], y, opset)


def cnn_onnx(path: Path, opset: int = 17, seed: int = 0) -> Path:
    """image[batch, 3, 16, 16] → Conv → Relu → Conv → Relu → GlobalAveragePool → Flatten
    → Gemm: a convolution network."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (r.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)
    fc = (r.standard_normal((10, 32)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "FC"], ["logits"], name="head", transB=1),
    ]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    return save_graph(path, nodes, {"W1": w1, "W2": w2, "FC": fc}, [x], y, opset)


def two_input_onnx(path: Path) -> Path:
    """x[n, 16] + z[m, 16] → MatMul: ORT's symbolic shape inference gives up on it (it
    cannot tell that n and m are the same), plain ONNX shape inference does not."""
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "z"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "W"], ["y"], name="fc")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
              helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m", 16])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])
    return save_graph(path, nodes, {"W": w}, inputs, y)


def mlp_data(n: int, seed: int) -> dict[str, np.ndarray]:
    shape = (n, MLP_TOKENS, MLP_WIDTH)
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def cnn_data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((n, 3, 16, 16))
            .astype(np.float32)}


def onnx_opset(path: Path) -> int:
    model = onnx.load(str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def cnn_accuracy(path: Path) -> float:
    """Accuracy of an ONNX CNN on the teacher-labelled eval batches (1.0 for the teacher)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hits = n = 0
    for x, y in cnn_eval_batches():
        (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
        hits += int((logits.argmax(1) == y).sum())
        n += len(y)
    return hits / n
