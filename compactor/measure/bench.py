"""Measuring one model on one profile: the code path shared by the pipeline (every stage),
``compactor bench`` (any model, on any machine with onnxruntime) and ``compactor check
--remeasure``. Needs numpy, onnx and onnxruntime; never torch.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactor.errors import CompactorError, ModelLoadError, PassError, UsageError
from compactor.measure.latency import Latency, measure_in_subprocess, usable_providers
from compactor.measure.shapes import (
    axis_key,
    batch_axes,
    check_dim_names,
    defaulted,
    dim_example,
    is_named,
    is_symbolic,
    run_error,
    scalar_inputs,
)
from compactor.profiles import Profile
from compactor.verdict import Interval

# Below this share of the cores it asked for, the measuring process was competing for them.
BUSY_CPU_SHARE = 0.75

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class ProfileMeasurement:
    """What measuring a model on a profile gave: latency per batch size and the measuring
    process's figures, or ``measured=False`` with the reason in ``notes``."""

    profile: str
    measured: bool
    latency: dict[int, Latency] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def p(self, q: str = "p50", batch: int = 1) -> float | None:
        lat = self.latency.get(batch)
        return None if lat is None else getattr(lat, q)


def measure_profile(
    path: Path,
    profile: Profile,
    feeds_by_batch: Mapping[int, Mapping[str, np.ndarray]],
    work_dir: Path | None = None,
    on_batch: Callable[[Latency], None] | None = None,
) -> ProfileMeasurement:
    """Latency (per batch size), cold start and peak memory of ``path`` under ``profile``,
    in a fresh process; "not measured" when this host has none of its execution providers."""
    usable, missing = usable_providers(profile)
    if not usable:
        return ProfileMeasurement(profile.name, False, notes=[
            f"not measured: {', '.join(missing)} not available on this host"])
    notes = []
    if missing:
        notes.append(f"{', '.join(missing)} not available on this host; measured with "
                     f"{usable[0]}")
    _, thread_note = profile.threads_on_host()
    if thread_note:
        notes.append(thread_note)
    with tempfile.TemporaryDirectory(prefix="compactor-measure-") as tmp:
        lat, runtime = measure_in_subprocess(
            path, profile, feeds_by_batch, work_dir or Path(tmp), on_batch=on_batch
        )
    starved = [v.cpu_share for v in lat.values() if v.cpu_share is not None]
    threads = runtime.get("threads") or 1
    if starved and min(starved) < BUSY_CPU_SHARE:
        notes.append(
            f"busy host: the measuring process got {min(starved) * threads:.1f} of the "
            f"{threads} core{'s' * (threads > 1)} it runs on (1-min load average "
            f"{runtime.get('load_avg_1m') or 0:.1f}); latency here depends on what else "
            "runs, so measure on an idle host before trusting it")
    unstable = [bs for bs, v in lat.items() if v.stable is False]
    if unstable:
        notes.append(
            f"median not stable to ±{profile.timing.target_ci * 100:g}% within "
            f"{profile.timing.max_time_s:g} s at batch {', '.join(map(str, unstable))} "
            "(a noisy host); its CI is in the results")
    return ProfileMeasurement(profile.name, True, lat, runtime, notes)


def timed_for(profile: Profile, seconds: float) -> Profile:
    """``profile`` timed for about ``seconds`` per batch size: a re-measurement that must
    gather more blocks of runs, not stop as soon as the median looks stable."""
    t = profile.timing
    timing = t.model_copy(update={"max_time_s": max(seconds, 0.2),
                                  "min_time_s": max(seconds, 0.2) * 0.95,
                                  "warmup_s": min(t.warmup_s, seconds * 0.1)})
    return profile.model_copy(update={"timing": timing})


def remeasure_latency(path: Path, profile: Profile, feeds: Mapping[str, np.ndarray],
                      seconds: float, work_dir: Path | None = None) -> dict[str, Interval]:
    """Batch-1 latency of ``path`` measured again, in a fresh process, for about
    ``seconds``: each quantile's noise-robust estimate and interval (empty when this host
    cannot measure the profile)."""
    m = measure_profile(path, timed_for(profile, seconds), {1: feeds}, work_dir)
    l1 = m.latency.get(1)
    if l1 is None:
        return {}
    return {q: iv for q in ("p50", "p90", "p99") if (iv := l1.interval(q)) is not None}


