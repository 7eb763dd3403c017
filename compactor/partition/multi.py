"""Plan a model across a chain of devices (``compactor partition --topology FILE``).

:func:`plan_chain_model` does the whole job: read the topology, find the cuts, time the
model's segments once per distinct ONNX Runtime setting, choose the cuts with the dynamic
programme of :mod:`compactor.partition.chain` (latency or pipelined throughput, under each
device's memory), re-time the chosen parts directly, verify that the parts in sequence
compute the model, and write one ONNX part per device, ``plan.json`` and ``chart.svg``.
A ``peers`` topology goes to :mod:`compactor.partition.spatial` instead.

With int8 on the wire (``compress_transfer="int8"``), every inner cut's float32 tensors
travel as uint8 (one scale and zero point per tensor, calibrated once from the data's first
batches, as for two devices): the part before a cut ends in ``QuantizeLinear``, the part
after it starts with ``DequantizeLinear``, and a device that only forwards passes the
uint8 message on untouched. A cut at 0 (the first devices forward the input) sends the raw
input. The effect on the outputs is measured on the other batches (``compression``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from compactor.errors import PassError, UsageError
from compactor.partition.chain import MIB, ChainCosts, ChainPlan, no_fit_error, plan_chain
from compactor.partition.graph import (
    QUANT_SUFFIX,
    PartitionGraph,
    WireQuant,
    _check_qdq_opset,
    _dequantize_inputs,
    _quantize_outputs,
    opset_of,
)
from compactor.partition.profile import (
    HostTimes,
    Side,
    TimingSettings,
    calibrated,
    plain_session,
    profile_segments,
    quantized_feeds,
    time_ms,
)
from compactor.partition.simulate import message_bytes
from compactor.partition.topology import Topology
from compactor.partition.units import fmt_bandwidth
from compactor.partition.wire import FLOAT_BETTER, output_effect, quantization_of
from compactor.partition.wire import MODE as WIRE_MODE
from compactor.progress import Progress

log = logging.getLogger(__name__)

CHAIN_SCHEMA = "compactor.partition.chain/1"
TOLERANCE = 1e-4
REFINE_ROUNDS = 8  # re-plan and re-time at most this often


@dataclass(frozen=True)
class ChainOptions:
    objective: str = "latency"  # or "throughput"
    batch_size: int | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    max_cut_tensors: int = 4
    refine: bool = True
    compress_transfer: str = "none"  # or "int8": the inner cuts' float32 tensors as uint8

    def __post_init__(self) -> None:
        if self.compress_transfer not in ("none", "int8"):
            raise UsageError(f"unknown compress_transfer {self.compress_transfer!r}",
                             "use none or int8")

    @property
    def compress(self) -> str | None:
        return None if self.compress_transfer == "none" else self.compress_transfer


@dataclass
class ChainResult:
    plan: dict[str, Any]
    choice: ChainPlan
    files: dict[str, Path]
    notes: list[str]


@dataclass
class _Measured:
    """What timing learns: per device its side and host times, and the cut figures."""

    graph: PartitionGraph
    sides: list[Side]
    times: list[HostTimes]
    positions: list[int]
    values: dict[str, np.ndarray]
    samples: list[dict[str, np.ndarray]]
    out_bytes: int
    direct: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (group, a, b)
    serial: dict[int, float] = field(default_factory=dict)  # cut -> encode + decode ms
    groups: list[int] = field(default_factory=list)  # device -> settings group
    compress: str | None = None
    scales: dict[str, WireQuant] = field(default_factory=dict)
    calib: list = field(default_factory=list)  # the batches the scales came from
    evals: list = field(default_factory=list)  # the others: the int8 effect is measured on

    def wire(self, p: int) -> str | None:
        """How the tensors at cut ``p`` travel: int8 at an inner cut, else as they are."""
        return self.compress if 0 < p < self.graph.n_nodes else None

    def part(self, a: int, b: int):
        """Nodes ``[a, b)`` as the part a device runs (with int8 on the wire, Q/DQ)."""
        return part_model(self.graph, a, b, self.compress, self.scales)

    def feeds(self, a: int) -> dict[str, np.ndarray]:
        """What a part starting at ``a`` receives: the tensors there, quantized at an inner
        cut with int8 on the wire."""
        if self.wire(a) is None:
            return self.values
        return {**self.values, **quantized_feeds(self.graph.cut(a), self.values, self.scales)}

    def host_ms(self, d: int, a: int, b: int) -> tuple[float, str]:
        """Device ``d``'s host time for nodes ``[a, b)``: measured, or its segments' sum,
        scaled by the measured part that overlaps it most (when that covers at least half
        of it): a part's time is not its segments' (a large part's weights no longer stay
        in cache; MobileNetV2's last 60 nodes ran 1.5x their segments' sum), and an
        unscaled sum beside measured neighbours would keep drawing the plan to it."""
        t, g = self.times[d], self.groups[d]
        if (g, a, b) in self.direct:
            return self.direct[(g, a, b)], "measured"
        if a == 0 and b == t.positions[-1]:
            return t.full_ms, "measured"
        est = _segsum(t, a, b)
        best = (0.0, 1.0)  # (overlap's time, measured / segment sum of that part)
        for (g2, a2, b2), ms in self.direct.items():
            lo, hi = max(a, a2), min(b, b2)
            if g2 != g or hi <= lo or _segsum(t, a2, b2) <= 0:
                continue
            best = max(best, (_segsum(t, lo, hi), ms / _segsum(t, a2, b2)))
        if est > 0 and best[0] >= est / 2:
            return est * best[1], "segment sum, scaled by a measured part"
        return est, "segment sum"


def _segsum(t: HostTimes, a: int, b: int) -> float:
    i, j = t.positions.index(a), t.positions.index(b)
    return t._est(t.segments_ms[i:j])


def plan_chain_model(model_path: Path, topology: Topology, options: ChainOptions, *,
                     data: Sequence[Mapping[str, np.ndarray]] | None = None,
                     targets: np.ndarray | None = None,
                     out_dir: Path | None = None, simulate: bool = False,
                     simulate_requests: int = 10, progress: Any = None,
                     timing_cache: dict | None = None) -> ChainResult:
    """Plan ``model_path`` across ``topology``'s chain of devices (see module doc).
    ``targets``: labels of ``data``, one per sample, if known (the int8 accuracy effect)."""
    if topology.kind != "chain":
        raise UsageError("a peers topology plans a spatial split",
                         "use kind: chain for a chain of devices")
    progress = progress or Progress()
    notes: list[str] = []
    m = _measure(Path(model_path), topology, options, data, notes, progress, timing_cache)
    names = [d.name for d in topology.devices]
    costs = _costs(m, topology)
    choice = plan_chain(costs, options.objective)
    if choice is None:
        raise no_fit_error(costs, names)
    if options.refine:
        choice = _refine(m, topology, options, progress, notes)
    plan = _plan_dict(m, topology, options, choice, notes, model_path)
    if options.refine:
        _stream_rate(m, choice, plan["choice"], progress)
    with progress.task("verify the parts in sequence against the model"):
        plan["verification"] = verify_parts(m.graph, chain_parts(m.graph, choice),
                                            m.samples[:4])
    if not plan["verification"]["passed"]:
        v = plan["verification"]
        raise PassError(f"the chained parts differ from the model by {v['max_abs_error']:.3g}"
                        f" (relative {v['max_rel_error']:.3g})",
                        "report this model: a chain of parts should compute the same outputs")
    parts = chain_parts(m.graph, choice, m.compress, m.scales)
    if m.compress:
        with progress.task("measure int8 on the wire against the float model"):
            plan["compression"] = compression_effect(m, choice, parts, topology, targets)
        if options.refine:
            _against_float(m, topology, options, choice, plan, progress)
    if simulate:
        from compactor.partition.simulate_chain import simulate_chain

        with progress.task(f"simulate the chain ({len(choice.stages)} processes)"):
            sim = simulate_chain(parts, choice, topology, m.sides, m.samples[0],
                                 requests=simulate_requests)
        sim["error_latency"] = (sim["latency_ms"]["p50"] - choice.latency_ms) / \
            choice.latency_ms
        rate = plan["choice"]["throughput_rps"] or choice.throughput_rps
        sim["error_throughput"] = (sim["throughput_rps"] - rate) / rate
        plan["simulate"] = sim
    files: dict[str, Path] = {}
    if out_dir is not None:
        files = _write(Path(out_dir), plan, parts, choice, topology)
    return ChainResult(plan, choice, files, notes)


def _against_float(m: _Measured, topology: Topology, options: ChainOptions,
                   choice: ChainPlan, plan: dict, progress) -> None:
    """The best plan with float32 on the wire, its parts timed as the int8 plan's were
    (the same segment timing, each chosen part re-timed as a real model): int8 on the wire
    pays where the links bound a plan; elsewhere its Q/DQ cost compute and save nothing.
    ``compression.float_plan`` gives it, and a note says so when it beats the int8 plan."""
    flt = replace(m, compress=None, direct={}, serial=_serial_ms(m.graph, m.positions,
                                                                   m.values))
    with progress.task("plan with float32 on the wire too, to compare"):
        alt = _refine(flt, topology, options, progress, [])
    names = [d.name for d in topology.devices]
    plan["compression"]["float_plan"] = {
        k: v for k, v in alt.to_dict(names).items()
        if k in ("description", "latency_ms", "bottleneck_ms", "throughput_rps")}
    if options.objective == "throughput":
        mine, theirs = choice.bottleneck_ms, alt.bottleneck_ms
        fig = (f"{1000.0 / theirs:.1f} requests/s in float, {1000.0 / mine:.1f} with int8"
               if mine > 0 and theirs > 0 else "")
    else:
        mine, theirs = choice.latency_ms, alt.latency_ms
        fig = f"{theirs:.2f} ms in float, {mine:.2f} ms with int8"
    if theirs < mine * (1 - FLOAT_BETTER) and fig:
        plan["notes"].append(
            f"int8 on the wire does not pay here: the best plan with float32 on the wire "
            f"({alt.describe(names)}) is predicted faster ({fig}; both with their parts "
            f"timed): the links do not bound this plan, and the parts' Q/DQ cost compute; "
            f"leave --compress-transfer out")


def _side(d) -> Side:
    if d.latency_ms is not None:
        return Side(d.name, d.profile, 1.0, "from a measured latency", d.latency_ms)
    if d.slowdown is not None:
        return Side(d.name, d.profile, d.slowdown, f"slowdown {d.slowdown:g} (topology)")
    how = "none given: this host's speed" if d.profile.target_class != "host" else "none"
    return Side(d.name, d.profile, 1.0, how)


def _measure(model_path: Path, topology: Topology, options: ChainOptions, data, notes,
             progress, timing_cache) -> _Measured:
    from compactor.partition.planner import _calibrate, _feeds, _samples, _split_calibration

    sides = [_side(d) for d in topology.devices]
    batch = options.batch_size or topology.devices[0].profile.batch_sizes[0]
    with progress.task("read the graph and find its cuts"):
        graph = PartitionGraph.load(model_path, batch, options.dims)
        inner, _ = graph.candidates(options.max_cut_tensors)
    if options.compress == "int8":
        _check_qdq_opset(graph.model)  # before any timing: QuantizeLinear needs opset 10
    notes.extend(graph.notes)
    positions = [0, *inner, graph.n_nodes]
    samples, note = _samples(graph, data)
    if note:
        notes.append(note)
    exposed = sorted({t for p in positions[:-1] for t in graph.crossing(p)}
                     - set(graph.input_names))
    sess = plain_session(graph.with_outputs(exposed))
    values = dict(samples[0])
    values.update(zip([o.name for o in sess.get_outputs()],
                      sess.run(None, _feeds(sess, samples[0])), strict=True))
    graph.observe({k: v for k, v in values.items() if k in exposed})
    out_bytes = message_bytes([(o, values[o].dtype.name, values[o].shape)
                               for o in graph.output_names])
    calib, evals = _split_calibration(samples)
    scales = {}
    if options.compress == "int8":
        scales = _calibrate(sess, [o.name for o in sess.get_outputs()], calib or samples,
                            [graph.cut(p) for p in inner], opset_of(graph.model))
    keys: list[tuple] = []
    times: list[HostTimes] = []
    groups: list[int] = []
    for s in sides:
        key = s.timing_key()
        if key not in keys:
            keys.append(key)
            ck = (str(Path(model_path).resolve()), batch, tuple(positions), key)
            if timing_cache is not None and ck in timing_cache:
                t = timing_cache[ck]
            else:
                with progress.task(f"time {len(positions) - 1} segments on "
                                   f"{s.profile.name}", total=len(positions)) as task:
                    t = profile_segments(graph, positions, s.profile, values,
                                         on_step=lambda: task.advance(),
                                         pause_s=s.pause_s)
                if timing_cache is not None:
                    timing_cache[ck] = t
            times.append(t)
        groups.append(keys.index(key))
    dev_times = [times[g] for g in groups]
    sides = [calibrated(s, t.full_ms) for s, t in zip(sides, dev_times, strict=True)]
    return _Measured(graph, sides, dev_times, positions, values, samples, out_bytes,
                     groups=groups, compress=options.compress, scales=scales, calib=calib,
                     evals=evals,
                     serial=_serial_ms(graph, positions, values, options.compress, scales))


def _serial_ms(graph: PartitionGraph, positions: Sequence[int], values,
               compress: str | None = None,
               scales: Mapping[str, WireQuant] | None = None) -> dict[int, float]:
    """This host's time to encode and decode the message sent at each cut (the reply at
    n), as it is sent (uint8 at an inner cut with int8 on the wire): work a device does for
    every message, beside its part."""
    import time

    from compactor.partition.simulate import decode, encode

    out = {}
    for p in positions[1:]:
        names = graph.crossing(p) if p < graph.n_nodes else graph.output_names
        msg = {t: values[t] for t in names}
        if compress == "int8" and p < graph.n_nodes:
            q = quantized_feeds(graph.cut(p), values, scales or {})
            msg = {(t + QUANT_SUFFIX if t + QUANT_SUFFIX in q else t):
                   q.get(t + QUANT_SUFFIX, v) for t, v in msg.items()}
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            decode(encode(msg))
            runs.append((time.perf_counter() - t0) * 1000.0)
        out[p] = float(np.median(runs))
    return out


def _costs(m: _Measured, topology: Topology, measured_only: bool = False) -> ChainCosts:
    """The chain's costs from what ``m`` holds; with ``measured_only``, a range this call
    did not time directly is ruled out (costs infinity)."""
    g = m.graph
    w = m.graph.node_weight_bytes()
    cum = np.concatenate([[0], np.cumsum(w)])
    send = {p: message_bytes(g.cut(p).wire_tensors(m.wire(p))) for p in m.positions[:-1]}
    # a device holds what it receives dequantized (float), so memory counts float bytes
    act = {p: sum(t.nbytes for t in g.cut(p).tensors) for p in m.positions[:-1]}
    act[g.n_nodes] = m.out_bytes
    limits = [None if d.memory_mb is None else d.memory_mb * MIB for d in topology.devices]
    return ChainCosts(
        m.positions,
        lambda d, a, b: _compute_ms(m, d, a, b, measured_only),
        send, m.out_bytes, lambda a, b: int(cum[b] - cum[a]), act, limits,
        [h.bps for h in topology.hops], [h.rtt_ms for h in topology.hops], m.serial)


def _compute_ms(m: _Measured, d: int, a: int, b: int, measured_only: bool) -> float:
    """Device ``d``'s time for nodes ``[a, b)``; with ``measured_only``, only a range this
    call timed directly counts (as ``_unmeasured`` sees it: the whole model's time from the
    segment timing is not one)."""
    if measured_only:
        ms = m.direct.get((m.groups[d], a, b))
        return math.inf if ms is None else ms * m.sides[d].slowdown
    return m.host_ms(d, a, b)[0] * m.sides[d].slowdown


def _refine(m: _Measured, topology: Topology, options: ChainOptions, progress,
            notes: list[str]) -> ChainPlan:
    """Time the chosen plan's parts directly, re-plan, until the plan's parts are all
    direct measurements of this call (a segment sum can flatter a range; the whole model's
    time from the segment timing, maybe shared through ``timing_cache``, was taken first
    in the process and perhaps minutes ago: it is re-timed too). With int8 on the wire the
    parts are timed as they run, Q/DQ included; the segment sums the other ranges are
    costed from stay float (segments are timed once, shared across plans; a Q/DQ pair is
    small beside a part, and the chosen ranges are re-timed for real)."""
    choice = None
    with progress.task("re-time the chosen parts as real models"):
        for _ in range(REFINE_ROUNDS):
            choice = plan_chain(_costs(m, topology), options.objective)
            if choice is None:
                raise no_fit_error(_costs(m, topology), [d.name for d in topology.devices])
            todo = _unmeasured(m, choice)
            if not todo:
                return choice
            for s in todo:
                t = TimingSettings.of(m.sides[s.device].profile, quick=False)
                m.direct[(m.groups[s.device], s.start, s.end)] = time_ms(
                    m.part(s.start, s.end), m.sides[s.device].profile, m.feeds(s.start), t,
                    m.sides[s.device].pause_s)
    # out of rounds: the best plan on everything measured (the last round's choice was
    # made before its parts were timed); if that one still leans on a range costed from
    # its segments, the plan is the best of the ranges timed directly (every earlier
    # round's choice is among them), so no stage reports an estimate
    choice = plan_chain(_costs(m, topology), options.objective)
    assert choice is not None
    if _unmeasured(m, choice):
        names = [topology.devices[d].name for d in choice.computing]
        guess = choice
        choice = plan_chain(_costs(m, topology, measured_only=True), options.objective)
        assert choice is not None and not _unmeasured(m, choice)
        what = (f"{guess.latency_ms:.3f} ms latency" if options.objective == "latency"
                else f"{guess.bottleneck_ms:.3f} ms bottleneck")
        notes.append(
            f"re-timing did not settle in {REFINE_ROUNDS} rounds: the plan is the best "
            f"whose parts were all timed directly ({len(m.direct)} ranges timed); a plan "
            f"on {', '.join(names)} costed from segment sums ({what}) was not timed and "
            "not chosen")
    return choice


def _unmeasured(m: _Measured, choice: ChainPlan) -> list:
    return [s for s in choice.stages if s.end > s.start
            and (m.groups[s.device], s.start, s.end) not in m.direct]


def _stream_rate(m: _Measured, choice: ChainPlan, ch: dict, progress) -> None:
    """The chosen plan's stream throughput from its parts timed back to back, as they run
    in a stream (a device that is this host was timed after a request's pause, as a part
    runs when requests come one at a time; in a stream it runs warmer; an emulated device's
    figure is already its steady time): ``compute_stream_ms`` per stage, and the bottleneck
    and throughput from them."""
    with progress.task("time the chosen parts back to back (a stream)"):
        worst = 0.0
        for s, st in zip(choice.stages, ch["stages"], strict=True):
            ms = 0.0
            if s.end > s.start:
                side = m.sides[s.device]
                ms = time_ms(m.part(s.start, s.end), side.profile, m.feeds(s.start),
                             TimingSettings.of(side.profile, quick=False),
                             pause_s=0.0) * side.slowdown
            st["compute_stream_ms"] = round(ms, 4)
            worst = max(worst, ms + s.serialize_ms, s.forward_ms, s.back_ms)
    ch["bottleneck_ms_one_at_a_time"] = ch["bottleneck_ms"]
    ch["bottleneck_ms"] = round(worst, 4)
    ch["throughput_rps"] = round(1000.0 / worst, 4) if worst > 0 else None
    ch["throughput_basis"] = "each part timed back to back, as in a stream"


def part_model(graph: PartitionGraph, a: int, b: int, compress: str | None = None,
               scales: Mapping[str, WireQuant] | None = None):
    """Nodes ``[a, b)`` as a model: from the tensors crossing ``a`` to those crossing ``b``
    (or the model's outputs); a tensor crossing both passes through. With ``int8``, the
    float32 tensors of an inner cut arrive as uint8 (``DequantizeLinear`` first) and leave
    as uint8 (``QuantizeLinear`` last); one that passes through stays uint8 untouched."""
    ins = graph.crossing(a)
    outs = graph.crossing(b) if b < graph.n_nodes else graph.output_names
    m = graph.part(a, b, ins, outs, f"part{a}-{b}")
    if compress == "int8":
        if a > 0:
            _dequantize_inputs(m, graph.cut(a).tensors, scales or {})
        if b < graph.n_nodes:
            _quantize_outputs(m, graph.cut(b).tensors, scales or {})
    return m


def chain_parts(graph: PartitionGraph, plan: ChainPlan, compress: str | None = None,
                scales: Mapping[str, WireQuant] | None = None) -> list[Any]:
    """One model per used device (None where the device only forwards)."""
    return [part_model(graph, s.start, s.end, compress, scales) if s.end > s.start else None
            for s in plan.stages]


def run_parts(sessions: Sequence[Any], feeds: Mapping[str, np.ndarray]) -> dict:
    vals = dict(feeds)
    for s in sessions:
        if s is None:
            continue
        outs = s.run(None, {i.name: vals[i.name] for i in s.get_inputs()})
        vals = dict(zip([o.name for o in s.get_outputs()], outs, strict=True))
    return vals


def verify_parts(graph: PartitionGraph, parts: Sequence[Any], samples) -> dict[str, Any]:
    full = plain_session(graph.model)
    sess = [plain_session(p) if p is not None else None for p in parts]
    worst_abs = worst_rel = 0.0
    for b in samples:
        ref = full.run(None, {i.name: b[i.name] for i in full.get_inputs()})
        got = run_parts(sess, b)
        for r, o in zip(ref, graph.output_names, strict=True):
            err = float(np.max(np.abs(r.astype(np.float64) - got[o]))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / scale if scale > 0 else err)
    return {"samples": sum(len(next(iter(b.values()))) for b in samples),
            "max_abs_error": worst_abs, "max_rel_error": worst_rel, "tolerance": TOLERANCE,
            "passed": worst_rel <= TOLERANCE}


def compression_effect(m: _Measured, choice: ChainPlan, parts: Sequence[Any],
                       topology: Topology, targets) -> dict[str, Any]:
    """What int8 on the wire does to the chosen plan: per link the bytes in float and as
    sent; per output, the int8 ``parts`` in sequence against the float model, on the
    batches not used for the scales (as for two devices: :mod:`compactor.partition.wire`)."""
    from compactor.partition.planner import _feeds

    g, names = m.graph, [d.name for d in topology.devices]
    links, cuts = [], {}
    for s, nxt in zip(choice.stages, choice.stages[1:], strict=False):
        cut, wire = g.cut(s.end), m.wire(s.end)
        links.append({"from": names[s.device], "to": names[nxt.device], "position": s.end,
                      "int8": wire is not None, "bytes_float": cut.wire_bytes(),
                      "bytes_sent": cut.wire_bytes(wire)})
        if wire is not None:
            cuts[s.end] = {"position": s.end, "after": cut.after,
                           "tensors": [t.name for t in cut.tensors],
                           "bytes_float": cut.wire_bytes(), "bytes_int8": cut.wire_bytes(wire),
                           "bytes_ratio": cut.wire_bytes() / max(cut.wire_bytes(wire), 1),
                           "quantization": quantization_of(cut.tensors, m.scales)}
    out: dict[str, Any] = {"mode": WIRE_MODE, "cuts": list(cuts.values()), "links": links,
                           "calibration_batches": len(m.calib)}
    if not cuts:
        out["note"] = ("the plan sends no inner cut, so nothing travels as int8 (a cut at 0 "
                       "sends the raw input)")
        return out
    out["bytes_float"] = sum(c["bytes_float"] for c in cuts.values())
    out["bytes_int8"] = sum(c["bytes_int8"] for c in cuts.values())
    out["bytes_ratio"] = out["bytes_float"] / max(out["bytes_int8"], 1)
    batches = m.evals or m.samples
    offset = len(m.calib) * g.batch_size if m.evals else 0
    full = plain_session(g.model)
    sess = [plain_session(p) if p is not None else None for p in parts]
    refs: dict[str, list] = {o: [] for o in g.output_names}
    gots: dict[str, list] = {o: [] for o in g.output_names}
    for b in batches:
        got = run_parts(sess, b)
        for o, r in zip(g.output_names, full.run(None, _feeds(full, b)), strict=True):
            refs[o].append(r)
            gots[o].append(got[o])
    per = {o: output_effect(np.concatenate(refs[o]), np.concatenate(gots[o]),
                            targets if i == 0 else None, offset)
           for i, o in enumerate(g.output_names)}
    out.update({"evaluated_samples": int(sum(len(r) for r in refs[g.output_names[0]])),
                "evaluated_on": "batches not used for the scales" if m.evals
                else "the calibration batches (too little data to hold some out)",
                **per[g.output_names[0]], "outputs": per})
    return out


def _plan_dict(m: _Measured, topology: Topology, options: ChainOptions, choice: ChainPlan,
               notes: list[str], model_path: Path) -> dict[str, Any]:
    names = [d.name for d in topology.devices]
    costs = _costs(m, topology)
    single = plan_chain(costs, options.objective, max_computing=1)
    two = plan_chain(costs, options.objective, max_computing=2)
    ch = choice.to_dict(names)
    for st in ch["stages"]:
        st["compute_source"] = m.host_ms(st["device"], *st["nodes"])[1]
        end = st["nodes"][1]
        st["tensors_forward"] = ([t.to_dict() for t in m.graph.cut(end).tensors]
                                 if end < m.graph.n_nodes else [])
        st["sent_as"] = "int8" if m.wire(end) else "as computed"
    return {
        "schema": CHAIN_SCHEMA,
        "model": {"file": str(model_path), "nodes": m.graph.n_nodes,
                  "batch_size": m.graph.batch_size, "outputs": m.graph.output_names,
                  "output_bytes": m.out_bytes},
        "objective": options.objective,
        "compress_transfer": options.compress_transfer,
        "topology": topology.to_dict(),
        "devices": [s.to_dict() for s in m.sides],
        "estimate": any(s.estimate for s in m.sides),
        "choice": ch,
        "best_single_device": single.to_dict(names) if single else None,
        "best_two_devices": two.to_dict(names) if two else None,
        "cost_model": "latency = sum of compute + serialize + per link used: forward bytes /"
                      " bandwidth + rtt + reply bytes / bandwidth; throughput = 1000 / "
                      "max(stage compute + serialize, link forward, link reply)"
                      + ("; int8 on the wire: an inner cut's float32 tensors are sent as "
                         "uint8 (1 byte an element), a cut at 0 sends the raw input"
                         if m.compress else ""),
        "timing": {"groups": [t.to_dict() for t in {id(t): t for t in m.times}.values()],
                   "direct_ms": {f"{g}:{a}-{b}": round(v, 4)
                                 for (g, a, b), v in m.direct.items()}},
        "notes": notes,
    }


def _write(out_dir: Path, plan: dict, parts, choice: ChainPlan, topology: Topology
           ) -> dict[str, Path]:
    import onnx

    from compactor.partition.chart import render_chain_svg

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part*-*.onnx"):
        old.unlink()  # a stale part from an earlier plan would mislead
    files: dict[str, Path] = {}
    for i, (s, p) in enumerate(zip(choice.stages, parts, strict=True)):
        if p is None:
            continue
        name = topology.devices[s.device].name
        path = out_dir / f"part{i}-{_safe(name)}.onnx"
        onnx.save(p, str(path))
        files[f"part{i}"] = path
    names = [d.name for d in topology.devices]
    title = f"{Path(plan['model']['file']).name} across {len(names)} devices"
    (out_dir / "chart.svg").write_text(render_chain_svg(choice, names, title,
                                                        _sim_sub(plan)), encoding="utf-8")
    files["chart"] = out_dir / "chart.svg"
    files["plan"] = out_dir / "plan.json"
    plan["files"] = {k: v.name for k, v in files.items()}
    files["plan"].write_text(json.dumps(plan, indent=2, default=str), encoding="utf-8")
    return files


def _sim_sub(plan: dict) -> str:
    ch = plan["choice"]
    est = " (estimate)" if plan["estimate"] else ""
    s = (f"predicted {ch['latency_ms']:.2f} ms per request, "
         f"{ch['throughput_rps']:.1f} req/s pipelined{est}")
    links = ", ".join(f"{fmt_bandwidth(x['uplink_bps'])}/{x['rtt_ms']:g} ms"
                      for x in plan["topology"]["links"])
    wire = ", int8 on the wire" if plan.get("compress_transfer") == "int8" else ""
    return f"{s}; links {links}{wire}"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]
