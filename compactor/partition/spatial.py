"""Split a CNN's convolutional prefix across K peer devices by rows of its feature map
(fused tile partitioning, as in DeepThings and MoDNN), run the rest on the first device.

The first device holds the input. The tileable prefix is the model's first nodes (in
topological order) while each is a windowed op (convolution, pool) or an element-wise one
(activation, batch norm; with opset >= 10 also a join: ``Add``, ``Mul``, ``Sum``, ... of
branches with the same shape) on 4-D tensors made inside the prefix: a DAG, where one
tensor may feed several nodes (the skip of a residual block) and branches join. A depth
``p`` (the first ``p`` nodes) may end the prefix where the one tensor crossing the cut is
the output of node ``p − 1`` (not inside a residual block, where the skip crosses too).

For K tiles, the prefix's output rows are split into K strips; each strip's rows of every
tensor follow from walking back from the output through the DAG: a windowed node with
kernel ``k``, stride ``s``, dilation ``d`` and top padding ``pt`` needs input rows
``[a·s − pt, (b−1)·s − pt + d·(k−1) + 1)`` for output rows ``[a, b)``; an element-wise
node needs the same rows of each input; a tensor read by several nodes is computed over
the hull of what they need, and a reader that needs fewer rows (the skip branch of a
residual block, beside the halo-hungry convolution branch) gets them through a ``Slice``
along the rows. Rows outside the feature map are the layer's own padding, so each tile's
model is the prefix with each windowed layer's top/bottom padding set to what falls
outside the map on its side (zero on an inner edge): the tiles compute exactly the rows of
the unsplit prefix, and their concatenation is the unsplit prefix's output (verified: max
abs error in plan.json). Before opset 10 (``Slice`` takes its rows as inputs from 10 on)
the prefix stays a chain and ends at the first tensor read twice.

Cost of one request (ms), matched by ``--simulate``: the first device sends the tiles of
peers 1..K−1 one after another over its link (``bytes / bandwidth`` each), and computes
its own tile meanwhile; peer ``t`` receives its tile ``rtt/2`` after its last byte left,
computes, and sends its strip back; the first device's link receives the strips one after
another; when all are in (``rtt/2`` after each), it runs the rest of the model.
Throughput of a stream: ``1000 / max(all tiles' bytes out, all strips' bytes back, first
device's tile + rest, each peer's tile)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from compactor.errors import PassError, UsageError
from compactor.partition.chain import MIB
from compactor.partition.cost import transfer_ms
from compactor.partition.graph import PartitionGraph, opset_of
from compactor.partition.profile import (
    Side,
    TimingSettings,
    calibrated,
    plain_session,
    time_ms,
)
from compactor.partition.simulate import message_bytes
from compactor.partition.topology import Topology
from compactor.progress import Progress

log = logging.getLogger(__name__)

SPATIAL_SCHEMA = "compactor.partition.spatial/1"
TOLERANCE = 1e-4
ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
               "Identity", "BatchNormalization", "Elu", "Selu", "PRelu", "Softplus"}
WINDOWED = {"Conv", "MaxPool", "AveragePool"}
# element-wise joins of branches (numpy broadcasting): each input needs the output's rows
JOINS = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean"}
SLICE_OPSET = 10  # Slice takes starts/ends as inputs from here on (a crop per tile)


@dataclass(frozen=True)
class SpatialOptions:
    objective: str = "latency"  # or "throughput"
    peers: int | None = None  # K fixed by the user; None: the planner chooses
    batch_size: int | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    max_depth: int | None = None  # deepest prefix considered (None: all tileable)


@dataclass(frozen=True)
class Window:
    """One prefix node along the rows: kernel, stride, dilation, its top/bottom padding
    (an element-wise node: the identity window); ``src``: the positions of the nodes that
    make its 4-D inputs (−1: the model's input), read at input ``slots``; ``cut``: whether
    the prefix may end after it (its output is then the one tensor that crosses)."""

    k: int = 1
    s: int = 1
    d: int = 1
    pt: int = 0
    pb: int = 0
    src: tuple[int, ...] = ()  # () : the node before it (a chain)
    slots: tuple[int, ...] = (0,)
    cut: bool = True

    def sources(self, position: int) -> tuple[int, ...]:
        return self.src or (position - 1,)


@dataclass(frozen=True)
class Crop:
    """Node ``node`` reads rows ``[lo, hi)`` at input ``slot`` of the tensor that node
    ``src`` makes (−1: the input), which this tile computes over more rows: a ``Slice``."""

    node: int
    slot: int
    src: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Tile:
    """Output rows ``[out0, out1)`` of the prefix, from input rows ``[in0, in1)``; ``pads``:
    per prefix node, its (top, bottom) padding in this tile; ``rows``: per prefix node, the
    rows of its output this tile computes (the hull of what its readers need); ``crops``:
    where a reader needs fewer rows than that."""

    out0: int
    out1: int
    in0: int
    in1: int
    pads: tuple[tuple[int, int], ...]
    rows: tuple[tuple[int, int], ...] = ()
    crops: tuple[Crop, ...] = ()

    def computed(self, position: int) -> tuple[int, int]:
        """Rows of the tensor made at ``position`` (−1: the input) that this tile holds."""
        return (self.in0, self.in1) if position < 0 else self.rows[position]

    def key(self) -> tuple:
        """The tile's geometry up to a shift of its rows: equal keys, equal models."""
        return (self.in1 - self.in0, self.out1 - self.out0, self.pads,
                tuple(b - a for a, b in self.rows),
                tuple((c.node, c.slot, c.lo - self.computed(c.src)[0], c.hi - c.lo)
                      for c in self.crops))


@dataclass
class SpatialResult:
    plan: dict[str, Any]
    files: dict[str, Path]
    notes: list[str]


# --------------------------------------------------------------------------- geometry


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else (a.i if a.type == a.INT else a.s.decode())
    return default


def windows(graph: PartitionGraph) -> list[Window]:
    """The tileable prefix: per node a Window, from the first node while each is a windowed
    or element-wise op on 4-D tensors made inside the prefix (see the module doc), up to
    the last node after which the prefix may end (``Window.cut``)."""
    if len(graph.input_names) != 1 or len(graph.input_shapes[graph.input_names[0]]) != 4:
        return []
    joins = opset_of(graph.model) >= SLICE_OPSET
    src = graph.model.graph.node
    made = {graph.input_names[0]: -1}  # tensor -> position of its maker in the prefix
    heights = {-1: graph.input_shapes[graph.input_names[0]][2]}
    out: list[Window] = []
    for pos in range(graph.n_nodes):
        node = src[graph._nodes[pos].index]
        w = _window(graph, node, pos, made, heights, joins)
        if w is None:
            break
        out.append(w)
        made[node.output[0]] = pos
        heights[pos] = _rows_out(heights[w.sources(pos)[0]], w)
    return _ending(out)


def _window(graph: PartitionGraph, node, pos: int, made: Mapping[str, int],
            heights: Mapping[int, int], joins: bool) -> Window | None:
    """``node``'s Window, or None where the prefix cannot take it."""
    ops = WINDOWED | ELEMENTWISE | (JOINS if joins else set())
    if node.op_type not in ops or not node.output or not node.output[0]:
        return None
    if node.output[0] not in graph._last_use or any(
            o in graph._last_use for o in node.output[1:] if o):
        return None  # an unread output, or a second output read (MaxPool's indices)
    slots = tuple(i for i, x in enumerate(node.input) if x in graph._produced_at)
    if not slots or any(node.input[i] not in made for i in slots):
        return None
    srcs = tuple(made[node.input[i]] for i in slots)
    crosses = graph.crossing(pos + 1) == [node.output[0]]
    if not joins and (srcs != (pos - 1,) or not crosses):
        return None  # a chain, cut anywhere: no crop is ever needed
    if node.op_type in JOINS:
        if len({heights[p] for p in srcs}) != 1 or not _same_shapes(
                graph, [node.input[i] for i in slots]):
            return None
    elif slots != (0,):
        return None
    if node.op_type not in WINDOWED:  # its constants must be alike on every row
        if not all(_row_free(graph, x) for i, x in enumerate(node.input)
                   if x and i not in slots):
            return None
        return Window(src=srcs, slots=slots, cut=crosses)
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or \
            _attr(node, "ceil_mode", 0):
        return None
    k = _attr(node, "kernel_shape", None)
    if k is None:  # Conv may leave it to the weight's shape
        w = next((t for t in graph.model.graph.initializer if t.name == node.input[1]), None)
        if w is None:
            return None
        k = list(w.dims[2:])
    if len(k) != 2:
        return None
    pads = _attr(node, "pads", [0, 0, 0, 0])
    return Window(k[0], _attr(node, "strides", [1, 1])[0], _attr(node, "dilations", [1, 1])[0],
                  pads[0], pads[2], srcs, slots, crosses)


def _shape(graph: PartitionGraph, name: str) -> tuple[int, ...] | None:
    init = next((t for t in graph.model.graph.initializer if t.name == name), None)
    if init is not None:
        return tuple(init.dims)
    return graph._inferred.get(name, (None, None))[0]


def _same_shapes(graph: PartitionGraph, names: Sequence[str]) -> bool:
    """Inputs of a join, all 4-D and of one shape where shape inference sized them (the
    rows were checked by the formula): no broadcasting along the rows or the width."""
    shapes = {_shape(graph, x) for x in names} - {None}
    return len(shapes) <= 1 and all(len(sh) == 4 for sh in shapes)


def _row_free(graph: PartitionGraph, name: str) -> bool:
    """A constant operand broadcast along the rows (one row, or fewer than 2 axes): each
    tile may use it whole."""
    shape = _shape(graph, name)
    if shape is None:
        return name not in graph._static_producer  # an operand shape inference left out
    return len(shape) <= 4 and (len(shape) < 2 or shape[-2] == 1)


def _rows_out(rows_in: int, w: Window) -> int:
    return (rows_in + w.pt + w.pb - w.d * (w.k - 1) - 1) // w.s + 1


def cut_depths(graph: PartitionGraph, wins: Sequence[Window]) -> list[int]:
    """The depths the prefix may end at, short of the whole model."""
    return [d for d in range(1, len(wins) + 1) if d < graph.n_nodes and wins[d - 1].cut]


def _ending(wins: Sequence[Window]) -> list[Window]:
    """``wins`` up to the last node the prefix may end after."""
    last = max((j for j, w in enumerate(wins) if w.cut), default=-1)
    return list(wins[: last + 1])


def prefix_heights(graph: PartitionGraph, wins: Sequence[Window]) -> list[int]:
    """Rows of each prefix node's output (index 0: the input; ``j + 1``: node ``j``)."""
    h = [graph.input_shapes[graph.input_names[0]][2]]
    for j, w in enumerate(wins):
        h.append(_rows_out(h[w.sources(j)[0] + 1], w))
    return h


def tiles(heights: Sequence[int], wins: Sequence[Window], depth: int, k: int) -> list[Tile]:
    """K strips of the depth-``depth`` prefix's output rows, each with the rows of every
    prefix tensor it computes, its input rows, per-node padding and crops. Raises a
    UsageError when there are fewer rows than tiles."""
    rows = heights[depth]
    if k > rows:
        raise UsageError(
            f"{k} tiles cannot split a feature map of {rows} rows (after {depth} layers)",
            f"use at most {rows} peers (--peers {rows})")
    if not wins[depth - 1].cut:
        raise ValueError(f"the prefix cannot end after node {depth - 1}: more than its "
                         "output crosses there")
    bounds = [round(i * rows / k) for i in range(k + 1)]
    return [_tile(heights, wins, depth, bounds[t], bounds[t + 1]) for t in range(k)]


def _tile(heights: Sequence[int], wins: Sequence[Window], depth: int, a: int, b: int
          ) -> Tile:
    """Walk back from output rows [a, b): each tensor's rows (the hull of its readers'),
    each windowed node's padding, and the reads that need a crop."""
    need: dict[int, tuple[int, int]] = {depth - 1: (a, b)}
    pads = [(0, 0)] * depth
    reads: list[tuple[int, int, int, int, int]] = []
    for j in range(depth - 1, -1, -1):
        w, (lo, hi) = wins[j], need[j]
        srcs = w.sources(j)
        h_in = heights[srcs[0] + 1]
        ilo, ihi = lo * w.s - w.pt, (hi - 1) * w.s - w.pt + w.d * (w.k - 1) + 1
        pads[j] = (max(0, -ilo), max(0, ihi - h_in))
        ilo, ihi = max(ilo, 0), min(ihi, h_in)
        for slot, p in zip(w.slots, srcs, strict=True):
            reads.append((j, slot, p, ilo, ihi))
            old = need.get(p, (ilo, ihi))
            need[p] = (min(old[0], ilo), max(old[1], ihi))
    crops = tuple(sorted((Crop(j, slot, p, lo, hi) for j, slot, p, lo, hi in reads
                          if (lo, hi) != need[p]), key=lambda c: (c.node, c.slot)))
    return Tile(a, b, *need[-1], tuple(pads), tuple(need[j] for j in range(depth)), crops)


def tile_model(graph: PartitionGraph, depth: int, tile: Tile):
    """The prefix as a model over ``tile``'s input rows, padded and cropped as the tile
    needs."""
    from onnx import helper, numpy_helper

    cut = graph.crossing(depth)[0]
    m = graph.part(0, depth, graph.input_names, [cut], "tile")
    by_out = {graph.model.graph.node[graph._nodes[j].index].output[0]: j
              for j in range(depth)}
    crops: dict[int, list[Crop]] = {}
    for c in tile.crops:
        crops.setdefault(c.node, []).append(c)
    nodes, sliced = [], {}
    for node in m.graph.node:
        j = by_out.get(node.output[0] if node.output else "")
        for c in crops.get(j, []) if j is not None else []:
            x, c0 = node.input[c.slot], tile.computed(c.src)[0]
            name = f"{x}.rows{c.lo}-{c.hi}"
            if name not in sliced:
                consts = [numpy_helper.from_array(np.asarray([v], dtype=np.int64),
                                                  f"{name}.{what}")
                          for what, v in (("starts", c.lo - c0), ("ends", c.hi - c0),
                                          ("axes", 2))]
                m.graph.initializer.extend(consts)
                nodes.append(helper.make_node("Slice", [x, *(t.name for t in consts)],
                                              [name], name=f"crop {name}"))
                sliced[name] = True
            node.input[c.slot] = name
        nodes.append(node)
        if j is None or node.op_type not in WINDOWED:
            continue
        top, bottom = tile.pads[j]
        old = _attr(node, "pads", [0, 0, 0, 0])
        for a in list(node.attribute):
            if a.name in ("pads", "auto_pad"):
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("pads", [top, old[1], bottom, old[3]]))
    copies = [type(n)() for n in nodes]
    for dst, n in zip(copies, nodes, strict=True):
        dst.CopyFrom(n)
    del m.graph.node[:]
    m.graph.node.extend(copies)
    # static row counts: ONNX Runtime plans a fixed shape better, and each tile has its own
    for vi, rows in ((m.graph.input[0], tile.in1 - tile.in0),
                     (m.graph.output[0], tile.out1 - tile.out0)):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].ClearField("dim_param")
            dims[2].dim_value = rows
    del m.graph.value_info[:]
    return m


