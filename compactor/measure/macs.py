"""Multiply-accumulate counts from an ONNX graph, by shape inference at concrete shapes.

Counted: Conv / ConvInteger / QLinearConv / ConvTranspose, Gemm, MatMul / MatMulInteger /
QLinearMatMul (QDQ models keep float op types, so they count the same as float), and the
recurrent LSTM / GRU / RNN (and ORT's DynamicQuantizeLSTM): gates x (input + hidden) x hidden
per step, times sequence length, batch and directions. Other ops are cheap next to these and
are ignored. Shapes come from ONNX shape inference, or, where it cannot follow the graph
(reshapes computed at run time), from one ONNX Runtime run on zeros; when neither works
there is no count, and :func:`mac_count` says why.

Subgraphs are counted: an ``If`` by its larger branch (one runs per call), a ``Loop`` or
``Scan`` body once, i.e. per iteration (the trip count is data); :attr:`MacCount.notes`
says which. Nodes in subgraphs are keyed ``<parent key>/<attribute>/<node key>``.
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
    notes: tuple[str, ...] = ()  # how subgraphs were counted (If branch, Loop per iteration)

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
        per_node, notes = _count(model, input_shapes)
        return MacCount(per_node, notes=tuple(notes))
    except _NotComputable as e:
        # Logged and returned: a figure that is missing from a report says why.
        log.info("MACs not computable: %s", e)
        return MacCount(None, str(e))


def _count(model, input_shapes: Mapping[str, tuple[int, ...]]
           ) -> tuple[dict[str, int], list[str]]:
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
    for g in all_graphs(m.graph):
        for vi in [*g.input, *g.value_info, *g.output]:
            tt = vi.type.tensor_type
            if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
                shapes.setdefault(vi.name, None)
            else:
                shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
        for init in g.initializer:
            shapes[init.name] = tuple(init.dims)
        for n in g.node:  # Constant weights (exporters of subgraphs often use them)
            if n.op_type == "Constant":
                t = next((a.t for a in n.attribute if a.name == "value"), None)
                if t is not None and n.output:
                    shapes[n.output[0]] = tuple(t.dims)

    out, unknown, notes = _heavy_macs(m, shapes)
    if unknown:
        log.debug("%d heavy nodes without inferable shapes; running the model for them",
                  unknown)
        try:
            shapes.update(_shapes_by_running(model, input_shapes))
        except _NotComputable as e:
            raise _NotComputable(
                f"{unknown} heavy node(s) have shapes ONNX shape inference cannot follow, "
                f"and {e}") from e
        out, unknown, notes = _heavy_macs(m, shapes)
        if unknown:
            raise _NotComputable(
                f"{unknown} heavy node(s) have shapes that neither ONNX shape inference nor "
                "a run on zeros gives")
    return out, notes


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


SUBGRAPH_OPS = ("If", "Loop", "Scan")


def all_graphs(graph) -> list:
    """``graph`` and every subgraph in it (``If`` branches, ``Loop``/``Scan`` bodies, ...),
    recursively."""
    out = [graph]
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += all_graphs(g)
    return out


def iter_nodes(graph, prefix: str = ""):
    """``(key, node)`` for every node of ``graph`` and its subgraphs, in graph order; a
    subgraph's nodes are keyed ``<parent key>/<attribute>/<node key>``."""
    for i, node in enumerate(graph.node):
        key = prefix + node_key(node, i)
        yield key, node
        for a in node.attribute:
            for j, g in enumerate(([a.g] if a.HasField("g") else []) + list(a.graphs)):
                sub = f"{key}/{a.name}" + (f"[{j}]" if a.graphs else "") + "/"
                yield from iter_nodes(g, sub)


def _heavy_macs(model, shapes) -> tuple[dict[str, int], int, list[str]]:
    """MACs of each heavy node whose shapes are known, how many heavy nodes are not, and
    how the subgraphs were counted."""
    notes: list[str] = []
    out, unknown = _graph_macs(model.graph, shapes, "", notes)
    return out, unknown, notes


