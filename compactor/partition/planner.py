"""Plan a deployment between a device and a server: all on device, full offload, or a
split model, chosen by measurement.

:func:`plan_partition` does the whole job: find the cuts, size the tensors they send,
time the parts on both profiles, cost every option over the link, verify the chosen
head/tail pair on real inputs, optionally simulate it over a shaped loopback link, and
write ``head.onnx``, ``tail.onnx``, ``plan.json`` and ``chart.svg``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactor.errors import DataError, PassError, UsageError
from compactor.partition.config import PartitionSpec
from compactor.partition.cost import Cost, Link, Power, best, crossovers, make_cost
from compactor.partition.graph import Cut, PartitionGraph, WireQuant, opset_of, quant_params
from compactor.partition.profile import (
    HostTimes,
    Side,
    calibrated,
    plain_session,
    profile_segments,
    time_direct,
)
from compactor.partition.simulate import message_bytes
from compactor.partition.units import fmt_bandwidth, parse_bandwidth, parse_duration_ms
from compactor.partition.wire import FLOAT_BETTER, output_effect, quantization_of
from compactor.partition.wire import MODE as WIRE_MODE
from compactor.progress import Progress

log = logging.getLogger(__name__)

PLAN_SCHEMA = "compactor.partition/1"
TOLERANCE = 1e-4  # largest |tail(head(x)) - model(x)| relative to the output's magnitude
VERIFY_SAMPLES = 256  # tail(head(x)) is checked on up to this many samples
CHART_RANGE = (1e5, 1e9)  # 100 kbps .. 1 Gbps


@dataclass
class PartitionResult:
    plan: dict[str, Any]
    choice: Cost
    best_split: Cost | None
    costs: list[Cost]
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def no_valid_cut(self) -> bool:
        return self.best_split is None


def plan_partition(
    model_path: Path,
    spec: PartitionSpec,
    *,
    base_dir: Path | None = None,
    data: Sequence[Mapping[str, np.ndarray]] | None = None,
    targets: np.ndarray | None = None,
    out_dir: Path | None = None,
    simulate: bool = False,
    simulate_requests: int = 10,
    progress: Any = None,
    timing_cache: dict | None = None,
) -> PartitionResult:
    """Plan ``model_path`` per ``spec``. ``data``: batches of real inputs (dicts by input
    name) for verification, int8 calibration and the accuracy effect; ``targets``: their
    labels, one per sample, if known. Without data, random inputs are used (and said).

    ``timing_cache``: pass the same dict to several calls on the same model (say, one per
    bandwidth) to time its parts once; the timings depend on the model, batch size and
    ONNX Runtime settings, not on the link."""
    progress = progress or Progress()
    p = _prepare(Path(model_path), spec, base_dir, data, progress)
    _time_parts(p, timing_cache, progress)
    costs = _refine(p, p.options(), progress)
    choice = best(costs, spec.objective)
    split_costs = [c for c in costs if c.kind == "split"]
    best_split = best(split_costs, spec.objective) if split_costs else None
    lo, hi = _chart_range(p.link)
    cross = crossovers(costs, lo, hi, spec.objective, p.power) if p.needs_network else []
    plan = _plan_dict(p, choice, best_split, costs, cross)

    head = tail = None
    if best_split is not None:
        head, tail = _verified_parts(p, plan, _cut_of(p.cuts, best_split), targets, progress)
        if p.compress and "compression" in plan:
            _against_float(p, choice, plan, progress)
        if choice.kind != "split":
            p.notes.append(f"the plan is {choice.option}; head.onnx/tail.onnx hold the best "
                           f"split ({best_split.option}), for when the link changes "
                           "(see the crossovers)")
    if simulate:
        plan["simulate"] = _simulate(p.graph, p.cuts, choice, best_split, head, tail, p.device,
                                     p.server, p.link, p.samples[0], simulate_requests,
                                     progress, p.compress, p.scales)
    files: dict[str, Path] = {}
    if out_dir is not None:
        files = _write(Path(out_dir), plan, head, tail, costs, cross, p.link, p.graph, spec,
                       p.device, p.server)
        plan["files"] = {k: str(v.name) for k, v in files.items()}
        (Path(out_dir) / "plan.json").write_text(json.dumps(plan, indent=2, default=str),
                                                 encoding="utf-8")
    return PartitionResult(plan, choice, best_split, costs, files, p.notes)


@dataclass
class _Planning:
    """What one plan learns on its way, threaded through its steps."""

    model_path: Path
    spec: PartitionSpec
    graph: PartitionGraph
    device: Side
    server: Side
    batch: int
    positions: list[int]
    rejected: list
    link: Link
    power: Power | None
    samples: list[dict[str, np.ndarray]]
    calib: list
    evals: list
    notes: list[str]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    cuts: dict[int, Cut] = field(default_factory=dict)
    scales: dict[str, WireQuant] = field(default_factory=dict)
    out_bytes: int = 0  # the reply: the model's outputs
    dev_t: HostTimes | None = None
    srv_t: HostTimes | None = None

    @property
    def compress(self) -> str | None:
        return self.spec.compress

    @property
    def needs_network(self) -> bool:
        return bool(self.positions) or not self.spec.keep_input_on_device

    @property
    def all_positions(self) -> list[int]:
        return [0, *self.positions, self.graph.n_nodes]

    def cost_of(self, cut: Cut, float_wire: bool = False) -> Cost:
        """``cut``'s cost as planned (int8 on the wire with ``--compress-transfer int8``),
        or, with ``float_wire``, with float32 on the wire."""
        assert self.dev_t is not None and self.srv_t is not None  # set by _time_parts
        c = self.compress if cut.kind == "split" and not float_wire else None
        d_ms, d_src = self.dev_t.head(cut.position, c)
        s_ms, s_src = self.srv_t.tail(cut.position, c)
        return make_cost(cut.id, cut.kind, cut.describe(), d_ms * self.device.slowdown,
                         s_ms * self.server.slowdown, message_bytes(cut.wire_tensors(c)),
                         self.out_bytes, self.link, self.power, d_src, s_src)

    def options(self, float_wire: bool = False) -> list[Cost]:
        opts = [self.cost_of(self.cuts[self.graph.n_nodes], float_wire)]
        if not self.spec.keep_input_on_device:
            opts.append(self.cost_of(self.cuts[0], float_wire))
        return opts + [self.cost_of(self.cuts[p], float_wire) for p in self.positions]


def _prepare(model_path: Path, spec: PartitionSpec, base_dir: Path | None, data,
             progress) -> _Planning:
    """Everything before timing: profiles, cuts, link, samples and the cut tensors' values."""
    from compactor.profiles import load_profile

    notes: list[str] = []
    device_p = load_profile(spec.device, base_dir)
    server_p = load_profile(spec.server, base_dir)
    device = _side("device", device_p, spec.device_slowdown, spec.device_latency_ms)
    server = _side("server", server_p, spec.server_slowdown, spec.server_latency_ms)
    batch = spec.batch_size or device_p.batch_sizes[0]
    for side in (device, server):
        _, thread_note = side.profile.threads_on_host()
        if thread_note:
            notes.append(f"{side.role} {side.profile.name}: {thread_note}")

    with progress.task("read the graph and find its cuts"):
        graph = PartitionGraph.load(model_path, batch, spec.dims)
        positions, rejected = graph.candidates(spec.max_cut_tensors, spec.keep_input_on_device)
    notes.extend(graph.notes)
    if not positions:
        why = _why_no_cut(rejected, graph.n_nodes)
        notes.append(f"no valid cut inside the model other than the extremes ({why}); "
                     + ("only all-on-device remains (--keep-input-on-device)"
                        if spec.keep_input_on_device else
                        "comparing all on device with full offload"))
    needs_network = bool(positions) or not spec.keep_input_on_device
    link = _link(spec, device_p) if needs_network else Link(1e9, 0.0, "not needed")
    power = _power(spec, device_p)

    samples, sample_note = _samples(graph, data)
    if sample_note:
        notes.append(sample_note)
    calib, evals = _split_calibration(samples)
    p = _Planning(model_path, spec, graph, device, server, batch, positions, rejected, link,
                  power, samples, calib, evals, notes)
    _observe(p, progress)
    return p