# --------------------------------------------------------------------------- running


def run_tiled(graph: PartitionGraph, depth: int, tl: Sequence[Tile], tile_sessions,
              rest_session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The model computed as K tiles, gathered, then the rest."""
    name = graph.input_names[0]
    x = feeds[name]
    strips = [s.run(None, {name: np.ascontiguousarray(x[:, :, t.in0:t.in1])})[0]
              for s, t in zip(tile_sessions, tl, strict=True)]
    cut = graph.crossing(depth)[0]
    return rest_session.run(None, {cut: np.concatenate(strips, axis=2)})


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class SpatialCost:
    depth: int
    k: int
    tile_ms: tuple[float, ...]  # per tile (on its device)
    rest_ms: float
    bytes_out: tuple[int, ...]  # message to each peer (0 for the first device's own)
    bytes_back: tuple[int, ...]
    bps: float
    rtt_ms: float
    memory: tuple[int, ...]  # bytes per device
    timing: str = "quick"  # "full": re-timed with the profile's full settings (refined)

    @property
    def gather_ms(self) -> float:
        """When the last strip has arrived at the first device (from the request's start)."""
        sent = 0.0
        rx_free = 0.0
        last = self.tile_ms[0]
        for t in range(1, self.k):
            sent += transfer_ms(self.bytes_out[t], self.bps)
            ready = sent + self.rtt_ms / 2 + self.tile_ms[t] + transfer_ms(
                self.bytes_back[t], self.bps)
            rx_free = max(ready, rx_free + transfer_ms(self.bytes_back[t], self.bps))
            last = max(last, rx_free + self.rtt_ms / 2)
        return last

    @property
    def latency_ms(self) -> float:
        return self.gather_ms + self.rest_ms

    @property
    def bottleneck_ms(self) -> float:
        link_out = sum(transfer_ms(b, self.bps) for b in self.bytes_out)
        link_back = sum(transfer_ms(b, self.bps) for b in self.bytes_back)
        return max(link_out, link_back, self.tile_ms[0] + self.rest_ms, *self.tile_ms[1:])

    @property
    def throughput_rps(self) -> float:
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms > 0 else float("inf")

    def value(self, objective: str) -> tuple[float, float]:
        if objective == "throughput":
            return self.bottleneck_ms, self.latency_ms
        return self.latency_ms, self.bottleneck_ms

    def to_dict(self, names: Sequence[str]) -> dict:
        what = (f"{self.k} tiles of the first {self.depth} nodes" if self.k > 1
                else f"all on {names[0]}")
        return {"depth": self.depth, "peers": self.k, "devices": list(names[: self.k]),
                "description": what,
                "tile_ms": [round(x, 4) for x in self.tile_ms],
                "rest_ms": round(self.rest_ms, 4), "gather_ms": round(self.gather_ms, 4),
                "bytes_out": list(self.bytes_out), "bytes_back": list(self.bytes_back),
                "uplink_bps": self.bps, "rtt_ms": self.rtt_ms,
                "memory_mb": [round(b / MIB, 3) for b in self.memory],
                "latency_ms": round(self.latency_ms, 4),
                "bottleneck_ms": round(self.bottleneck_ms, 4),
                "throughput_rps": round(self.throughput_rps, 4), "timing": self.timing}


def choose(costs: Sequence[SpatialCost], limits: Sequence[float | None],
           objective: str) -> SpatialCost | None:
    """The best option whose every device fits its memory, or None."""
    ok = [c for c in costs if all(lim is None or m <= lim
                                  for m, lim in zip(c.memory, limits, strict=False))]
    return min(ok, key=lambda c: c.value(objective)) if ok else None


# --------------------------------------------------------------------------- planning


def plan_spatial_model(model_path: Path, topology: Topology, options: SpatialOptions, *,
                       data: Sequence[Mapping[str, np.ndarray]] | None = None,
                       out_dir: Path | None = None, simulate: bool = False,
                       simulate_requests: int = 10, progress: Any = None) -> SpatialResult:
    """Plan K and the prefix depth for ``topology``'s peers; write the tiles, the rest,
    plan.json and a chart; optionally simulate (see module doc)."""
    from compactor.partition.planner import _samples

    progress = progress or Progress()
    if topology.kind != "peers":
        raise UsageError("a spatial split needs a peers topology", "set kind: peers")
    notes: list[str] = []
    batch = options.batch_size or topology.devices[0].profile.batch_sizes[0]
    graph = PartitionGraph.load(Path(model_path), batch, options.dims)
    wins = windows(graph)
    if options.max_depth is not None:
        wins = _ending(wins[: options.max_depth])
    if not wins:
        raise UsageError(f"{Path(model_path).name} has no convolutional prefix to tile (its "
                         "first node is not a convolution, pool or activation on one 4-D "
                         "input)", "plan it as a chain (kind: chain) instead")
    if not cut_depths(graph, wins):  # the split gathers the strips into a rest
        raise UsageError(f"{Path(model_path).name} is all convolutional prefix: a spatial "
                         "split tiles a prefix and runs the rest of the model on the first "
                         "device, and no node is left after it",
                         "plan it as a chain (kind: chain), or add the model's head")
    heights = prefix_heights(graph, wins)
    kmax = len(topology.devices)
    if options.peers is not None:
        if options.peers > kmax:
            raise UsageError(f"--peers {options.peers}: the topology has {kmax} devices",
                             f"use at most --peers {kmax}, or add devices")
        # refuse K now when no prefix has that many rows (the shallowest has the most);
        # deeper prefixes with fewer rows than K are simply not considered
        tiles(heights, wins, min(cut_depths(graph, wins)), options.peers)
    samples, note = _samples(graph, data)
    if note:
        notes.append(note)
    sides = [_side(d) for d in topology.devices]
    # the inputs and every tensor a prefix may end at, from one run
    values = {**samples[0], **_prefix_values(graph, wins, samples[0])}
    costs, sides = _measure(graph, wins, heights, topology, sides, values, options,
                            progress)
    limits = [None if d.memory_mb is None else d.memory_mb * MIB for d in topology.devices]
    costs = _refine(graph, heights, wins, costs, sides, values, options, limits, progress)
    choice = choose([c for c in costs if options.peers in (None, c.k)
                     and c.timing == "full"], limits, options.objective)
    if choice is None:
        need = min(max(c.memory) for c in costs)
        raise UsageError(
            f"no split of {Path(model_path).name} across the peers fits their memory "
            f"limits: the least any option needs on one device is {need / MIB:.1f} MB",
            f"use devices with at least {need / MIB:.1f} MB (memory_mb in the topology)")
    names = [d.name for d in topology.devices]
    tl = tiles(heights, wins, choice.depth, choice.k)
    tms = [tile_model(graph, choice.depth, t) for t in tl]
    rest = graph.tail(graph.cut(choice.depth))
    plan = _plan_dict(graph, topology, options, sides, costs, choice, tl, notes, model_path)
    _stream_rate(graph, heights, wins, choice, sides, values, plan["choice"], progress)
    plan["verification"] = _verify(graph, choice.depth, tl, tms, rest, samples[:4])
    if not plan["verification"]["passed"]:
        raise PassError(f"the tiled prefix differs from the model by "
                        f"{plan['verification']['max_abs_error']:.3g}",
                        "report this model: the tiles should compute the same rows")
    if simulate:
        from compactor.partition.simulate_chain import simulate_spatial

        with progress.task(f"simulate {choice.k} peers"):
            sim = simulate_spatial(graph, choice, tl, tms, rest, topology, sides, samples[0],
                                   requests=simulate_requests)
        sim["error_latency"] = (sim["latency_ms"]["p50"] - choice.latency_ms) / \
            choice.latency_ms
        rate = plan["choice"]["throughput_rps"]
        sim["error_throughput"] = (sim["throughput_rps"] - rate) / rate
        plan["simulate"] = sim
    files: dict[str, Path] = {}
    if out_dir is not None:
        files = _write(Path(out_dir), plan, tms, rest, names, choice)
    return SpatialResult(plan, files, notes)


def _side(d) -> Side:
    if d.latency_ms is not None:
        return Side(d.name, d.profile, 1.0, "from a measured latency", d.latency_ms)
    if d.slowdown is not None:
        return Side(d.name, d.profile, d.slowdown, f"slowdown {d.slowdown:g} (topology)")
    return Side(d.name, d.profile, 1.0, "none")


def _measure(graph, wins, heights, topology: Topology, sides: list[Side], feeds, options,
             progress) -> tuple[list[SpatialCost], list[Side]]:
    """Time the full model, each depth's rest, and each (depth, K)'s largest tile."""
    name = graph.input_names[0]
    x = feeds[name]
    memo: dict[tuple, float] = {}

    def timed(key: tuple, model, side: Side, f) -> float:
        key = (*key, side.timing_key())
        if key not in memo:  # a tile's model is built only when it is timed
            model = model() if callable(model) else model
            memo[key] = time_ms(model, side.profile, f,
                                TimingSettings.of(side.profile, quick=True), side.pause_s)
        return memo[key]

    sides = [calibrated(s, timed(("full",), graph.model, s, feeds)) for s in sides]
    cut_vals = feeds  # the prefixes' outputs are among them
    w_bytes = np.concatenate([[0], np.cumsum(graph.node_weight_bytes())])
    # one device alone (K = 1) is always costed: the baseline a split is compared with
    ks = sorted({1, options.peers}) if options.peers else list(range(1, len(sides) + 1))
    costs: list[SpatialCost] = []
    depths = cut_depths(graph, wins)
    with progress.task(f"time tiles for {len(depths)} depths x {len(ks)} peer counts",
                       total=len(depths)) as task:
        for depth in depths:
            cut = graph.crossing(depth)[0]
            s0 = sides[0]
            rest = graph.tail(graph.cut(depth))
            rest_ms = timed(("rest", depth), rest, s0, {cut: cut_vals[cut]}) * s0.slowdown
            for k in ks:
                if k > heights[depth]:
                    continue
                tl = tiles(heights, wins, depth, k)
                costs.append(_option(graph, depth, k, tl, sides, x, name, cut_vals[cut],
                                     rest_ms, w_bytes, topology, timed))
            task.advance()
    return costs, sides


def _option(graph, depth, k, tl, sides, x, name, cut_val, rest_ms, w_bytes, topology,
            timed) -> SpatialCost:
    tile_ms, b_out, b_back, mem = [], [], [], []
    for t, tile in enumerate(tl):
        side = sides[t]
        xin = np.ascontiguousarray(x[:, :, tile.in0:tile.in1])
        strip = cut_val[:, :, tile.out0:tile.out1]
        key = ("tile", depth, k, tile.key())
        tm = timed(key, lambda tile=tile: tile_model(graph, depth, tile), side, {name: xin})
        tile_ms.append(tm * side.slowdown)
        b_out.append(0 if t == 0 else message_bytes([(name, x.dtype.name, xin.shape)]))
        b_back.append(0 if t == 0 else message_bytes([(graph.crossing(depth)[0],
                                                       strip.dtype.name, strip.shape)]))
        mem.append(int(w_bytes[depth]) + xin.nbytes + strip.nbytes)
    mem[0] += int(w_bytes[-1] - w_bytes[depth]) + cut_val.nbytes
    hop = topology.hops[0]
    return SpatialCost(depth, k, tuple(tile_ms), rest_ms, tuple(b_out), tuple(b_back),
                       hop.bps, hop.rtt_ms, tuple(mem))


def in_stream(cost: SpatialCost, tile_ms: Sequence[float], rest_ms: float) -> SpatialCost:
    """``cost`` with its devices' times as they run in a stream (back to back, not after a
    request's pause): its bottleneck and throughput are the stream's; the links are
    unchanged."""
    if len(tile_ms) != cost.k:
        raise ValueError(f"{len(tile_ms)} tile times for {cost.k} tiles")
    return replace(cost, tile_ms=tuple(tile_ms), rest_ms=rest_ms)


REFINE = 3  # the best options re-timed with the full settings before choosing


def _refine(graph, heights, wins, costs: list[SpatialCost], sides, feeds, options, limits,
            progress) -> list[SpatialCost]:
    """``costs`` with the best ``REFINE`` options that fit (and the best on one device)
    re-timed with each profile's full timing settings, in each device's regime (the quick
    figures every option gets can be ~10% off on a 224x224 CNN): the choice is made among
    these (``timing: full``); the rest keep their quick figures."""
    def rank(c: SpatialCost) -> tuple[float, float]:
        return c.value(options.objective)

    fits = [c for c in costs if choose([c], limits, options.objective) is not None]
    pick = sorted((c for c in fits if options.peers in (None, c.k)), key=rank)[:REFINE]
    single = [c for c in fits if c.k == 1]
    if single:  # the baseline a split is compared with
        pick.append(min(single, key=rank))
    done: dict[int, SpatialCost] = {}
    with progress.task(f"re-time the best {len({id(c) for c in pick})} options"):
        for c in pick:
            if id(c) not in done:
                tile_ms, rest_ms = _retime(graph, heights, wins, c, sides, feeds,
                                           lambda side: side.pause_s)
                done[id(c)] = replace(c, tile_ms=tuple(tile_ms), rest_ms=rest_ms,
                                      timing="full")
    return [done.get(id(c), c) for c in costs]


def _retime(graph, heights, wins, c: SpatialCost, sides, values, pause_of
            ) -> tuple[list[float], float]:
    """Option ``c``'s tiles and rest timed with the full settings (warm-up included), each
    run after ``pause_of(side)`` idle: per tile its device's ms, and the rest's.
    ``values``: the inputs and the prefixes' outputs."""
    name = graph.input_names[0]
    x = values[name]
    cut = graph.crossing(c.depth)[0]

    def ms(model, side: Side, f) -> float:
        return time_ms(model, side.profile, f, TimingSettings.of(side.profile, quick=False),
                       pause_s=pause_of(side)) * side.slowdown

    tile_ms = [ms(tile_model(graph, c.depth, t), sides[i],
                  {name: np.ascontiguousarray(x[:, :, t.in0:t.in1])})
               for i, t in enumerate(tiles(heights, wins, c.depth, c.k))]
    return tile_ms, ms(graph.tail(graph.cut(c.depth)), sides[0], {cut: values[cut]})


def _stream_rate(graph, heights, wins, choice: SpatialCost, sides, feeds, ch: dict,
                 progress) -> None:
    """The chosen plan's stream throughput from its tiles and rest re-timed as they run in
    a stream (as the chain planner does, ``compute_stream_ms``): back to back, with the full
    warm-up (an emulated device's figure is this host's steady time x its slowdown)."""
    with progress.task("time the chosen tiles and rest back to back (a stream)"):
        tile_ms, rest_ms = _retime(graph, heights, wins, choice, sides, feeds,
                                   lambda side: 0.0)
    s = in_stream(choice, tile_ms, rest_ms)
    ch["tile_stream_ms"] = [round(v, 4) for v in tile_ms]
    ch["rest_stream_ms"] = round(rest_ms, 4)
    ch["bottleneck_ms_one_at_a_time"] = ch["bottleneck_ms"]
    ch["bottleneck_ms"] = round(s.bottleneck_ms, 4)
    ch["throughput_rps"] = round(s.throughput_rps, 4)
    ch["throughput_basis"] = "tiles and rest timed back to back, as in a stream"


def _prefix_values(graph, wins, feeds) -> dict[str, np.ndarray]:
    names = [graph.crossing(d)[0] for d in cut_depths(graph, wins)]
    sess = plain_session(graph.with_outputs(names))
    outs = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    return dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))


