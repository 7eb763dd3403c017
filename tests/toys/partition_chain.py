"""Toys for multi-device partition plans: a deeper chain CNN (onnx.helper, no torch), a
quick-timing profile and topology files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_chain_cnn(path: Path, size: int = 16, channels: int = 8, depth: int = 4,
                   pool: bool = True, opset: int = 17) -> Path:
    """``depth`` × (conv 3×3 → relu), a max-pool after the second, then global pool →
    flatten → gemm: a chain whose convolutional prefix can be tiled. ``opset`` as low as
    9 (below 10 there is no QuantizeLinear: no int8 on the wire)."""
    rng = np.random.default_rng(0)
    nodes, inits, x, cin = [], [], "image", 1
    for i in range(depth):
        w = (rng.standard_normal((channels, cin, 3, 3)) / math.sqrt(9 * cin)).astype(np.float32)
        b = (rng.standard_normal(channels) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"c{i}.w"), numpy_helper.from_array(b, f"c{i}.b")]
        nodes.append(helper.make_node("Conv", [x, f"c{i}.w", f"c{i}.b"], [f"c{i}"],
                                      name=f"conv{i}", pads=[1, 1, 1, 1],
                                      strides=[2, 2] if i == 2 else [1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x, cin = f"r{i}", channels
        if pool and i == 1:
            nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            x = "pool"
    w = (rng.standard_normal((channels, 10)) / math.sqrt(channels)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "fc.w"))
    fc = ["flat", "fc.w"]
    if opset < 11:  # Gemm's bias is optional from opset 11
        inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
        fc.append("fc.b")
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", fc, ["logits"], name="fc")]
    g = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def skip_chain_onnx(path: Path) -> Path:
    """relu → neg → abs → add(·, relu): the relu's output ``a`` skips over the middle, so a
    chain part holding only ``abs`` (positions 2..3) passes ``a`` through whole."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Neg", ["a"], ["b"], name="n1"),
             helper.make_node("Abs", ["b"], ["c"], name="n2"),
             helper.make_node("Add", ["c", "a"], ["y"], name="add")]
    g = helper.make_graph(nodes, "skip",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def quick_profile(path: Path, name: str = "quick", memory_mb: float | None = None,
                  cls: str = "host") -> Path:
    """A profile that times quickly: one thread, a few runs."""
    text = (f"name: {name}\nclass: {cls}\nintra_op_threads: 1\nbatch_sizes: [1]\n"
            "timing: {warmup: 1, min_runs: 5, min_time_s: 0, max_time_s: 0.1}\n")
    if memory_mb is not None:
        text += f"limits: {{memory_mb: {memory_mb}}}\n"
    path.write_text(text, encoding="utf-8")
    return path


def chain_topology(path: Path, profile: Path, n: int = 3, bandwidth: str = "10Mbps",
                   rtt: str = "10ms", slowdowns: list[float] | None = None,
                   memory_mb: list[float | None] | None = None) -> Path:
    """``n`` devices d0..d{n-1} on ``profile``, each linked to the next."""
    lines = ["kind: chain", "devices:"]
    for i in range(n):
        extra = ""
        if slowdowns:
            extra += f", slowdown: {slowdowns[i]}"
        if memory_mb and memory_mb[i] is not None:
            extra += f", memory_mb: {memory_mb[i]}"
        lines.append(f"  - {{name: d{i}, profile: {profile}{extra}}}")
    lines.append("links:")
    for i in range(n - 1):
        lines.append(f"  - {{from: d{i}, to: d{i + 1}, bandwidth: {bandwidth}, rtt: {rtt}}}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def peers_topology(path: Path, profile: Path, n: int = 3, bandwidth: str = "100Mbps",
                   rtt: str = "2ms") -> Path:
    lines = ["kind: peers", "devices:"]
    lines += [f"  - {{name: p{i}, profile: {profile}}}" for i in range(n)]
    lines.append(f"link: {{bandwidth: {bandwidth}, rtt: {rtt}}}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fake_cache(model: Path, topo, per_node_ms: float = 1.0) -> dict:
    """Fake host times (``per_node_ms`` a node) for every timing group of ``topo``'s
    devices (an emulated device and this host time apart), so known numbers decide."""
    from compactor.partition.graph import PartitionGraph
    from compactor.partition.multi import _side
    from compactor.partition.profile import HostTimes

    g = PartitionGraph.load(model, 1)
    pos = [0, *g.candidates(4)[0], g.n_nodes]
    segs = [per_node_ms * (b - a) for a, b in zip(pos[:-1], pos[1:], strict=True)]
    return {(str(model.resolve()), 1, tuple(pos), _side(d).timing_key()):
            HostTimes(pos, sum(segs), segs, 0.0) for d in topo.devices}
