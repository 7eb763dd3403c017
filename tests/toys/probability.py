"""A one-value-per-sample probability head (a voice-activity detector's shape): where a
per-sample cosine is always 1, whatever int8 does to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from toys.onnx_save import save_graph

PROB_FEATURES = 8


def probability_onnx(path: Path) -> Path:
    """x[batch, 8] → MatMul → ×10 → Sigmoid → p[batch, 1]. Feature 0 has weight 0 but a
    range of ±thousands in the data (see :func:`probability_data`): a per-tensor int8 range
    of x rounds the features that decide p to 0, so int8 says p = 0.5 for every sample and
    half the thresholded decisions flip, while every per-sample cosine stays 1."""
    w = np.linspace(-1.0, 1.0, PROB_FEATURES, dtype=np.float32).reshape(PROB_FEATURES, 1)
    w[0] = 0.0
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"], name="score"),
        helper.make_node("Mul", ["z", "T"], ["zt"], name="sharpen"),
        helper.make_node("Sigmoid", ["zt"], ["p"], name="prob"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", PROB_FEATURES])
    p = helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])
    return save_graph(path, nodes, {"W": w, "T": np.array(10.0, dtype=np.float32)}, [x], p)


def probability_data(n: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, PROB_FEATURES)).astype(np.float32)
    x[:, 0] *= 2000.0
    return {"x": x}