def _verify(graph, depth, tl, tms, rest, samples) -> dict[str, Any]:
    full = plain_session(graph.model)
    ts = [plain_session(m) for m in tms]
    rs = plain_session(rest)
    worst_abs = worst_rel = 0.0
    for b in samples:
        ref = full.run(None, {i.name: b[i.name] for i in full.get_inputs()})
        got = run_tiled(graph, depth, tl, ts, rs, b)
        for r, g in zip(ref, got, strict=True):
            err = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale
                                                            if scale else err)
    return {"samples": sum(len(next(iter(b.values()))) for b in samples),
            "max_abs_error": worst_abs, "max_rel_error": worst_rel, "tolerance": TOLERANCE,
            "passed": worst_rel <= TOLERANCE}


def _plan_dict(graph, topology, options, sides, costs, choice, tl, notes,
               model_path) -> dict[str, Any]:
    names = [d.name for d in topology.devices]
    single = [c for c in costs if c.k == 1 and c.timing == "full"] or [
        c for c in costs if c.k == 1]
    best1 = min(single, key=lambda c: c.value(options.objective)) if single else None
    ch = choice.to_dict(names)
    ch["tiles"] = [{"device": names[i], "output_rows": [t.out0, t.out1],
                    "input_rows": [t.in0, t.in1], "halo_pads": [list(p) for p in t.pads],
                    **_tile_rows(graph, t)}
                   for i, t in enumerate(tl)]
    ch["description"] = (f"{choice.k} tiles of the first {choice.depth} nodes on "
                         f"{', '.join(names[: choice.k])}; the rest on {names[0]}"
                         if choice.k > 1 else f"all on {names[0]} (no split pays)")
    return {
        "schema": SPATIAL_SCHEMA,
        "model": {"file": str(model_path), "nodes": graph.n_nodes,
                  "batch_size": graph.batch_size, "tileable_depth": len(windows(graph))},
        "objective": options.objective,
        "topology": topology.to_dict(),
        "devices": [s.to_dict() for s in sides],
        "estimate": any(s.estimate for s in sides),
        "choice": ch,
        "best_single_device": best1.to_dict(names) if best1 else None,
        "alternatives": [c.to_dict(names) for c in
                         sorted(costs, key=lambda c: c.value(options.objective))],
        "cost_model": "see docs/partition.md, 'Peer devices'",
        "notes": notes,
    }


