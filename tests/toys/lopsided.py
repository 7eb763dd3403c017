"""An MLP whose one big layer is the one int8 breaks: the accuracy fallback must put most
of the model's MACs back in float to hold a tight budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from toys.onnx_graphs import MLP_TOKENS, MLP_WIDTH, _save

WIDE = 256


def lopsided_mlp_onnx(path: Path, outlier: float = 100.0, seed: int = 0) -> Path:
    """x[batch, 8, 64] → fc1 (64→256) → Relu → fc2 (256→256) → Relu → head (256→16).
    fc2 holds about three quarters of the MACs; channel 0 of its input is scaled up by
    ``outlier`` (and fc2's row 0 down by as much), so the float model is unchanged but a
    per-tensor int8 range of fc2's input is wrecked. Data: ``mlp_data``."""
    r = np.random.default_rng(seed)
    a = (r.standard_normal((MLP_WIDTH, WIDE)) / np.sqrt(MLP_WIDTH)).astype(np.float32)
    b = (r.standard_normal((WIDE, WIDE)) / np.sqrt(WIDE)).astype(np.float32)
    c = (r.standard_normal((WIDE, 16)) / np.sqrt(WIDE)).astype(np.float32)
    a[:, 0] *= outlier
    b[0, :] /= outlier
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["h"], name="act1"),
        helper.make_node("MatMul", ["h", "B"], ["b"], name="fc2"),
        helper.make_node("Relu", ["b"], ["h2"], name="act2"),
        helper.make_node("MatMul", ["h2", "C"], ["y"], name="head"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_TOKENS, MLP_WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", MLP_TOKENS, 16])
    return _save(path, nodes, {"A": a, "B": b, "C": c}, [x], y)
