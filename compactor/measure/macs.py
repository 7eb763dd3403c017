"""Multiply-accumulate counts from an ONNX graph, by shape inference at concrete shapes.

Counted: Conv / ConvInteger / QLinearConv / ConvTranspose, Gemm, MatMul / MatMulInteger /
QLinearMatMul (QDQ models keep float op types, so they count the same as float). Other ops
are cheap next to these and are ignored. Shapes come from ONNX shape inference, or, where
it cannot follow the graph (reshapes computed at run time), from one ONNX Runtime run on
zeros; when neither works there is no count, and :func:`mac_count` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacCount:
    """MACs of each heavy node (keyed by :func:`node_key`), or ``per_node=None`` with the
    ``reason`` they could not be counted, for the caller to show ("not computable (...)")."""

    per_node: dict[str, int] | None
    reason: str | None = None

    @property
    def total(self) -> int | None:
        return None if self.per_node is None else int(sum(self.per_node.values()))


class _NotComputable(Exception):
    """Why the shapes of some heavy node cannot be found; the message is the reason."""


def count_macs(model, input_shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Total MACs at the given input shapes, or None when shapes cannot be inferred."""
    return mac_count(model, input_shapes).total


def node_key(node, index: int) -> str:
    """A node's name, or a stable stand-in for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"


def macs_by_node(model, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int] | None:
    """MACs of each heavy node (keyed by :func:`node_key`), or None when shapes of some heavy
    node cannot be inferred (:func:`mac_count` gives the reason too)."""
    return mac_count(model, input_shapes).per_node


def mac_count(model, input_shapes: Mapping[str, tuple[int, ...]]) -> MacCount:
    """MACs of each heavy node at ``input_shapes``, or the reason there is no count."""
    try:
        return MacCount(_count(model, input_shapes))
    except _NotComputable as e:
        # Logged and returned: a figure that is missing from a report says why.
        log.info("MACs not computable: %s", e)
        return MacCount(None, str(e))


def _count(model, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name not in input_shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, input_shapes[inp.name], strict=False):  # rank checked by ORT
            d.ClearField("dim_param")
            d.dim_value = int(v)
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises many types for one cause
        raise _NotComputable(f"ONNX shape inference failed: {_first_line(e)}") from e

    shapes: dict[str, tuple[int, ...] | None] = {}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            shapes[vi.name] = None
        else:
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for init in m.graph.initializer:
        shapes[init.name] = tuple(init.dims)

    out, unknown = _heavy_macs(m, shapes)
    if unknown:
        log.debug("%d heavy nodes without inferable shapes; running the model for them",
                  unknown)
        try:
            shapes.update(_shapes_by_running(model, input_shapes))
        except _NotComputable as e:
            raise _NotComputable(
                f"{unknown} heavy node(s) have shapes ONNX shape inference cannot follow, "
                f"and {e}") from e
        out, unknown = _heavy_macs(m, shapes)
        if unknown:
            raise _NotComputable(
                f"{unknown} heavy node(s) have shapes that neither ONNX shape inference nor "
                "a run on zeros gives")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def _heavy_macs(model, shapes) -> tuple[dict[str, int], int]:
    """MACs of each heavy node whose shapes are known, and how many heavy nodes are not."""
    out: dict[str, int] = {}
    unknown = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type not in _HEAVY:
            continue
        try:
            macs = _node_macs(node, node.op_type, shapes)
        except (KeyError, TypeError, IndexError, ValueError):
            macs = None
        if macs is None:
            unknown += 1
        else:
            out[node_key(node, i)] = macs
    return out, unknown


_NP_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32,
             9: np.bool_, 2: np.uint8, 3: np.int8}


def _shapes_by_running(model, input_shapes: Mapping[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
    """Shapes of the heavy nodes' inputs and outputs, read off one ONNX Runtime run on zeros
    at ``input_shapes``: for graphs whose reshapes ONNX shape inference cannot follow
    (shapes computed at run time, as in exported transformers). Raises _NotComputable
    with the reason the model cannot be run."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise _NotComputable("onnxruntime is not installed to run the model") from e
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    have = {o.name for o in m.graph.output}
    wanted = [t for n in m.graph.node if n.op_type in _HEAVY
              for t in (*n.input, *n.output) if t and t not in inits]
    wanted = list(dict.fromkeys(wanted))
    for t in wanted:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    feeds = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        if i.name not in input_shapes:
            raise _NotComputable(f"no shape was given for input {i.name!r} to run the model")
        dtype = _NP_TYPES.get(i.type.tensor_type.elem_type)
        if dtype is None:
            raise _NotComputable(
                f"input {i.name!r} has an element type ({i.type.tensor_type.elem_type}) "
                "the model cannot be fed zeros of")
        feeds[i.name] = np.zeros(tuple(int(d) for d in input_shapes[i.name]), dtype=dtype)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        values = sess.run(wanted, feeds)
    except Exception as e:  # noqa: BLE001 - ORT raises many types for one cause
        raise _NotComputable(f"running it on zeros failed: {_first_line(e)}") from e
    return {t: tuple(v.shape) for t, v in zip(wanted, values, strict=True)}


_HEAVY = {
    "Conv",
    "ConvInteger",
    "QLinearConv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "QLinearMatMul",
}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            if a.ints:
                return list(a.ints)
            return a.i
    return default


def _node_macs(node, op, shapes) -> int | None:
    if op not in _HEAVY:
        return 0
    out = shapes.get(node.output[0])
    if op in ("Conv", "ConvInteger"):
        w = shapes.get(node.input[1])
    elif op == "QLinearConv":
        w = shapes.get(node.input[3])
    elif op == "ConvTranspose":
        x = shapes.get(node.input[0])
        w = shapes.get(node.input[1])
        if x is None or w is None:
            return None
        # every input element is multiplied by a (C_out/group x kernel) slab
        return int(np.prod(x) * np.prod(w[1:]))
    else:
        a_idx, b_idx = (0, 3) if op == "QLinearMatMul" else (0, 1)
        a = shapes.get(node.input[a_idx])
        b = shapes.get(node.input[b_idx])
        if out is None or a is None or b is None:
            return None
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
        return int(np.prod(out) * k)
    if out is None or w is None:
        return None
    # out = N x C_out x spatial; each output element needs C_in/group x kernel MACs
    return int(np.prod(out) * np.prod(w[1:]))