def _tile_rows(graph, tile: Tile) -> dict[str, Any]:
    """A tile's rows of each prefix tensor (by node) and the crops (Slices) it reads."""
    src = graph.model.graph.node
    label = [graph._nodes[j].label for j in range(len(tile.rows))]
    return {"node_rows": {label[j]: list(r) for j, r in enumerate(tile.rows)},
            "crops": [{"node": label[c.node], "tensor": src[graph._nodes[c.node].index]
                       .input[c.slot], "rows": [c.lo, c.hi],
                       "of_rows": list(tile.computed(c.src))} for c in tile.crops]}


def _write(out_dir: Path, plan, tms, rest, names, choice) -> dict[str, Path]:
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("tile*-*.onnx"), out_dir / "rest.onnx"]:
        if old.exists():
            old.unlink()
    files: dict[str, Path] = {}
    for i, m in enumerate(tms):
        p = out_dir / f"tile{i}-{names[i]}.onnx"
        onnx.save(m, str(p))
        files[f"tile{i}"] = p
    onnx.save(rest, str(out_dir / "rest.onnx"))
    files["rest"] = out_dir / "rest.onnx"
    (out_dir / "chart.svg").write_text(_chart(plan, choice, names), encoding="utf-8")
    files["chart"] = out_dir / "chart.svg"
    files["plan"] = out_dir / "plan.json"
    plan["files"] = {k: v.name for k, v in files.items()}
    files["plan"].write_text(json.dumps(plan, indent=2, default=str), encoding="utf-8")
    return files