# --------------------------------------------------------------------------- feeds


def input_specs(path: Path) -> list[tuple[str, list[int | str | None], Any]]:
    """``(name, shape, numpy dtype)`` of each model input, read by ONNX Runtime (so .ort
    files work too)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # its errors are raised as exceptions, not logged
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - every ORT load failure means the same here
        raise ModelLoadError(
            f"ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0][:300]}",
            "bench takes an .onnx (or .ort) model; run `compactor inspect` on it",
        ) from e
    out = []
    for i in sess.get_inputs():
        if i.type not in _ORT_TYPES:
            raise UsageError(f"input {i.name!r} has type {i.type}, which bench cannot fill",
                             "bench feeds float, integer and bool tensors")
        out.append((i.name, list(i.shape), _ORT_TYPES[i.type]))
    return out


# Feeds are written to a file and loaded again by the measuring process, so each exists about
# three times over; past this cap (or a quarter of the memory available now) a run would
# thrash or be killed, so it is refused before anything is allocated.
MAX_FEED_BYTES = 4 << 30


def feed_shapes(
    specs: list[tuple[str, list[int | str | None], Any]],
    batch_size: int,
    dims: Mapping[str, int],
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The concrete shape of each input at ``batch_size``: each input's batch axis
    (:func:`batch_axes`) is the batch; other symbolic axes take their size from ``dims``
    (by name, or ``input[axis]`` when unnamed; default 1). Returns the shapes and the sizes
    given to symbolic axes."""
    axes = batch_axes(specs)
    batch_names = {str(shape[a]) for name, shape, _ in specs
                   if (a := axes[name]) is not None and is_named(shape[a])}
    shapes, used = {}, {}
    for name, shape, _ in specs:
        concrete = []
        for axis, d in enumerate(shape):
            if not is_symbolic(d):
                concrete.append(d)
                continue
            key = axis_key(name, axis, d)
            if key in dims:
                v = dims[key]
            elif axis == axes[name] or key in batch_names:
                v = batch_size
            else:
                v = 1
            used[key] = v
            concrete.append(v)
        shapes[name] = concrete
    return shapes, used