def _body_input_shapes(node, shapes) -> None:
    """ONNX shape inference does not write what it infers into a Loop or Scan body: give
    the body's inputs the shapes the node feeds them (loop-carried values as they come in;
    a scanned input less its scan axis), so the body's heavy nodes can be counted."""
    body = next((a.g for a in node.attribute if a.name == "body"), None)
    if body is None:
        return
    if node.op_type == "Loop":
        # body inputs: iteration number, condition, then the loop-carried values
        pairs = [(b.name, shapes.get(o)) for b, o in zip(body.input[2:], node.input[2:],
                                                         strict=False)]
        pairs += [(body.input[0].name, ()), (body.input[1].name, ())][: len(body.input)]
    elif node.op_type == "Scan":
        scanned = _attr(node, "num_scan_inputs", 0)
        n_state = len(node.input) - scanned
        axes = _attr(node, "scan_input_axes", None) or [0] * scanned
        pairs = [(b.name, shapes.get(o)) for b, o in zip(body.input[:n_state],
                                                         node.input[:n_state], strict=False)]
        for k, (b, o) in enumerate(zip(body.input[n_state:], node.input[n_state:],
                                       strict=False)):
            full = shapes.get(o)
            if full is not None and axes[k] < len(full):
                pairs.append((b.name, tuple(d for i, d in enumerate(full) if i != axes[k])))
    else:
        return
    for name, shape in pairs:
        if shape is not None and shapes.get(name) is None:
            shapes[name] = shape


def _graph_macs(graph, shapes, prefix: str, notes: list[str]) -> tuple[dict[str, int], int]:
    out: dict[str, int] = {}
    unknown = 0
    for i, node in enumerate(graph.node):
        key = prefix + node_key(node, i)
        if node.op_type in _HEAVY:
            try:
                macs = _node_macs(node, node.op_type, shapes)
            except (KeyError, TypeError, IndexError, ValueError):
                macs = None
            if macs is None:
                unknown += 1
            else:
                out[key] = macs
        subs = [(a.name, g) for a in node.attribute
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
        if not subs:
            continue
        _body_input_shapes(node, shapes)
        counted = [(name, *_graph_macs(g, shapes, f"{key}/{name}/", notes))
                   for name, g in subs]
        if node.op_type == "If" and len(counted) > 1:
            name, per, unk = max(counted, key=lambda c: sum(c[1].values()))
            out.update(per)
            unknown += unk
            if any(c[1] for c in counted):
                notes.append(f"If {key!r}: its larger branch ({name}) counted; one branch "
                             "runs per call")
            continue
        for _name, per, unk in counted:
            out.update(per)
            unknown += unk
        if node.op_type in ("Loop", "Scan") and any(c[1] for c in counted):
            notes.append(f"{node.op_type} {key!r}: body counted once, i.e. MACs per "
                         "iteration (the iteration count is data)")
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
    if not wanted:
        raise _NotComputable("they are inside subgraphs (If/Loop/Scan), whose tensors a run "
                             "cannot expose")
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
    from compactor.measure.shapes import summarize_ort_error

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4  # the failure is the result here: no red log line
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ro = ort.RunOptions()
        ro.log_severity_level = 4
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        values = sess.run(wanted, feeds, ro)
    except Exception as e:  # noqa: BLE001 - ORT raises many types for one cause
        raise _NotComputable(f"running it on zeros failed: {summarize_ort_error(e)}") from e
    return {t: tuple(v.shape) for t, v in zip(wanted, values, strict=True)}


RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}

_HEAVY = {
    "LSTM",
    "GRU",
    "RNN",
    "DynamicQuantizeLSTM",
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


def _recurrent_macs(node, shapes) -> int | None:
    """Per step and direction, every gate multiplies the input by W and the hidden state by
    R: W is [dirs, gates x hidden, input] (DynamicQuantizeLSTM: [dirs, input, 4 x hidden]),
    R likewise with hidden for input; X is [seq, batch, input] (layout 1: batch first)."""
    x = shapes.get(node.input[0])
    w = shapes.get(node.input[1])
    r = shapes.get(node.input[2])
    if x is None or w is None or r is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) == 1 else (x[0], x[1])
    return int(seq * batch * w[0] * (np.prod(w[1:]) + np.prod(r[1:])))


def _node_macs(node, op, shapes) -> int | None:
    if op not in _HEAVY:
        return 0
    if op in RECURRENT:
        return _recurrent_macs(node, shapes)
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
        if a is None or b is None:
            return None
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
        if out is None and op != "Gemm" and len(b) == 2 and len(a) >= 1:
            # inside a subgraph shape inference may not type the output: rows x columns
            return int(np.prod(a[:-1]) * b[-1] * k)
        if out is None:
            return None
        return int(np.prod(out) * k)
    if out is None or w is None:
        return None
    # out = N x C_out x spatial; each output element needs C_in/group x kernel MACs
    return int(np.prod(out) * np.prod(w[1:]))
