"""A YOLOv8-style detector toy (built with ``onnx.helper``, no torch, milliseconds to make):
one output ``output0 [B, 4 + C, N]`` that concatenates box coordinates in pixels (0..640)
and sigmoid class scores (0..1), as YOLOv8's exported head does.

A single static int8 range over that output spans both units: one quantization step of
about 2.5 px (uint8 over 0..640) is far coarser than the scores, which collapse to one or
two values (a real YOLOv8-style model's scale was 1.268: detection F1 against fp32 0.52).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from toys.onnx_save import save_graph

DET_CLASSES = 18
DET_SIZE = 32  # input height and width
DET_STRIDE = 4  # two stride-2 convolutions
DET_ANCHORS = (DET_SIZE // DET_STRIDE) ** 2
IMAGE_PX = 640.0  # box coordinates are in pixels of a 640x640 image


def detector_onnx(path: Path, seed: int = 0, classes: int = DET_CLASSES) -> Path:
    """x[B, 3, 32, 32] → 2 strided Conv+Relu → box head (Conv → Sigmoid → ×640: pixels)
    and class head (Conv → Sigmoid: scores), each reshaped to [B, ·, N] and concatenated
    on axis 1 into ``output0 [B, 4 + classes, N]``."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((16, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (r.standard_normal((32, 16, 3, 3)) * 0.15).astype(np.float32)
    wb = (r.standard_normal((4, 32, 1, 1)) * 0.06).astype(np.float32)
    wc = (r.standard_normal((classes, 32, 1, 1)) * 0.1).astype(np.float32)
    bc = np.linspace(-3.0, 1.0, classes, dtype=np.float32)  # rare and common classes
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="/backbone/conv1",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/backbone/relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="/backbone/conv2",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="/backbone/relu2"),
        helper.make_node("Conv", ["r2", "WB"], ["b"], name="/head/box_conv"),
        helper.make_node("Sigmoid", ["b"], ["bs"], name="/head/box_sigmoid"),
        helper.make_node("Mul", ["bs", "px"], ["bp"], name="/head/box_pixels"),
        helper.make_node("Reshape", ["bp", "box_shape"], ["boxes"], name="/head/box_flat"),
        helper.make_node("Conv", ["r2", "WC", "BC"], ["c"], name="/head/cls_conv"),
        helper.make_node("Sigmoid", ["c"], ["cs"], name="/head/cls_sigmoid"),
        helper.make_node("Reshape", ["cs", "cls_shape"], ["scores"], name="/head/cls_flat"),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], name="/head/concat",
                         axis=1),
    ]
    inits = {"W1": w1, "W2": w2, "WB": wb, "WC": wc, "BC": bc,
             "px": np.array(IMAGE_PX, dtype=np.float32),
             "box_shape": np.array([0, 4, -1], dtype=np.int64),
             "cls_shape": np.array([0, classes, -1], dtype=np.int64)}
    return save_graph(
        path, nodes, inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, DET_SIZE,
                                                                DET_SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       ["batch", 4 + classes, DET_ANCHORS])],
        name="yolo_like_detector")


def detector_images(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, DET_SIZE, DET_SIZE))
            .astype(np.float32)}
