"""Latency of an ONNX model in ONNX Runtime, under a profile's runtime settings."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compactor.errors import PassError
from compactor.profiles import Profile

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass(frozen=True)
class Latency:
    """Milliseconds per inference at one batch size."""

    batch_size: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    runs: int
    throughput: float  # samples per second at this batch size

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def session(path: Path, profile: Profile | None = None, threads: int | None = None):
    """An ORT session with the profile's settings, or plain CPU with ``threads``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if profile is not None:
        n, _ = profile.threads_on_host()
        so.intra_op_num_threads = n
        so.inter_op_num_threads = profile.inter_op_threads
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[profile.graph_optimization_level]
        )
        providers = list(profile.execution_providers)
    elif threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises many types; all mean "won't load"
        raise PassError(
            f"ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0][:300]}",
            "run `compactor inspect` on it; the model may be invalid or use an unsupported op",
        ) from e


def measure_in_subprocess(
    model: Path,
    profile: Profile,
    feeds_by_batch: Mapping[int, Mapping[str, np.ndarray]],
    work_dir: Path,
    on_batch: Callable[[Latency], None] | None = None,
    timing: Mapping[str, float] | None = None,
) -> tuple[dict[int, Latency], dict]:
    """Latency per batch size, measured by ``compactor.measure.worker`` in a fresh process.

    Returns the latencies and the cold-start/memory figures of that process.
    """
    import json
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex[:8]
    feeds_files = {}
    for bs, feeds in feeds_by_batch.items():
        f = work_dir / f"feeds-{tag}-{bs}.npz"
        np.savez(f, **feeds)
        feeds_files[str(bs)] = str(f)
    job = work_dir / f"job-{tag}.json"
    job.write_text(json.dumps({
        "model": str(model),
        "profile": profile.model_dump(mode="json", by_alias=True),
        "feeds": feeds_files,
        "timing": dict(timing or {}),
    }), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "compactor.measure.worker", str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out: dict[int, Latency] = {}
    extra: dict = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            msg = json.loads(line)
            if "latency" in msg:
                lat = Latency(**msg["latency"])
                out[lat.batch_size] = lat
                if on_batch:
                    on_batch(lat)
            else:
                extra = msg
        stderr = proc.stderr.read() if proc.stderr else ""
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        job.unlink(missing_ok=True)
        for f in feeds_files.values():
            Path(f).unlink(missing_ok=True)
    if code != 0:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        raise PassError(
            f"latency measurement of {model.name} on {profile.name} failed: "
            f"{last[-1][:300] if last else f'exit code {code}'}",
            "run `compactor bench` on the model to see the full error",
        )
    return out, extra


def providers_available(profile: Profile) -> tuple[bool, list[str]]:
    """Whether this host has the profile's first-choice execution provider."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in profile.execution_providers if p not in have]
    return profile.execution_providers[0] in have, missing


def measure_latency(
    sess,
    feeds: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    min_runs: int = 30,
    min_time_s: float = 0.5,
    max_time_s: float = 3.0,
    warmup: int = 5,
    on_run: Callable[[], None] | None = None,
) -> Latency:
    """Time ``sess.run`` on ``feeds``: warm up, then repeat for at least ``min_runs`` and
    ``min_time_s`` (stopping at ``max_time_s``)."""
    for _ in range(warmup):
        sess.run(None, dict(feeds))
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        sess.run(None, dict(feeds))
        times.append((time.perf_counter() - t0) * 1000.0)
        if on_run is not None:
            on_run()
        elapsed = time.perf_counter() - start
        if (len(times) >= min_runs and elapsed >= min_time_s) or elapsed >= max_time_s:
            if len(times) >= 5:
                break
    a = np.asarray(times)
    p50 = float(np.percentile(a, 50))
    return Latency(
        batch_size=batch_size,
        p50=p50,
        p90=float(np.percentile(a, 90)),
        p99=float(np.percentile(a, 99)),
        mean=float(a.mean()),
        std=float(a.std()),
        min=float(a.min()),
        runs=len(times),
        throughput=batch_size * 1000.0 / p50,
    )
