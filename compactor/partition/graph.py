"""Where an ONNX graph can be cut into a device part (head) and a server part (tail).

The graph is a DAG. A cut puts a prefix of a topological order of the graph's nodes on the
device and the rest on the server; the tensors produced on the device side (or model
inputs) that a server-side node still needs are the ones sent over the network. On a chain
that is one tensor; where a residual connection crosses the cut it is the branch's tensor
plus the skip tensor, and so on. Prefixes of the model's own (topological) node order are
the candidates: every one of them is a valid split, and with ``max_tensors`` they stay the
small cuts a deployment would use.

Nodes whose inputs are all constant (``Constant``, shape arithmetic on weights) never
decide a cut: each part gets its own copy of the ones it needs.

Sizes of the tensors come from ONNX shape inference with the model's inputs fixed at the
plan's batch size; where inference cannot size a tensor, from a run of the model
(:meth:`PartitionGraph.observe`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from compactor.errors import ModelLoadError, PassError, UsageError

log = logging.getLogger(__name__)

QUANT_SUFFIX = ".int8"  # name of a tensor's quantized form on the wire


@dataclass(frozen=True)
class TensorInfo:
    """A tensor that crosses a cut, at the plan's batch size."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    graph_input: bool = False
    sized_by: str = "shape inference"  # or "a run of the model"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def compressible(self) -> bool:
        """float32 tensors go over the wire as uint8 under ``--compress-transfer int8``."""
        return self.dtype == "float32"

    def wire_bytes(self, compress: str | None) -> int:
        """Bytes on the network: int8 compression sends one byte per float32 element."""
        if compress == "int8" and self.compressible:
            return int(np.prod(self.shape, dtype=np.int64))
        return self.nbytes

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes, "model_input": self.graph_input,
                "sized_by": self.sized_by}


@dataclass(frozen=True)
class Cut:
    """Device runs the first ``position`` (non-constant) nodes, the server the rest.

    ``position == 0`` is full offload (the model's inputs are sent), ``position == n`` is
    all on device (nothing is sent)."""

    position: int
    n_nodes: int
    tensors: tuple[TensorInfo, ...]
    after: str = ""  # the last device-side node, for people

    @property
    def kind(self) -> str:
        if self.position == 0:
            return "offload"
        if self.position == self.n_nodes:
            return "on-device"
        return "split"

    @property
    def id(self) -> str:
        return self.kind if self.kind != "split" else f"split@{self.position}"

    @property
    def sends_input(self) -> bool:
        return any(t.graph_input for t in self.tensors)

    def wire_bytes(self, compress: str | None = None) -> int:
        """Payload bytes sent at this cut (no message framing)."""
        return sum(t.wire_bytes(compress) for t in self.tensors) if self.kind != "on-device" \
            else 0

    def wire_tensors(self, compress: str | None = None) -> list[tuple[str, str, tuple]]:
        """(name, dtype, shape) of each tensor as it goes over the network."""
        if self.kind == "on-device":
            return []
        out = []
        for t in self.tensors:
            if compress == "int8" and t.compressible:
                out.append((t.name + QUANT_SUFFIX, "uint8", t.shape))
            else:
                out.append((t.name, t.dtype, t.shape))
        return out

    def describe(self) -> str:
        if self.kind == "on-device":
            return "all on device"
        if self.kind == "offload":
            return "full offload (send the input)"
        names = ", ".join(t.name for t in self.tensors)
        return f"split after {self.after} (sends {names})"


@dataclass
class Rejected:
    position: int
    reason: str


@dataclass
class _Node:
    index: int  # in model.graph.node
    inputs: tuple[str, ...]  # explicit and implicit (subgraph) inputs, no ""
    outputs: tuple[str, ...]
    label: str