def _chart(plan, choice: SpatialCost, names) -> str:
    """Predicted latency of every (depth, K) option: one bar each, the choice marked."""
    from html import escape

    alts = plan["alternatives"][:24]
    top = max(a["latency_ms"] for a in alts) or 1.0
    w, rh, left = 760, 18, 220
    h = 60 + rh * len(alts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{w}" height="{h}" '
           'fill="white"/>', f'<text x="10" y="20" font-size="14" font-weight="bold">'
           f'{escape(Path(plan["model"]["file"]).name)}: peers x prefix depth '
           '(predicted latency)</text>']
    for i, a in enumerate(alts):
        y = 36 + i * rh
        mark = a["depth"] == choice.depth and a["peers"] == choice.k
        out.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">'
                   f'{"★ " if mark else ""}K={a["peers"]}, depth {a["depth"]}</text>')
        bw = (w - left - 90) * a["latency_ms"] / top
        out.append(f'<rect x="{left}" y="{y + 2}" width="{bw:.1f}" height="{rh - 4}" '
                   f'fill="{"#2f855a" if mark else "#2b6cb0"}"/>')
        out.append(f'<text x="{left + bw + 4:.1f}" y="{y + 12}">{a["latency_ms"]:.2f} ms'
                   '</text>')
    out.append("</svg>")
    return "\n".join(out)