def _observe(p: _Planning, progress) -> None:
    """Run the model once to learn every cut tensor's shape and value (and, for int8 on
    the wire, the scales)."""
    graph, all_pos = p.graph, p.all_positions
    exposed = sorted({t for pos in all_pos[:-1] for t in graph.crossing(pos)}
                     - set(graph.input_names))
    with progress.task("run the model once to see the cut tensors"):
        ref_sess = plain_session(graph.with_outputs(exposed))
        out_names = [o.name for o in ref_sess.get_outputs()]
        values = dict(p.samples[0])
        values.update(zip(out_names, ref_sess.run(None, _feeds(ref_sess, p.samples[0])),
                          strict=True))
        graph.observe({k: v for k, v in values.items() if k in exposed})
    p.values = values
    p.out_bytes = message_bytes([(o, values[o].dtype.name, values[o].shape)
                                 for o in graph.output_names])
    p.cuts = {pos: graph.cut(pos) for pos in all_pos}
    if p.compress == "int8":
        p.scales = _calibrate(ref_sess, out_names, p.calib or p.samples, p.cuts.values(),
                              opset_of(graph.model))


def _time_parts(p: _Planning, timing_cache: dict | None, progress) -> None:
    """Time the segments once per distinct set of ONNX Runtime settings, then calibrate
    each side's slowdown to the full model's time."""
    groups: dict[tuple, HostTimes] = {}
    keys = {}
    all_pos = p.all_positions
    for side in (p.device, p.server):
        key = side.timing_key()
        keys[side.role] = key
        if key in groups:
            p.notes.append(f"device and server run with the same ONNX Runtime settings here; "
                           f"their parts were timed once ({side.profile.name})")
            continue
        cache_key = (str(p.model_path.resolve()), p.batch, tuple(all_pos), key)
        if timing_cache is not None and cache_key in timing_cache:
            groups[key] = timing_cache[cache_key]
            continue
        with progress.task(f"time {len(all_pos) - 1} segments on {side.profile.name}",
                           total=len(all_pos)) as task:
            groups[key] = profile_segments(p.graph, all_pos, side.profile, p.values,
                                           on_step=lambda: task.advance(),
                                           pause_s=side.pause_s)
        if timing_cache is not None:
            timing_cache[cache_key] = groups[key]
    p.dev_t, p.srv_t = groups[keys["device"]], groups[keys["server"]]
    p.device = calibrated(p.device, p.dev_t.full_ms)
    p.server = calibrated(p.server, p.srv_t.full_ms)