@dataclass
class PartitionGraph:
    """An ONNX model, its nodes in topological order, and where it can be cut."""

    model: object  # onnx.ModelProto (symbolic shapes, as loaded)
    path: Path
    batch_size: int
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    notes: list[str] = field(default_factory=list)
    _nodes: list[_Node] = field(default_factory=list)  # dynamic nodes, topological order
    _static: list[_Node] = field(default_factory=list)  # nodes of constants only
    _static_producer: dict[str, _Node] = field(default_factory=dict)
    _produced_at: dict[str, int] = field(default_factory=dict)  # model inputs at -1
    _last_use: dict[str, int] = field(default_factory=dict)
    _inferred: dict[str, tuple[tuple[int, ...] | None, str | None]] = field(
        default_factory=dict)
    _observed: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    _vi: dict[str, object] = field(default_factory=dict)  # name -> ValueInfoProto
    _inits: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Path, batch_size: int, dims: Mapping[str, int] | None = None
             ) -> PartitionGraph:
        import onnx

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}", "check the path")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # noqa: BLE001 - protobuf raises several types
            raise ModelLoadError(f"{path.name} is not an ONNX model: {str(e)[:200]}",
                                 "partition takes an .onnx file") from e
        return cls.from_model(model, path, batch_size, dims)

    @classmethod
    def from_model(cls, model, path: Path, batch_size: int,
                   dims: Mapping[str, int] | None = None) -> PartitionGraph:
        import onnx

        dims = dict(dims or {})
        inits = {i.name for i in model.graph.initializer}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        notes: list[str] = []
        unsized: list[str] = []
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            tt = inp.type.tensor_type
            if not inp.type.HasField("tensor_type") or not tt.elem_type:
                raise ModelLoadError(f"input {inp.name!r} is not a tensor",
                                     "partition handles models with tensor inputs")
            dtypes[inp.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
            if tt.HasField("shape") and not tt.shape.dim:
                # samples are split and sent along axis 0 of every input
                raise UsageError(
                    f"input {inp.name!r} is a scalar; the partition planner splits every "
                    "input along a batch axis 0 and cannot plan this model yet",
                    "plan a model whose inputs all carry the batch on axis 0 (optimize, "
                    "bench and check handle scalar inputs)",
                )
            shape = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    if axis == 0 and d.dim_value != batch_size:
                        notes.append(f"input {inp.name!r} has a fixed batch of {d.dim_value}; "
                                     f"sized at {d.dim_value}, not {batch_size}")
                    shape.append(d.dim_value)
                elif d.dim_param and d.dim_param in dims:
                    shape.append(dims[d.dim_param])
                elif axis == 0:
                    shape.append(batch_size)
                else:
                    unsized.append(f"{inp.name}[{axis}]" + (f" ({d.dim_param!r})"
                                                             if d.dim_param else ""))
                    shape.append(-1)
            shapes[inp.name] = tuple(shape)
        if unsized:
            names = [u.split("'")[1] for u in unsized if "'" in u] or ["NAME"]
            raise UsageError(
                f"dynamic input axes other than the batch have no size: {', '.join(unsized)}; "
                "the tensors sent over the network cannot be sized",
                "give each a size, e.g. " + " ".join(f"--dim {n}=N" for n in names)
                + " (the batch axis takes --batch-size or the device profile's batch size)",
            )
        g = cls(model=model, path=path, batch_size=batch_size, input_shapes=shapes,
                input_dtypes=dtypes, notes=notes)
        g._inits = inits
        g._index()
        g._infer()
        return g

    def _index(self) -> None:
        graph = self.model.graph
        nodes = []
        for i, n in enumerate(graph.node):
            ins = [x for x in n.input if x]
            ins += sorted(_implicit_inputs(n) - set(ins))
            label = n.name or f"{n.op_type}#{i}"
            nodes.append(_Node(i, tuple(ins), tuple(o for o in n.output if o), label))
        order = _topological(nodes)
        dynamic = set(self.input_shapes)
        for nd in order:
            if any(x in dynamic for x in nd.inputs):
                dynamic.update(nd.outputs)
                self._nodes.append(nd)
            else:
                self._static.append(nd)
                for o in nd.outputs:
                    self._static_producer[o] = nd
        for name in self.input_shapes:
            self._produced_at[name] = -1
        for pos, nd in enumerate(self._nodes):
            for o in nd.outputs:
                self._produced_at[o] = pos
            for x in nd.inputs:
                if x in self._produced_at:
                    self._last_use[x] = pos
        n = len(self._nodes)
        for o in graph.output:
            if o.name in self._produced_at:
                self._last_use[o.name] = n
        if n == 0:
            raise ModelLoadError(f"{self.path.name} has no node that depends on its inputs",
                                 "there is nothing to partition")

    def _infer(self) -> None:
        import onnx
        from onnx import shape_inference

        try:
            sym = shape_inference.infer_shapes(self.model)
        except Exception as e:  # noqa: BLE001 - an un-inferable graph is still cuttable
            log.debug("symbolic shape inference failed: %s", e)
            sym = self.model
        for vi in [*sym.graph.input, *sym.graph.value_info, *sym.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._vi.setdefault(vi.name, vi)
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for inp in m.graph.input:
            if inp.name in self.input_shapes:
                for d, v in zip(inp.type.tensor_type.shape.dim,
                                self.input_shapes[inp.name], strict=True):
                    d.ClearField("dim_param")
                    d.dim_value = int(v)
        try:
            m = shape_inference.infer_shapes(m, data_prop=True)
        except Exception as e:  # noqa: BLE001 - onnx raises many types; noted in the plan
            log.debug("shape inference at batch %d failed: %s", self.batch_size, e)
            self.notes.append("ONNX shape inference failed; tensors are sized by a run")
            return
        for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            dtype = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                     if tt.elem_type else None)
            shape = None
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shape = tuple(int(d.dim_value) for d in tt.shape.dim)
            self._inferred[vi.name] = (shape, dtype)

    # ------------------------------------------------------------------ queries

    @property
    def n_nodes(self) -> int:
        return len(self._nodes)

    @property
    def input_names(self) -> list[str]:
        return list(self.input_shapes)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def crossing(self, position: int) -> list[str]:
        """Tensors made before ``position`` (or model inputs) needed at or after it."""
        return [t for t, p in self._produced_at.items()
                if p < position <= self._last_use.get(t, -2)]

    def needs_sizes(self) -> list[str]:
        """Tensors of any cut that shape inference could not size."""
        out = set()
        for k in range(self.n_nodes + 1):
            for t in self.crossing(k):
                shape, dtype = self._inferred.get(t, (None, None))
                if (shape is None or dtype is None) and t not in self.input_shapes:
                    out.add(t)
        return sorted(out)

    def observe(self, values: Mapping[str, np.ndarray]) -> None:
        """Sizes from a run of the model, for the tensors inference left unsized."""
        for k, v in values.items():
            self._observed[k] = (tuple(int(d) for d in v.shape), v.dtype.name)

    def info(self, name: str) -> TensorInfo:
        if name in self.input_shapes:
            return TensorInfo(name, self.input_shapes[name], self.input_dtypes[name], True)
        shape, dtype = self._inferred.get(name, (None, None))
        if shape is not None and dtype is not None:
            return TensorInfo(name, shape, dtype)
        if name in self._observed:
            shape, dtype = self._observed[name]
            return TensorInfo(name, shape, dtype, sized_by="a run of the model")
        raise PassError(f"tensor {name!r} could not be sized", "run with --debug")

    def node_weight_bytes(self) -> list[int]:
        """Bytes of the weights each node (in topological order) brings to its part: the
        initializers it reads, directly or through nodes of constants, each counted at the
        first node that needs it."""
        sizes = {t.name: _init_bytes(t) for t in self.model.graph.initializer}
        seen: set[str] = set()
        out = []
        for nd in self._nodes:
            total, stack = 0, list(nd.inputs)
            while stack:
                x = stack.pop()
                if x in seen:
                    continue
                seen.add(x)
                if x in sizes:
                    total += sizes[x]
                elif x in self._static_producer:
                    stack.extend(self._static_producer[x].inputs)
            out.append(total)
        return out

    def cut(self, position: int) -> Cut:
        n = self.n_nodes
        tensors = () if position == n else tuple(self.info(t) for t in self.crossing(position))
        after = self._nodes[position - 1].label if position > 0 else ""
        return Cut(position, n, tensors, after)

    def candidates(self, max_tensors: int = 4, keep_input_on_device: bool = False
                   ) -> tuple[list[int], list[Rejected]]:
        """Positions of the valid splits (extremes excluded), and why the others are not."""
        outputs = set(self.output_names)
        ok: list[int] = []
        rejected: list[Rejected] = []
        for k in range(1, self.n_nodes):
            cross = self.crossing(k)
            early = [t for t in cross if t in outputs]
            if early:
                rejected.append(Rejected(k, f"model output {early[0]!r} is computed before it"))
            elif len(cross) > max_tensors:
                rejected.append(Rejected(k, f"{len(cross)} tensors cross it "
                                            f"(more than {max_tensors})"))
            elif keep_input_on_device and any(t in self.input_shapes for t in cross):
                rejected.append(Rejected(k, "it sends a model input "
                                            "(--keep-input-on-device)"))
            else:
                ok.append(k)
        return ok, rejected

    # ------------------------------------------------------------------ extraction

    def part(self, start: int, end: int, inputs: Sequence[str], outputs: Sequence[str],
             name: str = "part"):
        """The nodes at positions [start, end) as a model from ``inputs`` to ``outputs``."""
        import onnx
        from onnx import helper

        chosen = self._nodes[start:end]
        needed_static: dict[int, _Node] = {}
        stack = [x for nd in chosen for x in nd.inputs]
        while stack:
            x = stack.pop()
            nd = self._static_producer.get(x)
            if nd is not None and nd.index not in needed_static:
                needed_static[nd.index] = nd
                stack.extend(nd.inputs)
        keep = sorted([nd.index for nd in chosen] + list(needed_static))
        # the topological order may differ from the file's; keep ours for dynamic nodes
        order = [i for i in keep if i in needed_static] + [nd.index for nd in chosen]
        src = self.model.graph
        nodes = [src.node[i] for i in order]
        used = {x for i in order for x in (*src.node[i].input, *_implicit_inputs(src.node[i]))}
        inits = [t for t in src.initializer if t.name in used]
        graph = helper.make_graph(
            nodes, name,
            [self._value_info(x) for x in inputs],
            [self._value_info(x) for x in outputs],
            initializer=inits,
        )
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                              producer_name="compactor partition")
        m.ir_version = self.model.ir_version
        m.functions.extend(self.model.functions)
        try:
            onnx.checker.check_model(m)
        except onnx.checker.ValidationError as e:
            raise PassError(f"the {name} model is not valid ONNX: {str(e).splitlines()[0]}",
                            "report this model; run with --debug for details") from e
        return m

    def head(self, cut: Cut, compress: str | None = None,
             scales: Mapping[str, WireQuant] | None = None):
        """The device part: model inputs to the cut's tensors (quantized with ``int8``)."""
        if cut.kind == "offload":
            return None
        if cut.kind == "on-device":
            return self.model
        needed = {x for nd in self._nodes[: cut.position] for x in nd.inputs}
        names = [t.name for t in cut.tensors]
        ins = [x for x in self.input_names if x in needed or x in names]
        m = self.part(0, cut.position, ins, names, "head")
        if compress == "int8":
            _quantize_outputs(m, cut.tensors, scales or {})
        return m

    def tail(self, cut: Cut, compress: str | None = None,
             scales: Mapping[str, WireQuant] | None = None):
        """The server part: the cut's tensors to the model outputs."""
        if cut.kind == "on-device":
            return None
        if cut.kind == "offload":
            return self.model
        names = [t.name for t in cut.tensors]
        m = self.part(cut.position, self.n_nodes, names, self.output_names, "tail")
        if compress == "int8":
            _dequantize_inputs(m, cut.tensors, scales or {})
        return m

    def segment(self, a: Cut, b: Cut):
        """Nodes between two cuts, for timing: inputs the ones it uses from cut ``a``,
        outputs the ones it makes for cut ``b`` (or the model's outputs)."""
        made = {o for nd in self._nodes[a.position: b.position] for o in nd.outputs}
        used = {x for nd in self._nodes[a.position: b.position] for x in nd.inputs}
        ins = [t for t in self.crossing(a.position) if t in used]
        later = set(self.crossing(b.position)) if b.kind != "on-device" else set()
        outs = [t for t in made if t in later or t in self.output_names]
        outs = sorted(outs, key=lambda t: self._produced_at[t])
        return self.part(a.position, b.position, ins, outs, f"segment{a.position}"), ins

    def with_outputs(self, names: Iterable[str]):
        """The model with ``names`` added to its outputs (for one run that sees them)."""
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        have = {o.name for o in m.graph.output}
        for x in names:
            if x not in have and x not in self.input_shapes:
                m.graph.output.append(self._value_info(x))
                have.add(x)
        return m

    def _value_info(self, name: str):
        import onnx
        from onnx import helper

        if name in self._vi:
            return self._vi[name]
        shape, dtype = self._inferred.get(name, (None, None))
        if dtype is None and name in self._observed:
            shape, dtype = self._observed[name]
        if dtype is None:
            raise PassError(f"the type of tensor {name!r} cannot be inferred",
                            "run onnx shape inference on the model (onnxsim helps)")
        return helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


