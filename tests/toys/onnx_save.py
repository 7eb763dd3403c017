"""Saving a hand-built ONNX graph (onnx only, no torch: the toys built on it stay light)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def save_graph(path: Path, nodes, inits: dict[str, np.ndarray], inputs, outputs,
               opset: int = 17, name: str = "toy") -> Path:
    """A checked ONNX model of ``nodes`` (``outputs``: one value info or a list of them)."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
