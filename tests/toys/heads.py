"""Toys that fool a naive output check (built with ``onnx.helper`` or numpy; no torch):

- :func:`three_heads_onnx`: a face-detector-like model with three outputs, ``face``
  ``[B, 1]`` (a probability), ``box`` ``[B, 4]`` (pixels, 0..160) and ``landmarks``
  ``[B, 5, 2]`` (0..1); ``broken="box"`` gives one head the wrong sign (its output is
  ``160 - box``: worse than predicting the baseline's mean), ``nudged`` a 2% weight change
  (still a good head).
- :func:`detector_arrays`: a YOLOv8-style ``[B, 4 + C, N]`` output (xywh pixels beside
  class scores) with a few confident boxes per sample, and the same with the class scores
  collapsed to two values, as a per-tensor int8 range over pixels and scores does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from toys.onnx_save import save_graph

HEAD_FEATURES = 8
HEAD_WIDTH = 32
HEAD_OUTPUTS = ("face", "box", "landmarks")


def head_weights(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {
        "W1": (r.standard_normal((HEAD_FEATURES, HEAD_WIDTH)) * 0.5).astype(np.float32),
        "Wf": (r.standard_normal((HEAD_WIDTH, 1)) * 1.0).astype(np.float32),
        "Wb": (r.standard_normal((HEAD_WIDTH, 4)) * 0.5).astype(np.float32),
        "Wl": (r.standard_normal((HEAD_WIDTH, 10)) * 0.5).astype(np.float32),
    }


def three_heads_onnx(path: Path, broken: str | None = None, nudged: str | None = None,
                     seed: int = 0) -> Path:
    """x[B, 8] → MatMul → Tanh → three heads: face = Sigmoid(h·Wf), box = 160·Sigmoid(h·Wb),
    landmarks = Sigmoid(h·Wl) as [B, 5, 2]. ``broken``: that head's weights negated;
    ``nudged``: scaled by 1.02."""
    w = head_weights(seed)
    key = {"face": "Wf", "box": "Wb", "landmarks": "Wl"}
    if broken:
        w[key[broken]] = -w[key[broken]]
    if nudged:
        w[key[nudged]] = w[key[nudged]] * np.float32(1.02)
    inits = {**w, "px": np.array(160.0, dtype=np.float32),
             "lm_shape": np.array([-1, 5, 2], dtype=np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["t"], name="trunk"),
        helper.make_node("Tanh", ["t"], ["h"], name="trunk_act"),
        helper.make_node("MatMul", ["h", "Wf"], ["zf"], name="face_fc"),
        helper.make_node("Sigmoid", ["zf"], ["face"], name="face_prob"),
        helper.make_node("MatMul", ["h", "Wb"], ["zb"], name="box_fc"),
        helper.make_node("Sigmoid", ["zb"], ["sb"], name="box_sig"),
        helper.make_node("Mul", ["sb", "px"], ["box"], name="box_px"),
        helper.make_node("MatMul", ["h", "Wl"], ["zl"], name="lm_fc"),
        helper.make_node("Sigmoid", ["zl"], ["sl"], name="lm_sig"),
        helper.make_node("Reshape", ["sl", "lm_shape"], ["landmarks"], name="lm_shape_op"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HEAD_FEATURES])
    outs = [helper.make_tensor_value_info("face", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("box", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["batch", 5, 2])]
    return save_graph(path, nodes, inits, [x], outs, name="heads")


def heads_data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, HEAD_FEATURES))
            .astype(np.float32)}


def detector_arrays(batch: int = 4, classes: int = 6, anchors: int = 64, boxes: int = 3,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fp32-like, int8-like) ``[B, 4 + classes, anchors]``: boxes in pixels (xywh, up to
    640) and class scores in 0..1, a few anchors per sample confident (0.3..0.9) in one
    class; the int8-like copy has the boxes within a pixel and every score rounded to a
    multiple of 1.268 (one step of a range spanning 0..640 at 8 bits: scores of 0 or 1.27)."""
    r = np.random.default_rng(seed)
    out = np.zeros((batch, 4 + classes, anchors), dtype=np.float32)
    out[:, 0:2] = r.uniform(40, 600, (batch, 2, anchors))
    out[:, 2:4] = r.uniform(20, 120, (batch, 2, anchors))
    out[:, 4:] = r.uniform(0.0, 0.1, (batch, classes, anchors))
    for b in range(batch):
        for a in r.choice(anchors, boxes, replace=False):
            out[b, 4 + r.integers(classes), a] = r.uniform(0.3, 0.9)
    bad = out.copy()
    bad[:, :4] += r.uniform(-1, 1, (batch, 4, anchors)).astype(np.float32)
    bad[:, 4:] = np.round(out[:, 4:] / 1.268) * 1.268
    return out, bad
