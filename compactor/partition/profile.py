"""Timing the parts of a model on the device and server profiles, in ONNX Runtime here.

Timing every possible head and tail is quadratic work; instead the model is cut at every
candidate point into contiguous segments (in topological order), each segment is timed
once per profile, and a head's time is the sum of its segments. The full model is timed
before and after the segments, and its time is the mean of the two. Each run of a small model
carries a fixed cost (the call into ONNX Runtime, copying outputs), so the sums subtract
that overhead (timed on a one-node model) and are then scaled so that all segments add up
to the full model's own time. The best few candidates are re-timed directly as real head
and tail models (``refine``), so the chosen plan's figures are direct measurements.

A profile whose device is not this host gets this host's time multiplied by a slowdown
factor (1 unless the user calibrates it, e.g. from ``compactor bench`` on the device); its
figures are labelled estimates.

Intra-op thread spinning is off in every session here: in ``--simulate`` the two parts
share this host's cores, and a spinning thread pool would steal them from the other part.
Every timed run follows an idle pause (``PAUSE_S``), because that is how a part runs in a
request: after waiting for the network. Back-to-back runs find warm caches and a busy CPU
and read up to half faster on small models than the same run after a pause.

An emulated device (a slowdown, or a latency measured on the real device) is the one
exception: it is defined as its slowdown times this host's *steady* time for the work, its
runs timed back to back (``Side.pause_s`` is 0). How warm this host happens to be after an
idle pause is a property of this host, not of the device, and multiplied by a slowdown of
25 it would be most of the figure (the digits CNN: 1.4 ms after a 20 ms pause, 0.77 ms back
to back, on a 2-core Xeon). ``--simulate`` holds each emulated run to exactly that figure
(:class:`compactor.partition.simulate_chain.Emulated`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from compactor.errors import PassError, UsageError
from compactor.partition.graph import QUANT_SUFFIX, WireQuant
from compactor.profiles import Profile

log = logging.getLogger(__name__)

PAUSE_S = 0.02  # idle time before each timed run, here and between simulated requests

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass(frozen=True)
class Side:
    """One end of the link: its profile and how its time relates to this host's."""

    role: str  # "device" or "server"
    profile: Profile
    slowdown: float = 1.0  # the profile's time = this host's time x slowdown
    calibration: str = "none"  # where the slowdown came from, for people
    latency_ms: float | None = None  # a real-device latency of the full model to calibrate to

    @property
    def on_this_host(self) -> bool:
        return self.profile.target_class == "host"

    @property
    def estimate(self) -> bool:
        """True when the figures are not plain measurements of this host."""
        return not self.on_this_host or self.slowdown != 1.0

    def settings_key(self) -> tuple:
        p = self.profile
        threads, _ = p.threads_on_host()
        return (threads, p.inter_op_threads, p.graph_optimization_level,
                tuple(p.execution_providers))

    @property
    def emulated(self) -> bool:
        """True when the device is not this host: its time is this host's x a factor."""
        return self.slowdown != 1.0 or self.latency_ms is not None

    @property
    def pause_s(self) -> float:
        """The idle time before each of its timed runs: none for an emulated device (its
        figure is this host's steady time x its slowdown), a request's pause otherwise."""
        return 0.0 if self.emulated else PAUSE_S

    def timing_key(self) -> tuple:
        """Sides with equal keys share their timings: same settings, same pause."""
        return (*self.settings_key(), self.pause_s)

    def label(self) -> str:
        how = ("measured on this host" if not self.estimate else
               f"estimate: this host's time x {self.slowdown:.3g} ({self.calibration})")
        return f"{self.role} {self.profile.name}: {how}"

    def to_dict(self) -> dict:
        threads, note = self.profile.threads_on_host()
        return {"profile": self.profile.name, "class": self.profile.target_class,
                "threads_here": threads, "thread_note": note,
                "slowdown": round(self.slowdown, 4), "calibration": self.calibration,
                "estimate": self.estimate, "label": self.label()}


def calibrated(side: Side, host_full_ms: float) -> Side:
    """``side`` with its slowdown set from a real-device latency of the full model."""
    if side.latency_ms is None:
        return side
    if host_full_ms <= 0:
        raise PassError("the full model's time here is zero; cannot calibrate", None)
    f = side.latency_ms / host_full_ms
    return Side(side.role, side.profile, f,
                f"calibrated: {side.latency_ms:.4g} ms on the {side.role} / "
                f"{host_full_ms:.4g} ms here", side.latency_ms)