def _refine(p: _Planning, costs: list[Cost], progress, float_wire: bool = False
            ) -> list[Cost]:
    """Re-time the best splits as real head and tail models until the leaders are all
    direct measurements (a segment sum can flatter a split); with ``float_wire``, the
    splits with float32 on the wire."""
    spec = p.spec
    if not (p.positions and spec.refine):
        return costs
    wire = None if float_wire else p.compress
    with progress.task("re-time the best splits as real head and tail models"
                       + (" (float32 on the wire, to compare)" if float_wire else "")):
        for _ in range(4):
            splits = sorted((c for c in costs if c.kind == "split"),
                            key=lambda c: (c.value(spec.objective), c.total_ms))
            todo = [c for c in splits[: spec.refine]
                    if "segment sum" in (c.device_source, c.server_source)]
            if not todo:
                break
            for c in todo:
                cut = _cut_of(p.cuts, c)
                time_direct(p.graph, cut, p.dev_t, p.device, p.values, wire, p.scales)
                time_direct(p.graph, cut, p.srv_t, p.server, p.values, wire, p.scales)
            costs = p.options(float_wire)
    return costs


def _against_float(p: _Planning, choice: Cost, plan: dict[str, Any], progress) -> None:
    """The best option with float32 on the wire, its splits re-timed as the int8 ones
    were: int8 on the wire pays where the link bounds the plan; elsewhere its Q/DQ cost
    compute and save nothing. ``compression.float_plan`` gives it, and a note says so when
    it beats the int8 plan by more than ``FLOAT_BETTER``."""
    objective = p.spec.objective
    alt = best(_refine(p, p.options(float_wire=True), progress, float_wire=True), objective)
    mine, theirs = choice.value(objective), alt.value(objective)
    plan["compression"]["float_plan"] = {"option": alt.option, "description": alt.description,
                                         "total_ms": alt.total_ms, "objective_value": theirs}
    if theirs < mine * (1 - FLOAT_BETTER):
        unit = "J" if objective == "device-energy" else "ms"
        p.notes.append(
            f"int8 on the wire does not pay here: with float32 on the wire the best option, "
            f"{alt.option}, is predicted better ({theirs:.4g} {unit} against {mine:.4g} "
            f"{unit} for {choice.option} with int8; both timed alike): the link does not "
            "bound this plan, and the parts' Q/DQ cost compute; leave --compress-transfer out")