# --------------------------------------------------------------------------- helpers


def _implicit_inputs(node) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    from onnx import AttributeProto

    out: set[str] = set()
    for a in node.attribute:
        graphs = []
        if a.type == AttributeProto.GRAPH:
            graphs = [a.g]
        elif a.type == AttributeProto.GRAPHS:
            graphs = list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                defined.update(n.output)
            for n in g.node:
                out.update(x for x in n.input if x and x not in defined)
                out.update(x for x in _implicit_inputs(n) if x not in defined)
    return out


def _init_bytes(t) -> int:
    import onnx

    n = int(np.prod(list(t.dims), dtype=np.int64)) if t.dims else 1
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _topological(nodes: list[_Node]) -> list[_Node]:
    """Kahn's algorithm, keeping the file's order where it is free to."""
    import heapq

    producer = {o: nd.index for nd in nodes for o in nd.outputs}
    deps = {nd.index: {producer[x] for x in nd.inputs if x in producer} for nd in nodes}
    users: dict[int, list[int]] = {nd.index: [] for nd in nodes}
    for i, ds in deps.items():
        for d in ds:
            users[d].append(i)
    waiting = {i: len(ds) for i, ds in deps.items()}
    ready = [i for i, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    by_index = {nd.index: nd for nd in nodes}
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(by_index[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ModelLoadError("the model's graph has a cycle", "is it a valid ONNX model?")
    return order


PER_AXIS_OPSET = 13  # QuantizeLinear/DequantizeLinear take an axis from opset 13
PER_AXIS_GAIN_DB = 3.0  # a scale per channel is kept when it gains this much on calibration


@dataclass(frozen=True)
class WireQuant:
    """How one float tensor travels as uint8: ``q = clip(round(x / scale) + zero_point)``
    with one scale and zero point for the whole tensor (``axis`` None) or one per slice
    along ``axis`` (per channel: a CNN's feature maps on axis 1, a transformer's hidden
    size on its last axis, where a few outlier channels would take a single scale's whole
    range). The scales are constants in both parts; only the uint8 travels."""

    scale: np.ndarray  # float64: a scalar, or one per slice along axis
    zero_point: np.ndarray  # uint8, shaped as scale
    axis: int | None = None
    calibration_sqnr_db: float | None = None  # this choice, on held-out calibration samples
    per_tensor_sqnr_db: float | None = None  # one scale for the tensor, on the same
    channel_gain_db: float | None = None  # the channels' mean SQNR, this over one scale

    @staticmethod
    def unit() -> WireQuant:
        return WireQuant(np.asarray(1.0), np.asarray(0, dtype=np.uint8))

    def _shaped(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        if self.axis is None:
            return self.scale, self.zero_point.astype(np.float64)
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.astype(np.float64).reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        s, z = self._shaped(x.ndim)
        return np.clip(np.rint(x / s) + z, 0, 255).astype(np.uint8)

    def dequantize(self, q: np.ndarray, dtype=np.float32) -> np.ndarray:
        s, z = self._shaped(q.ndim)
        return ((q.astype(np.float64) - z) * s).astype(dtype)

    def to_dict(self) -> dict:
        return {"granularity": "per tensor" if self.axis is None else "per channel",
                "axis": self.axis, "channels": None if self.axis is None
                else int(self.scale.size),
                "calibration_sqnr_db": _finite(self.calibration_sqnr_db),
                "per_tensor_sqnr_db": _finite(self.per_tensor_sqnr_db),
                "channel_gain_db": self.channel_gain_db}


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 2)


def _affine(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 scale and zero point covering [lo, hi] and 0, element-wise."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(np.uint8)
    return scale, zp


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal to noise of ``got`` against ``ref``, in dB (inf when they are equal)."""
    noise = float(np.mean((ref.astype(np.float64) - got) ** 2)) if ref.size else 0.0
    signal = float(np.mean(ref.astype(np.float64) ** 2)) if ref.size else 0.0
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


def _fit(batches: Sequence[np.ndarray], axis: int | None) -> WireQuant:
    """Parameters whose ranges cover every sample of ``batches`` (and 0): one pair for
    the tensor, or one per slice along ``axis``."""
    if axis is None:
        lo = np.asarray(min(float(np.min(v)) for v in batches))
        hi = np.asarray(max(float(np.max(v)) for v in batches))
    else:
        rest = tuple(i for i in range(batches[0].ndim) if i != axis)
        lo = np.min([v.min(axis=rest) for v in batches], axis=0).astype(np.float64)
        hi = np.max([v.max(axis=rest) for v in batches], axis=0).astype(np.float64)
    s, z = _affine(lo, hi)
    return WireQuant(s, z, axis)


SLICE_SQNR_CAP_DB = 80.0  # a slice quantized without error counts as this


def _held_out(data: np.ndarray, axis: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(samples, their round trip) with parameters fitted on the other half of ``data``,
    both ways: ranges per channel fitted on few samples can be too tight for new ones,
    and that shows here, not on the samples they were fitted on."""
    half = len(data) // 2
    out = []
    for fit, test in ((data[:half], data[half:]), (data[half:], data[:half])):
        w = _fit([fit], axis)
        out.append((test, w.dequantize(w.quantize(test), np.float64)))
    return out


def _whole_db(pairs) -> float:
    return float(np.mean([sqnr_db(t, r) for t, r in pairs]))


def _channel_db(pairs, axis: int) -> float:
    """The mean over the channels along ``axis`` of each channel's own SQNR: a channel
    whose values one scale rounds away counts, though its share of the tensor's energy
    (all a whole-tensor SQNR sees) is small; it may carry what the next layer uses."""
    dbs = []
    for t, r in pairs:
        rest = tuple(i for i in range(t.ndim) if i != axis)
        sig, noise = np.mean(t ** 2, axis=rest), np.mean((t - r) ** 2, axis=rest)
        keep = sig > 0
        with np.errstate(divide="ignore"):
            db = 10 * np.log10(sig[keep] / noise[keep])
        dbs.append(np.minimum(db, SLICE_SQNR_CAP_DB))
    every = np.concatenate(dbs)
    return float(np.mean(every)) if every.size else SLICE_SQNR_CAP_DB


SCORE_SAMPLES = 64  # at most this many samples score the choice (the planners calibrate on <= 64)


def quant_params(values: Iterable[np.ndarray], opset: int = 0) -> WireQuant:
    """uint8 parameters for a tensor from calibration ``values`` (batches along axis 0):
    one scale for the tensor, or, from ``PER_AXIS_OPSET``, one per channel along the axis
    (not the batch's) where that raises the channels' mean SQNR most, when it raises it by
    at least ``PER_AXIS_GAIN_DB``. The choice is scored on samples the parameters were not
    fitted on (fitted on one half of the first ``SCORE_SAMPLES`` calibration samples,
    scored on the other); the ranges kept cover every calibration sample."""
    vals = [np.asarray(v) for v in values if np.size(v)]
    if not vals:
        return WireQuant.unit()
    whole = _fit(vals, None)
    if len({v.shape[1:] for v in vals}) != 1 or vals[0].ndim < 2:
        return whole
    first, n = [], 0
    for v in vals:  # the first SCORE_SAMPLES samples, not a copy of them all
        first.append(v[: SCORE_SAMPLES - n])
        n += len(first[-1])
        if n >= SCORE_SAMPLES:
            break
    data = np.concatenate(first).astype(np.float64)
    if len(data) < 2:
        return whole
    one = _held_out(data, None)
    sq = _whole_db(one)
    best = replace(whole, calibration_sqnr_db=sq, per_tensor_sqnr_db=sq)
    if opset < PER_AXIS_OPSET:
        return best
    gain = PER_AXIS_GAIN_DB
    for axis in range(1, data.ndim):
        if data.shape[axis] < 2:
            continue
        per = _held_out(data, axis)
        g = _channel_db(per, axis) - _channel_db(one, axis)
        if g >= gain:
            best = replace(_fit(vals, axis), calibration_sqnr_db=_whole_db(per),
                           per_tensor_sqnr_db=sq, channel_gain_db=round(g, 2))
            gain = g
    return best


def opset_of(model) -> int:
    """The model's default-domain opset (0 when it names none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _qdq_constants(graph, t: TensorInfo, scales: Mapping[str, WireQuant]):
    """The scale and zero point initializers of ``t``'s Q/DQ pair, and the axis
    attribute (empty for one scale per tensor)."""
    from onnx import numpy_helper

    wq = scales.get(t.name) or WireQuant.unit()
    s_name, z_name = f"{t.name}{QUANT_SUFFIX}.scale", f"{t.name}{QUANT_SUFFIX}.zero_point"
    graph.initializer.append(numpy_helper.from_array(
        np.asarray(wq.scale, dtype=np.dtype(t.dtype)), s_name))
    graph.initializer.append(numpy_helper.from_array(
        np.asarray(wq.zero_point, dtype=np.uint8), z_name))
    return s_name, z_name, ({} if wq.axis is None else {"axis": wq.axis})


def _check_qdq_opset(model) -> None:
    op = opset_of(model)
    if op < 10:
        raise UsageError(f"--compress-transfer int8 needs ONNX opset 10 or later (the model "
                         f"has opset {op})", "re-export the model at a newer opset")


def _wire_value_info(vi, name: str):
    """``vi`` renamed to its quantized form: same shape (batch axis kept), uint8."""
    from onnx import TensorProto, ValueInfoProto

    out = ValueInfoProto()
    out.CopyFrom(vi)
    out.name = name
    out.type.tensor_type.elem_type = TensorProto.UINT8
    return out


def _quantize_outputs(model, tensors: Sequence[TensorInfo],
                      scales: Mapping[str, WireQuant]) -> None:
    from onnx import helper

    _check_qdq_opset(model)
    g = model.graph
    received = {vi.name: vi for vi in g.input}
    outs = list(g.output)
    del g.output[:]
    for vi in outs:
        t = next((t for t in tensors if t.name == vi.name), None)
        if t is None or not t.compressible:
            g.output.append(vi)
            continue
        q = t.name + QUANT_SUFFIX
        if q in received:  # came in as uint8 (a chain part it crosses whole): passed on as is
            g.output.append(received[q])
            continue
        s, z, axis = _qdq_constants(g, t, scales)
        g.node.append(helper.make_node("QuantizeLinear", [t.name, s, z], [q],
                                       name=f"quantize {t.name}", **axis))
        g.output.append(_wire_value_info(vi, q))


def _dequantize_inputs(model, tensors: Sequence[TensorInfo],
                       scales: Mapping[str, WireQuant]) -> None:
    from onnx import helper

    _check_qdq_opset(model)
    g = model.graph
    ins = list(g.input)
    del g.input[:]
    front = []
    for vi in ins:
        t = next((t for t in tensors if t.name == vi.name), None)
        if t is None or not t.compressible:
            g.input.append(vi)
            continue
        s, z, axis = _qdq_constants(g, t, scales)
        q = t.name + QUANT_SUFFIX
        g.input.append(_wire_value_info(vi, q))
        front.append(helper.make_node("DequantizeLinear", [q, s, z], [t.name],
                                      name=f"dequantize {t.name}", **axis))
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(front + nodes)