def make_session(model, profile: Profile):
    """An ORT session with the profile's settings (spinning off), from a ModelProto or path."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads, _ = profile.threads_on_host()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = profile.inter_op_threads
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _OPT_LEVELS[profile.graph_optimization_level])
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    have = set(ort.get_available_providers())
    providers = [p for p in profile.execution_providers if p in have]
    if not providers:
        missing = ", ".join(profile.execution_providers)
        raise UsageError(
            f"profile {profile.name} needs {missing}, which this host's onnxruntime lacks",
            "partition measures on this host: use a CPU profile and calibrate it with "
            "--device-slowdown/--server-slowdown",
        )
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    src = model if isinstance(model, (str, bytes)) else (
        str(model) if not hasattr(model, "SerializeToString") else model.SerializeToString())
    try:
        return ort.InferenceSession(src, so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises many types; all mean "won't load"
        raise PassError(
            f"ONNX Runtime cannot load a part of the model: {str(e).splitlines()[0][:300]}",
            "run `compactor inspect` on the model; run with --debug for details",
        ) from e


def plain_session(model):
    """A default CPU session, for numeric checks (not timing)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class TimingSettings:
    warmup: int = 3
    min_runs: int = 10
    min_time_s: float = 0.1
    max_time_s: float = 1.0
    warmup_s: float = 0.0  # the untimed warm-up also runs at least this long (run time)

    @classmethod
    def of(cls, profile: Profile, quick: bool) -> TimingSettings:
        t = profile.timing
        if not quick:
            # the profile's warm-up time too, capped as `compactor bench` caps it (a tenth
            # of the time cap): five runs of a 224x224 CNN are 50 ms of work, and the
            # benchmark's plans read MobileNetV2 ~20% slower than the simulation ran it
            return cls(t.warmup, t.min_runs, t.min_time_s, t.max_time_s,
                       min(t.warmup_s, t.max_time_s / 10))
        # segments are many and small; a fifth of the profile's budget each is plenty
        return cls(min(t.warmup, 3), max(5, t.min_runs // 3), t.min_time_s / 5,
                   max(0.05, t.max_time_s / 5))


def time_ms(model, profile: Profile, feeds: Mapping[str, np.ndarray],
            timing: TimingSettings, pause_s: float = PAUSE_S) -> float:
    """Median milliseconds per run of ``model`` on ``feeds`` under ``profile``, each run
    after an idle pause of ``pause_s``."""
    return time_session(make_session(model, profile), feeds, timing, pause_s)


def time_session(sess, feeds: Mapping[str, np.ndarray], timing: TimingSettings,
                 pause_s: float = PAUSE_S) -> float:
    """:func:`time_ms` on an open session."""
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    # warm up for ``warmup`` runs and ``warmup_s`` of run time (pauses not counted), but
    # for no longer than a third of the time cap: a tiny model would need thousands of runs
    warm, n, start = 0.0, 0, time.perf_counter()
    while n < max(timing.warmup, 1) or (
            warm < timing.warmup_s and time.perf_counter() - start < timing.max_time_s / 3):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        warm += time.perf_counter() - t0
        n += 1
        if pause_s:
            time.sleep(pause_s)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
        busy = time.perf_counter() - start
        if len(times) >= 5 and (busy >= timing.max_time_s or (
                len(times) >= timing.min_runs and busy >= timing.min_time_s)):
            break
        if pause_s:
            time.sleep(pause_s)
    return float(np.median(times))


def overhead_model():
    """A one-node model (Identity on one float): the fixed cost of a run."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@dataclass
class HostTimes:
    """This host's medians (ms) under one settings group, for the cuts at ``positions``."""

    positions: list[int]  # sorted; first 0 (offload), last n (on device)
    full_ms: float
    segments_ms: list[float]  # segment j runs positions[j] .. positions[j+1]
    overhead_ms: float
    head_ms: dict[tuple[int, str | None], float] = field(default_factory=dict)  # direct
    tail_ms: dict[tuple[int, str | None], float] = field(default_factory=dict)

    @property
    def segment_scale(self) -> float:
        """Full model time / (segments' sum less the extra run overheads)."""
        total = sum(self.segments_ms) - (len(self.segments_ms) - 1) * self.overhead_ms
        return self.full_ms / total if total > 0 else 1.0

    def _est(self, seg: Sequence[float]) -> float:
        if not seg:
            return 0.0
        raw = sum(seg) - (len(seg) - 1) * self.overhead_ms
        return max(raw * self.segment_scale, 0.0)

    def head(self, position: int, compress: str | None = None) -> tuple[float, str]:
        """Device-side time of the head ending at ``position``, and how it was found."""
        if position == 0:
            return 0.0, "nothing to run"
        if position == self.positions[-1]:
            return self.full_ms, "measured"
        if (position, compress) in self.head_ms:
            return self.head_ms[(position, compress)], "measured"
        m = self.positions.index(position)
        return self._est(self.segments_ms[:m]), "segment sum"

    def tail(self, position: int, compress: str | None = None) -> tuple[float, str]:
        if position == self.positions[-1]:
            return 0.0, "nothing to run"
        if position == 0:
            return self.full_ms, "measured"
        if (position, compress) in self.tail_ms:
            return self.tail_ms[(position, compress)], "measured"
        m = self.positions.index(position)
        return self._est(self.segments_ms[m:]), "segment sum"

    def to_dict(self) -> dict:
        return {"full_ms": round(self.full_ms, 4), "overhead_ms": round(self.overhead_ms, 4),
                "segment_scale": round(self.segment_scale, 4),
                "segments_ms": [round(x, 4) for x in self.segments_ms],
                "direct_head_ms": {f"{p}{'/' + c if c else ''}": round(v, 4)
                                   for (p, c), v in self.head_ms.items()},
                "direct_tail_ms": {f"{p}{'/' + c if c else ''}": round(v, 4)
                                   for (p, c), v in self.tail_ms.items()}}


def profile_segments(graph, positions: Sequence[int], profile: Profile,
                     values: Mapping[str, np.ndarray],
                     on_step: Callable[[], None] | None = None,
                     pause_s: float = PAUSE_S) -> HostTimes:
    """Time the full model, each segment between consecutive ``positions`` and the run
    overhead, under ``profile``, each run after ``pause_s`` idle. ``values`` holds the model
    inputs and every tensor that crosses a cut at ``positions`` (from one run of the
    model)."""
    quick = TimingSettings.of(profile, quick=True)
    full_t = TimingSettings.of(profile, quick=False)
    before = time_ms(graph.model, profile, values, full_t, pause_s)
    over = time_ms(overhead_model(), profile, {"x": np.zeros(1, np.float32)}, quick, pause_s)
    segs = []
    cuts = [graph.cut(p) for p in positions]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        model, _ = graph.segment(a, b)
        segs.append(time_ms(model, profile, values, quick, pause_s))
        if on_step:
            on_step()
    # timed before and after the segments: on a shared host the speed drifts meanwhile
    after = time_ms(graph.model, profile, values, full_t, pause_s)
    if on_step:
        on_step()
    return HostTimes(list(positions), (before + after) / 2, segs, over)


def time_direct(graph, cut, times: HostTimes, side: Side, values: Mapping[str, np.ndarray],
                compress: str | None, scales: Mapping[str, WireQuant]) -> None:
    """Time ``cut``'s head (on the device side) or tail (the server side) as a real model
    and record it."""
    t = TimingSettings.of(side.profile, quick=False)
    if side.role == "device":
        if (cut.position, compress) in times.head_ms or cut.kind != "split":
            return
        m = graph.head(cut, compress, scales)
        times.head_ms[(cut.position, compress)] = time_ms(m, side.profile, values, t,
                                                          side.pause_s)
    else:
        if (cut.position, compress) in times.tail_ms or cut.kind != "split":
            return
        m = graph.tail(cut, compress, scales)
        feeds = dict(values)
        if compress == "int8":
            feeds.update(quantized_feeds(cut, values, scales))
        times.tail_ms[(cut.position, compress)] = time_ms(m, side.profile, feeds, t,
                                                          side.pause_s)


def quantized_feeds(cut, values: Mapping[str, np.ndarray],
                    scales: Mapping[str, WireQuant]) -> dict[str, np.ndarray]:
    out = {}
    for t in cut.tensors:
        if t.compressible and t.name in values:
            wq = scales.get(t.name) or WireQuant.unit()
            out[t.name + QUANT_SUFFIX] = wq.quantize(values[t.name])
    return out