def _plan_dict(p: _Planning, choice: Cost, best_split: Cost | None, costs: list[Cost],
               cross: list[dict]) -> dict[str, Any]:
    spec, graph, link, power = p.spec, p.graph, p.link, p.power
    return {
        "schema": PLAN_SCHEMA,
        "model": {"file": str(p.model_path), "nodes": graph.n_nodes, "batch_size": p.batch,
                  "inputs": {k: list(v) for k, v in graph.input_shapes.items()},
                  "outputs": graph.output_names, "output_bytes": p.out_bytes},
        "objective": spec.objective,
        "keep_input_on_device": spec.keep_input_on_device,
        "compress_transfer": spec.compress_transfer,
        "link": {"uplink_bps": link.uplink_bps, "uplink": fmt_bandwidth(link.uplink_bps),
                 "rtt_ms": link.rtt_ms, "source": link.source,
                 "downlink": "taken as fast as the uplink"},
        "power": None if power is None else {"device_w": power.device_w,
                                             "radio_w": power.radio_w,
                                             "radio_source": power.radio_source},
        "device": p.device.to_dict(),
        "server": p.server.to_dict(),
        "estimate": p.device.estimate or p.server.estimate,
        "choice": _option_dict(choice, p.cuts, graph),
        "best_split": _option_dict(best_split, p.cuts, graph) if best_split else None,
        "alternatives": [_option_dict(c, p.cuts, graph) for c in
                         sorted(costs, key=lambda c: (c.value(spec.objective), c.total_ms))],
        "rejected_cuts": [{"position": r.position, "reason": r.reason} for r in p.rejected],
        "crossovers": [{**c, "uplink": fmt_bandwidth(c["uplink_bps"])} for c in cross],
        "crossovers_by": spec.objective,
        "timing": {"device": p.dev_t.to_dict(), "server": p.srv_t.to_dict(),
                   "method": "segments in topological order, summed less the run overhead "
                             "and scaled to the full model; the best splits re-timed "
                             "directly as head and tail models",
                   "spinning": "intra-op spinning off"},
        "notes": p.notes,
    }


def _verified_parts(p: _Planning, plan: dict[str, Any], cut: Cut, targets,
                    progress) -> tuple[Any, Any]:
    """The head and tail models at ``cut``, after checking tail(head(x)) == model(x); with
    int8 on the wire, also the accuracy effect (both recorded in ``plan``)."""
    with progress.task("verify tail(head(x)) against the model"):
        v = plan["verification"] = _verify(p.graph, cut, _first(p.samples, VERIFY_SAMPLES))
        if not v["passed"]:
            raise PassError(
                f"tail(head(x)) differs from the model by {v['max_abs_error']:.3g} "
                f"(relative {v['max_rel_error']:.3g} > {TOLERANCE:g}) at {cut.id}",
                "report this model: a split should compute the same outputs",
            )
        head = p.graph.head(cut, p.compress, p.scales)
        tail = p.graph.tail(cut, p.compress, p.scales)
        if p.compress == "int8":
            plan["compression"] = _accuracy_effect(
                p.graph, head, tail, p.evals or p.samples, targets, cut,
                calibrated_on=len(p.calib),
                target_offset=len(p.calib) * p.batch if p.evals else 0, scales=p.scales)
    return head, tail


def _cut_of(cuts: Mapping[int, Cut], c: Cost) -> Cut:
    return cuts[int(c.option.split("@")[1])]


def _chart_range(link: Link) -> tuple[float, float]:
    return (min(CHART_RANGE[0], link.uplink_bps / 10), max(CHART_RANGE[1], link.uplink_bps * 10))


# --------------------------------------------------------------------------- settings


def _side(role: str, profile, slowdown: float | None, latency_ms: float | None) -> Side:
    if slowdown is not None and latency_ms is not None:
        raise UsageError(f"give the {role}'s slowdown or its measured latency, not both",
                         f"--{role}-latency-ms sets the slowdown from a real-{role} bench")
    if latency_ms is not None:
        return Side(role, profile, 1.0, "from a measured latency", latency_ms)
    if slowdown is not None:
        return Side(role, profile, slowdown, f"--{role}-slowdown {slowdown:g}")
    how = "none given: this host's speed" if profile.target_class != "host" else "none"
    return Side(role, profile, 1.0, how)