def scalar_values(specs: list[tuple[str, list[int | str | None], Any]],
                  dims: Mapping[str, int]) -> dict[str, int]:
    """The value fed to each 0-d (scalar) input: ``--dim NAME=V`` for it, else 1."""
    return {name: dims.get(name, 1) for name, shape, _ in specs if len(shape) == 0}


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_feed_size(specs: list[tuple[str, list[int | str | None], Any]],
                    shapes: Mapping[str, list[int]], batch_size: int) -> int:
    """The feeds' total bytes; a UsageError before any allocation when they cannot fit."""
    total = sum(math.prod(shapes[name]) * np.dtype(dtype).itemsize
                for name, _, dtype in specs)
    avail = available_memory()
    limit = MAX_FEED_BYTES if avail is None else min(MAX_FEED_BYTES, avail // 4)
    if total > limit:
        biggest = max(specs, key=lambda s: math.prod(shapes[s[0]]) * np.dtype(s[2]).itemsize)
        raise UsageError(
            f"the model's inputs at batch {batch_size} need {total / 1e9:.3g} GB of random "
            f"data (input {ascii(biggest[0])} has shape {shapes[biggest[0]]}); at most "
            f"{limit / 1e9:.3g} GB can be fed on this host",
            "give smaller symbolic axes with --dim (or smaller batch sizes in the profile); "
            "an input fixed at this size cannot be benchmarked here",
        )
    return total


def random_feeds(
    specs: list[tuple[str, list[int | str | None], Any]],
    batch_size: int,
    dims: Mapping[str, int],
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Random inputs at ``batch_size`` (shapes from :func:`feed_shapes`), refused before
    allocation when they would not fit in memory. Returns the feeds and the sizes given to
    symbolic axes."""
    shapes, used = feed_shapes(specs, batch_size, dims)
    check_feed_size(specs, shapes, batch_size)
    scalars = scalar_values(specs, dims)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, _, dtype in specs:
        concrete = shapes[name]
        if name in scalars:  # a 0-d input (a sample rate, a step): a fixed value, not noise
            a = np.array(scalars[name], dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            a = rng.standard_normal(concrete).astype(dtype)
        elif dtype is np.bool_:
            a = np.ones(concrete, dtype=bool)
        else:
            a = rng.integers(0, 2, size=concrete).astype(dtype)  # ids and masks: 0/1
        feeds[name] = a
    return feeds, used


# Sizes tried, smallest first, when the defaults fail: kept short, each is a model run.
TRIAL_SIZES = (32, 64, 224, 640)


def suggest_sizes(model: Any, specs: list[tuple[str, list[Any], Any]], dims: Mapping[str, int]
                  ) -> dict[str, int] | None:
    """A common size for the defaulted axes at which the model runs (the smallest of
    :data:`TRIAL_SIZES`, the same for all of them), or None when none does."""
    from compactor.measure.shapes import defaulted, run_error

    axes = defaulted(specs, dims)
    if not axes:
        return None
    for size in TRIAL_SIZES:
        trial = {**dims, **{a.key: size for a in axes}}
        try:
            feeds, _ = random_feeds(specs, 1, trial)
        except UsageError:  # too large to allocate here: larger sizes will be too
            return None
        if run_error(model, feeds) is None:
            return {a.key: size for a in axes}
    return None


def batch_is_dynamic(specs: list[tuple[str, list[int | str | None], Any]]) -> bool:
    """Whether some input has a symbolic batch axis (:func:`batch_axes`)."""
    return any(a is not None for a in batch_axes(specs).values())


# --------------------------------------------------------------------------- bench


def bench(path: Path, profile: Profile, dims: Mapping[str, int] | None = None,
          on_batch: Callable[[Latency], None] | None = None) -> dict[str, Any]:
    """Everything ``compactor bench`` reports for one model on one profile."""
    from compactor.measure.batching import batching_hint
    from compactor.measure.estimate import estimates_for
    from compactor.measure.host import describe_host
    from compactor.measure.size import sha256, size_bytes

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    dims = dict(dims or {})
    specs = input_specs(path)
    check_dim_names(dims, specs)
    batch_sizes, notes = _batch_sizes(specs, list(profile.batch_sizes))
    notes += _input_notes(specs, dims)
    feeds, used = _feeds_by_batch(specs, batch_sizes, dims)
    try:
        m = measure_profile(path, profile, feeds, on_batch=on_batch)
    except PassError as e:
        raise _guided(path, specs, dims, e) from e
    notes += m.notes

    one, _ = random_feeds(specs, 1, dims)
    info = _model_info(path, {k: a.shape for k, a in one.items()})
    if info["macs_reason"]:
        notes.append(f"MACs: not computable ({info['macs_reason']})")
    nbytes = path.stat().st_size if path.suffix == ".ort" else size_bytes(path)
    est = estimates_for(
        profile, macs=info["macs"], int8_share=info["int8_macs_share"],
        weight_bytes=nbytes, io_bytes=sum(a.nbytes for a in one.values()),
        measured_p50_ms=m.p("p50", 1), quantized=bool(info["quantized"]),
    )
    return {
        "model": {
            "file": str(path),
            "sha256": sha256(path),
            "size_bytes": nbytes,
            "inputs": _inputs_record(specs),
            "dims": used,
            **{k: info[k] for k in ("macs", "params", "quantized")},
        },
        "profile": profile.name,
        "settings": profile.model_dump(mode="json", by_alias=True),
        "measured": m.measured,
        "latency_ms": {str(b): v.to_dict() for b, v in sorted(m.latency.items())},
        "runtime": {k: (round(v, 3) if isinstance(v, float) else v)
                    for k, v in m.runtime.items()},
        "memory": _memory(m.runtime.get("peak_rss_mb"), profile.limits.memory_mb),
        "batching": batching_hint(m.latency, None, profile),
        "estimates": est,
        "notes": notes,
        "host": describe_host(),
    }


def _input_notes(specs: list[tuple[str, list[int | str | None], Any]],
                 dims: Mapping[str, int]) -> list[str]:
    """What bench chose for the inputs the model leaves open: scalar values, and the
    symbolic axes it ran at 1 because no --dim gave them."""
    notes = []
    values = scalar_values(specs, dims)
    dtypes = {n: np.dtype(t).name for n, _, t in specs}
    for name in scalar_inputs(specs):
        notes.append(f"scalar input {name!r} ({dtypes[name]}) fed {values[name]}"
                     + ("" if name in dims else f"; set it with --dim {name}=N"))
    left = defaulted(specs, dims)
    if left:
        notes.append("symbolic axes run at size 1: "
                     + ", ".join(a.describe() for a in left)
                     + f"; set the sizes you serve at with {dim_example(left)}")
    return notes


def _guided(path: Path, specs: list[tuple[str, list[int | str | None], Any]],
            dims: Mapping[str, int], e: PassError) -> CompactorError:
    """The measuring process failed: why, in one line, and which ``--dim`` to pass. When
    symbolic axes ran at the default size 1, the fix is the user's (exit 2): the hint gives
    the axes and, where a common size runs, that size."""
    one, _ = random_feeds(specs, 1, dims)
    why = run_error(path, one) or e.message
    left = defaulted(specs, dims)
    if left:
        sizes = suggest_sizes(path, specs, dims)
        runs = (f"; it runs at {next(iter(sizes.values()))}" if sizes else
                f"; it ran at none of {', '.join(map(str, TRIAL_SIZES))} either")
        return UsageError(
            f"{path.name} does not run with its symbolic axes "
            f"{', '.join(a.key for a in left)} at the default size 1: {why}",
            f"give the sizes you serve it at: {dim_example(left, sizes)}{runs}")
    given = ", ".join(f"{k}={v}" for k, v in dims.items())
    return PassError(
        f"latency measurement of {path.name} failed: {why}",
        (f"it was fed {given} (from --dim); " if given else "")
        + "check those sizes against the model's inputs (`compactor inspect` lists them)")


def _feeds_by_batch(specs: list[tuple[str, list[int | str | None], Any]],
                    batch_sizes: list[int], dims: Mapping[str, int]
                    ) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, int]]:
    """Random feeds at each batch size, and the sizes given to symbolic axes (the first
    batch size's, for axes the batch fills)."""
    feeds, used = {}, {}
    for bs in batch_sizes:
        feeds[bs], u = random_feeds(specs, bs, dims)
        used.update({k: v for k, v in u.items() if k not in used})
    return feeds, used


def _batch_sizes(specs: list[tuple[str, list[int | str | None], Any]],
                 wanted: list[int]) -> tuple[list[int], list[str]]:
    """The profile's batch sizes, or only the model's own when its batch axis is fixed
    (with a note saying so)."""
    if batch_is_dynamic(specs):
        return wanted, []
    fixed = [int(s[1][0]) for s in specs if s[1] and not is_symbolic(s[1][0])]
    keep = [b for b in wanted if b in fixed] or [fixed[0] if fixed else 1]
    if keep != wanted:
        return keep, [f"the model's batch axis is fixed: measured at batch {keep[0]} only"]
    return keep, []


def _inputs_record(specs: list[tuple[str, list[int | str | None], Any]]) -> list[dict]:
    return [{"name": n, "shape": [d if d is not None else "?" for d in shape],
             "dtype": np.dtype(t).name} for n, shape, t in specs]


def _memory(peak_mb: float | None, limit: float | None) -> dict[str, Any] | None:
    if peak_mb is None:
        return None
    return {
        "peak_rss_mb": round(peak_mb, 1),
        "limit_mb": limit,
        "within_limit": None if limit is None else peak_mb <= limit,
    }


def _model_info(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """MACs (or why there is no count), params and precision of an .onnx file (None for an
    .ort file)."""
    info: dict[str, Any] = {"macs": None, "params": None, "quantized": None,
                            "int8_macs_share": None, "macs_reason": None}
    if path.suffix == ".ort":
        return info  # ORT's flatbuffer format: no graph to count MACs or precision on
    import onnx

    from compactor.measure.macs import mac_count
    from compactor.measure.precision import precision_summary
    from compactor.measure.size import param_count

    model = onnx.load(str(path), load_external_data=False)
    macs = mac_count(model, shapes)
    per_node = macs.per_node
    prec = precision_summary(model, per_node)
    info.update(
        macs=macs.total,
        macs_reason=macs.reason,
        params=param_count(model),
        quantized=prec["quantized"],
        int8_macs_share=prec["int8_macs_share"] if per_node else (
            1.0 if prec["quantized"] else 0.0),
    )
    return info
