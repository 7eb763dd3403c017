"""A toy for the spatial split's DAG prefix: residual blocks and element-wise joins
(onnx.helper, no torch)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def residual_cnn(path: Path, size: int = 16, channels: int = 8, opset: int = 17) -> Path:
    """A DAG prefix of the kinds a spatial split tiles (onnx.helper, no torch): a stem
    conv, an inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project, ``Add`` of
    the skip), two branches of different halos joined by ``Mul`` then a per-channel ``Add``
    of a constant, a stride-2 conv, and a ``Sum`` of one tensor with its max-pool and its
    conv; then global pool → flatten → gemm."""
    rng = np.random.default_rng(1)
    c, e = channels, 2 * channels
    nodes, inits = [], []

    def conv(name, x, cin, cout, k, stride=1, groups=1, dil=1):
        w = rng.standard_normal((cout, cin // groups, k, k)) / math.sqrt(k * k * cin / groups)
        inits.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}.w"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.1)
                                              .astype(np.float32), f"{name}.b")])
        p = dil * (k - 1) // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      pads=[p, p, p, p], strides=[stride, stride],
                                      dilations=[dil, dil], group=groups))
        return name

    def op(kind, ins, name, **attrs):
        nodes.append(helper.make_node(kind, ins, [name], name=name, **attrs))
        return name

    s = op("Relu", [conv("stem", "image", 1, c, 3)], "stem.relu")
    h = op("Relu", [conv("b1.expand", s, c, e, 1)], "b1.expand.relu")
    h = op("Relu", [conv("b1.dw", h, e, e, 3, groups=e)], "b1.dw.relu")
    b1 = op("Add", [s, conv("b1.project", h, e, c, 1)], "b1.add")
    u = conv("b2.u", b1, c, c, 3)
    v = op("Sigmoid", [conv("b2.v", b1, c, c, 3, dil=2)], "b2.v.sigmoid")
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((1, c, 1, 1)) * 0.1).astype(np.float32), "b2.bias"))
    g = op("Add", [op("Mul", [u, v], "b2.mul"), "b2.bias"], "b2.add")
    d = op("Relu", [conv("down", g, c, c, 3, stride=2)], "down.relu")
    pool = op("MaxPool", [d], "b3.pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b3 = op("Sum", [d, pool, conv("b3.conv", d, c, c, 3)], "b3.sum")
    w = (rng.standard_normal((c, 10)) / math.sqrt(c)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [b3], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc")]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path