def _link(spec: PartitionSpec, device_p) -> Link:
    net = device_p.network
    if spec.uplink is not None:
        bps, up_src = parse_bandwidth(spec.uplink, "uplink"), "given"
    elif net.uplink_mbps is not None:
        bps, up_src = net.uplink_mbps * 1e6, f"profile {device_p.name}"
    else:
        raise UsageError(
            f"the device profile {device_p.name!r} has no network figures "
            "(network.uplink_mbps), and the plan needs the uplink bandwidth",
            "give --uplink (e.g. --uplink 10Mbps --rtt 40ms), or add network: "
            "{uplink_mbps: 10, rtt_ms: 40} to the profile",
        )
    if spec.rtt is not None:
        rtt, rtt_src = parse_duration_ms(spec.rtt, "rtt"), "given"
    elif net.rtt_ms is not None:
        rtt, rtt_src = float(net.rtt_ms), f"profile {device_p.name}"
    else:
        raise UsageError(
            f"the device profile {device_p.name!r} has no round-trip time (network.rtt_ms), "
            "and the plan needs it",
            "give --rtt (e.g. --rtt 40ms), or add network.rtt_ms to the profile",
        )
    return Link(bps, rtt, f"uplink: {up_src}; rtt: {rtt_src}")


def _power(spec: PartitionSpec, device_p) -> Power | None:
    w = device_p.estimates.power_w
    if w is None:
        if spec.objective == "device-energy":
            raise UsageError(
                f"the device-energy objective needs the device's power, and profile "
                f"{device_p.name!r} has no estimates.power_w",
                "add estimates: {power_w: 6} to the profile, or use --objective latency",
            )
        return None
    if spec.radio_power_w is not None:
        return Power(w, spec.radio_power_w, "given")
    return Power(w, w, "assumed equal to the device's power_w (give --radio-power)")


# --------------------------------------------------------------------------- data


def _samples(graph: PartitionGraph, data) -> tuple[list[dict[str, np.ndarray]], str | None]:
    """Batches at the plan's batch size, from ``data`` or random."""
    b = graph.batch_size
    if data:
        arrays: dict[str, np.ndarray] = {}
        for name in graph.input_names:
            parts = []
            for batch in data:
                if name not in batch:
                    raise DataError(
                        f"the data has no array for model input {name!r} (it has "
                        f"{', '.join(sorted(batch)) or 'none'})",
                        "key the .npz arrays by the model's input names",
                    )
                parts.append(np.asarray(batch[name]))
            arrays[name] = np.concatenate(parts)
        total = min(len(a) for a in arrays.values())
        for name, a in arrays.items():
            want = graph.input_shapes[name]
            if tuple(a.shape[1:]) != tuple(want[1:]):
                raise DataError(
                    f"data for input {name!r} has samples of shape {list(a.shape[1:])}; the "
                    f"model takes {list(want[1:])}",
                    "check the data, or --dim sizes of dynamic axes",
                )
            if a.dtype.name != graph.input_dtypes[name]:
                arrays[name] = a.astype(graph.input_dtypes[name])
        if total < b:
            reps = -(-b // total)
            arrays = {k: np.concatenate([v] * reps) for k, v in arrays.items()}
            total = len(next(iter(arrays.values())))
        out = [{k: np.ascontiguousarray(v[i: i + b]) for k, v in arrays.items()}
               for i in range(0, total - b + 1, b)]
        return out, None
    rng = np.random.default_rng(0)
    out = []
    for _ in range(8):
        batch = {}
        for name, shape in graph.input_shapes.items():
            dt = np.dtype(graph.input_dtypes[name])
            batch[name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                           else np.zeros(shape, dt))
        out.append(batch)
    return out, ("no data given: verification and timing use random inputs (--data FILE.npz "
                 "for real ones)")


def _split_calibration(samples: list) -> tuple[list, list]:
    """int8 scales come from the first batches (up to 64 samples, at most half the
    data), the accuracy effect from the others."""
    if len(samples) < 2:
        return samples, []
    per = len(next(iter(samples[0].values())))
    k = max(1, min(len(samples) // 2, -(-64 // per)))
    return samples[:k], samples[k:]


def _first(batches: list, n: int) -> list:
    """The leading batches holding ``n`` samples (at least one batch)."""
    per = len(next(iter(batches[0].values())))
    return batches[: max(1, -(-n // per))]


def _feeds(sess, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: batch[i.name] for i in sess.get_inputs()}


def _calibrate(sess, out_names: list[str], batches, cut_list,
               opset: int) -> dict[str, WireQuant]:
    """uint8 parameters for every float tensor the cuts send, from the calibration
    ``batches`` (per channel where that quantizes them much better: ``quant_params``)."""
    want = {t.name for c in cut_list for t in c.tensors if t.compressible}
    seen: dict[str, list[np.ndarray]] = {t: [] for t in want}
    for b in batches:
        vals = dict(b)
        vals.update(zip(out_names, sess.run(None, _feeds(sess, b)), strict=True))
        for t in want:
            if t in vals:
                seen[t].append(vals[t])
    return {t: quant_params(v, opset) for t, v in seen.items()}


# --------------------------------------------------------------------------- checks


def _run_pair(head_sess, tail_sess, batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    h = head_sess.run(None, _feeds(head_sess, batch))
    mid = dict(zip([o.name for o in head_sess.get_outputs()], h, strict=True))
    return tail_sess.run(None, _feeds(tail_sess, mid))


def _verify(graph: PartitionGraph, cut: Cut, samples) -> dict[str, Any]:
    full = plain_session(graph.model)
    head = plain_session(graph.head(cut))
    tail = plain_session(graph.tail(cut))
    worst_abs, worst_rel = 0.0, 0.0
    for b in samples:
        ref = full.run(None, _feeds(full, b))
        got = _run_pair(head, tail, b)
        for r, g in zip(ref, got, strict=True):
            err = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / scale if scale > 0 else err)
    return {"cut": cut.id, "samples": sum(len(next(iter(b.values()))) for b in samples),
            "max_abs_error": worst_abs, "max_rel_error": worst_rel, "tolerance": TOLERANCE,
            "passed": worst_rel <= TOLERANCE}


def _accuracy_effect(graph, head, tail, batches, targets, cut: Cut, calibrated_on: int,
                     target_offset: int, scales: dict[str, WireQuant]) -> dict[str, Any]:
    """How int8 on the wire changes the model's output, on batches not used for scales."""
    full = plain_session(graph.model)
    hs, ts = plain_session(head), plain_session(tail)
    refs, gots = [], []
    for b in batches:
        refs.append(full.run(None, _feeds(full, b))[0])
        gots.append(_run_pair(hs, ts, b)[0])
    ref, got = np.concatenate(refs), np.concatenate(gots)
    out: dict[str, Any] = {
        "mode": WIRE_MODE,
        "cut": cut.id,
        "bytes_float": sum(t.nbytes for t in cut.tensors),
        "bytes_int8": cut.wire_bytes("int8"),
        "bytes_ratio": (sum(t.nbytes for t in cut.tensors) / max(cut.wire_bytes("int8"), 1)),
        "quantization": quantization_of(cut.tensors, scales),
        "calibration_batches": calibrated_on,
        "evaluated_samples": int(len(ref)),
        "evaluated_on": "batches not used for the scales" if target_offset
        else "the calibration batches (too little data to hold some out)",
    }
    out.update(output_effect(ref, got, targets, target_offset))
    return out


# --------------------------------------------------------------------------- simulate


def _simulate(graph, cuts, choice: Cost, best_split: Cost | None, head, tail, device, server,
              link: Link, feeds, requests: int, progress, compress, scales) -> list[dict]:
    from compactor.partition.simulate import simulate

    todo = [choice] + ([best_split] if best_split and best_split.option != choice.option
                       else [])
    out = []
    for c in todo:
        if c.kind == "on-device":
            h, t = graph.model, None
        elif c.kind == "offload":
            h, t = None, graph.model
        elif head is not None and best_split is not None and c.option == best_split.option:
            h, t = head, tail
        else:
            cut = _cut_of(cuts, c)
            h, t = graph.head(cut, compress, scales), graph.tail(cut, compress, scales)
        with progress.task(f"simulate {c.option} over {fmt_bandwidth(link.uplink_bps)}, "
                           f"rtt {link.rtt_ms:g} ms"):
            r = simulate(h, t, device, server, link.uplink_bps, link.rtt_ms, feeds,
                         requests=requests, expected_ms=c.total_ms)
        measured = r["measured_ms"]["p50"]
        r.update({"option": c.option, "predicted_ms": c.total_ms,
                  "error": (measured - c.total_ms) / c.total_ms if c.total_ms > 0 else None,
                  "emulated": device.emulated or server.emulated})
        out.append(r)
    return out


# --------------------------------------------------------------------------- output


def _option_dict(c: Cost, cuts: Mapping[int, Cut], graph: PartitionGraph) -> dict[str, Any]:
    d = c.to_dict()
    pos = {"on-device": graph.n_nodes, "offload": 0}.get(c.option)
    if pos is None:
        pos = int(c.option.split("@")[1])
    cut = cuts[pos]
    d["position"] = pos
    d["tensors"] = [t.to_dict() for t in cut.tensors] if c.kind != "on-device" else []
    d["sends_input"] = cut.sends_input if c.kind != "on-device" else False
    return d


def _write(out_dir: Path, plan, head, tail, costs, cross, link: Link, graph, spec, device,
           server) -> dict[str, Path]:
    import onnx

    from compactor.partition.chart import render_svg

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, m in (("head", head), ("tail", tail)):
        p = out_dir / f"{name}.onnx"
        if m is not None:
            onnx.save(m, str(p))
            files[name] = p
        elif p.exists():
            p.unlink()  # a stale part from an earlier plan would mislead
    est = " (estimate)" if device.estimate or server.estimate else ""
    sub = (f"{device.profile.name} x{device.slowdown:.3g} → {server.profile.name} "
           f"x{server.slowdown:.3g}, rtt {link.rtt_ms:g} ms, batch {graph.batch_size}"
           f"{', int8 transfer' if spec.compress else ''}{est}")
    lo, hi = _chart_range(link)
    if spec.objective != "latency":  # the chart plots latency: mark latency's crossovers
        cross = crossovers(costs, lo, hi, "latency")
    svg = render_svg(costs, cross, link.uplink_bps, f"{graph.path.name}: where to run it",
                     lo=lo, hi=hi, subtitle=sub)
    (out_dir / "chart.svg").write_text(svg, encoding="utf-8")
    files["chart"] = out_dir / "chart.svg"
    files["plan"] = out_dir / "plan.json"
    return files


def _why_no_cut(rejected, n: int) -> str:
    if n <= 1:
        return "the model has a single node"
    reasons = sorted({r.reason.split(" (")[0] if "tensors cross" in r.reason else r.reason
                      for r in rejected})
    return "every inner cut is rejected: " + "; ".join(reasons[:3])


# --------------------------------------------------------------------------- recipes


def plan_for_artifact(spec: PartitionSpec, model_path: Path, eval_batches, base_dir: Path,
                      work_dir: Path, progress) -> tuple[dict[str, Path], dict[str, Any]]:
    """The recipe's ``partition:`` section: plan the final model on the eval data. Returns
    the files for the artifact (head.onnx, tail.onnx, plan.json, partition.svg) and a
    summary for the manifest."""
    data = [b.inputs for b in eval_batches]
    labelled = [b.target for b in eval_batches if b.target is not None]
    targets = np.concatenate(labelled) if len(labelled) == len(eval_batches) else None
    result = plan_partition(model_path, spec, base_dir=base_dir, data=data, targets=targets,
                            out_dir=work_dir, progress=progress)
    files = {f"{k}.onnx": v for k, v in result.files.items() if k in ("head", "tail")}
    files["plan.json"] = result.files["plan"]
    files["partition.svg"] = result.files["chart"]
    plan = result.plan
    summary = {k: plan.get(k) for k in ("choice", "best_split", "crossovers", "verification",
                                         "compression", "estimate", "link", "objective")}
    summary["choice"] = {k: plan["choice"][k] for k in
                         ("option", "description", "total_ms", "device_ms", "upload_ms",
                          "rtt_ms", "server_ms", "download_ms", "bytes_up")}
    if plan.get("best_split"):
        summary["best_split"] = {k: plan["best_split"][k]
                                 for k in ("option", "description", "total_ms")}
    summary["files"] = sorted(files)
    summary["notes"] = result.notes
    return files, summary
