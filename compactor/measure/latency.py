"""Latency of an ONNX model in ONNX Runtime, under a profile's runtime settings.

Each (model, profile) is timed in a fresh process (``compactor.measure.worker``), so the
caller's memory and threads (a torch training loop, say) do not distort it. Within that
process each batch size is warmed up, then run until its median is stable: the 95%
confidence interval of the median (from order statistics, no assumption about the shape of
the distribution) lies within ±``target_ci`` of it, or the time cap is reached.

Budgets are judged on a second, noise-robust figure (:func:`quiet_estimate`): the runs
are grouped into blocks of about 0.1 s in time order, each block is tagged busy when the
measuring process got less than 75% of the cores it asked for or other processes took
cores meanwhile (/proc/stat), and the quantile is taken over the runs of the faster half
of the quiet blocks, with a ~95% interval from resampling those blocks. A neighbour's burst
slows whole blocks, so it lands in the slower half and is left out; when too few blocks
ran quiet the estimate says ``busy`` and a verdict may pass on it but never fail.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from compactor.errors import PassError
from compactor.profiles import Profile
from compactor.verdict import Interval

log = logging.getLogger(__name__)

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
    throughput: float  # samples per second at this batch size (from p50)
    ci: float | None = None  # half-width of the median's 95% CI, relative to the median
    stable: bool | None = None  # the CI reached the profile's target before the time cap
    seconds: float | None = None  # time spent timing (after warm-up)
    # CPU time the process got / (wall time x threads it runs): well below 1 means other
    # processes took cores it asked for, and the latency is the busy host's.
    cpu_share: float | None = None
    # The noise-robust estimate budgets are judged on (:func:`quiet_estimate`): per
    # quantile ("p50", "p90", "p99") [estimate, low, high] of its ~95% interval, in ms.
    quiet: dict[str, list[float]] | None = None
    blocks: int | None = None  # blocks of runs timed
    quiet_blocks: int | None = None  # of which ran on a quiet host
    busy: bool | None = None  # too few quiet blocks: the estimate is the busy host's
    others_cores: float | None = None  # cores other processes took while it was timed

    def interval(self, q: str) -> Interval | None:
        """The noise-robust estimate of quantile ``q`` with its interval, or None (records
        from before it was measured)."""
        return quiet_interval(self.quiet, q, self.busy, self.quiet_blocks, self.blocks,
                              self.others_cores, self.min)

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else
                    {q: [round(x, 5) for x in t] for q, t in v.items()} if k == "quiet" and v
                    else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Latency:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def quiet_interval(quiet: Mapping[str, Sequence[float]] | None, q: str, busy: bool | None,
                   quiet_blocks: int | None, blocks: int | None,
                   others_cores: float | None, fastest: float | None = None
                   ) -> Interval | None:
    """A :class:`Latency`'s (or its manifest record's) estimate of ``q`` as an Interval."""
    return Interval.from_quiet(quiet, q, busy, quiet_blocks, blocks, others_cores, fastest)


def median_ci(sorted_ms: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """The median and its distribution-free 95% confidence interval (order statistics)."""
    a = np.asarray(sorted_ms)
    n = len(a)
    med = float(np.median(a))
    half = 1.96 * math.sqrt(n) / 2.0
    lo = max(int(math.floor(n / 2.0 - half)) - 1, 0)
    hi = min(int(math.ceil(n / 2.0 + half)), n - 1)
    return med, float(a[lo]), float(a[hi])


def relative_ci(sorted_ms: Sequence[float] | np.ndarray) -> float:
    med, lo, hi = median_ci(sorted_ms)
    if med <= 0:
        return 0.0
    return max(med - lo, hi - med) / med


# Student's t at 97.5% for 4..9 degrees of freedom (5..10 blocks).
_T975 = {4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def block_ci(times_ms: Sequence[float] | np.ndarray, max_blocks: int = 10) -> float:
    """Relative half-width of a 95% CI of the median from consecutive blocks of runs
    ("batch means"): the runs split in time order, a median per block, a t interval over
    those medians. Unlike the order-statistic interval it widens when the host's speed
    drifts between phases (a neighbour's burst, a frequency change), which makes
    consecutive runs alike and the i.i.d. interval too narrow. ``inf`` with too few runs."""
    a = np.asarray(times_ms, dtype=float)
    b = min(max_blocks, len(a) // 5)
    if b < 5:
        return math.inf
    medians = np.array([np.median(x) for x in np.array_split(a, b)])
    centre = float(np.median(a))
    if centre <= 0:
        return 0.0
    half = _T975[b - 1] * float(medians.std(ddof=1)) / math.sqrt(b)
    return half / centre


def stability(times_ms: Sequence[float] | np.ndarray) -> float:
    """The wider of the order-statistic and the block interval, relative to the median."""
    a = np.asarray(times_ms, dtype=float)
    return max(relative_ci(np.sort(a)), block_ci(a))


def usable_providers(profile: Profile) -> tuple[list[str], list[str]]:
    """The profile's execution providers that this host has (in the profile's order), and
    the ones it lacks."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    usable = [p for p in profile.execution_providers if p in have]
    missing = [p for p in profile.execution_providers if p not in have]
    return usable, missing


def providers_available(profile: Profile) -> tuple[bool, list[str]]:
    """Whether this host has any of the profile's execution providers (then it can be
    measured, with the first one it has), and the ones it lacks."""
    usable, missing = usable_providers(profile)
    return bool(usable), missing


def session(path: Path, profile: Profile | None = None, threads: int | None = None):
    """An ORT session with the profile's settings, or plain CPU with ``threads``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # its errors are raised as exceptions, not logged
    providers = ["CPUExecutionProvider"]
    if profile is not None:
        n, _ = profile.threads_on_host()
        so.intra_op_num_threads = n
        so.inter_op_num_threads = profile.inter_op_threads
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[profile.graph_optimization_level]
        )
        providers = usable_providers(profile)[0] or list(profile.execution_providers)
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")  # for the ops an accelerator lacks
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

    Returns the latencies and that process's cold-start and memory figures
    (``session_create_ms``, ``first_run_ms``, ``peak_rss_mb``, ``runtime_rss_mb``,
    ``providers``).
    """
    import subprocess
    import sys

    job, files = _write_job(model, profile, feeds_by_batch, work_dir, timing)
    proc = subprocess.Popen(
        [sys.executable, "-m", "compactor.measure.worker", str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, extra = _read_worker(proc, on_batch)
        stderr = proc.stderr.read() if proc.stderr else ""
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    if code != 0:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        log.debug("the measuring process of %s exited %s:\n%s", model.name, code, stderr)
        raise PassError(
            f"latency measurement of {model.name} on {profile.name} failed: "
            f"{last[-1][:300] if last else f'exit code {code}'}",
            "the inputs it was fed may not fit the model (its symbolic axes need sizes it "
            "runs at: `compactor inspect` lists them, `--dim NAME=N` sets them); "
            "--debug shows the measuring process's error in full",
        )
    return out, extra


def _write_job(model: Path, profile: Profile,
               feeds_by_batch: Mapping[int, Mapping[str, np.ndarray]], work_dir: Path,
               timing: Mapping[str, float] | None) -> tuple[Path, list[Path]]:
    """The worker's job file and its feeds; returns the job and every file written."""
    import json
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
        "timing": dict(timing if timing is not None else profile.timing.model_dump()),
    }), encoding="utf-8")
    return job, [job, *(Path(f) for f in feeds_files.values())]


def _read_worker(proc, on_batch: Callable[[Latency], None] | None
                 ) -> tuple[dict[int, Latency], dict]:
    """The worker's JSON lines: one per batch size as it is done, then its other figures."""
    import json

    out: dict[int, Latency] = {}
    extra: dict = {}
    assert proc.stdout is not None  # opened with stdout=PIPE
    for line in proc.stdout:
        msg = json.loads(line)
        if "latency" in msg:
            lat = Latency.from_dict(msg["latency"])
            out[lat.batch_size] = lat
            if on_batch:
                on_batch(lat)
        else:
            extra = msg
    return out, extra


def measure_latency(
    sess,
    feeds: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    min_runs: int = 30,
    min_time_s: float = 0.5,
    max_time_s: float = 3.0,
    warmup: int = 5,
    warmup_s: float = 0.0,
    target_ci: float = 0.02,
    threads: int | None = None,
    on_run: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    probe: Callable[[], tuple[float, float | None]] | None = None,
) -> Latency:
    """Time ``sess.run`` on ``feeds``: warm up, then repeat for at least ``min_runs`` and
    ``min_time_s`` until the median's 95% CI is within ±``target_ci`` of it, stopping at
    ``max_time_s`` (the result then says ``stable=False``). The CI is the wider of the
    order-statistic interval and the block interval (:func:`block_ci`), so a host whose
    speed drifts keeps being timed, and says so, instead of stopping in one phase.
    ``probe`` returns (this process's CPU seconds, the host's busy CPU seconds or None)."""
    feeds = dict(feeds)
    probe = probe or _probe
    warm_until = clock() + min(warmup_s, max_time_s * 0.1)
    done = 0
    while done < warmup or clock() < warm_until:
        sess.run(None, feeds)
        done += 1
    cpu0, host0 = probe()
    start = clock()
    runs = _timed_runs(sess, feeds, _Limits(min_runs, min_time_s, max_time_s, target_ci),
                       on_run, clock, start, _Blocks(probe, clock, threads))
    seconds = clock() - start
    cpu1, host1 = probe()
    times = runs.times
    a = np.sort(np.asarray(times))
    p50 = float(np.percentile(a, 50))
    quiet = quiet_estimate(times, runs.blocks.ends, runs.blocks.busy)
    n_quiet = sum(1 for b in runs.blocks.busy if not b)
    return Latency(
        batch_size=batch_size,
        p50=p50,
        p90=float(np.percentile(a, 90)),
        p99=float(np.percentile(a, 99)),
        mean=float(a.mean()),
        std=float(a.std()),
        min=float(a[0]),
        runs=len(times),
        throughput=batch_size * 1000.0 / p50 if p50 > 0 else 0.0,
        ci=min(stability(times), 9.99),  # finite in JSON even with too few runs
        stable=runs.stable,
        seconds=seconds,
        cpu_share=(cpu1 - cpu0) / (seconds * threads) if threads and seconds > 0 else None,
        quiet=None if quiet is None else {q: list(v) for q, v in quiet.items()},
        blocks=len(runs.blocks.ends),
        quiet_blocks=n_quiet,
        # a short timing's few blocks, all quiet, are not a busy host
        busy=n_quiet < min(MIN_QUIET_BLOCKS, len(runs.blocks.ends)),
        others_cores=(None if host0 is None or host1 is None or seconds <= 0 else
                      max(0.0, (host1 - host0 - (cpu1 - cpu0)) / seconds)),
    )


def _probe() -> tuple[float, float | None]:
    from compactor.measure.host import host_busy_seconds

    return time.process_time(), host_busy_seconds()


# A block of runs lasts at least this long: /proc/stat counts in 10 ms ticks, so shorter
# blocks could not tell whether other processes ran during them.
BLOCK_S = 0.1
# Below this share of the cores it asked for, a block ran on a busy host ...
BUSY_CPU_SHARE = 0.75
# ... and so it did when other processes took more than this many cores (at least this
# fraction of the host's) while it ran.
OTHERS_BUSY_CORES = 0.5
OTHERS_BUSY_SHARE = 0.25
# Fewer quiet blocks than this, and the estimate is the busy host's.
MIN_QUIET_BLOCKS = 6
_BOOTSTRAP = 300


@dataclass
class _Limits:
    min_runs: int
    min_time_s: float
    max_time_s: float
    target_ci: float


@dataclass
class _Blocks:
    """Where each block of runs ends (an index into the runs) and whether it ran busy."""

    probe: Callable[[], tuple[float, float | None]]
    clock: Callable[[], float]
    threads: int | None
    ends: list[int] = field(default_factory=list)
    busy: list[bool] = field(default_factory=list)
    _mark: tuple[float, float, float | None] | None = None

    def start(self) -> None:
        self._mark = (self.clock(), *self.probe())

    def maybe_end(self, n_runs: int) -> None:
        """Close the block after run ``n_runs`` when it has lasted ``BLOCK_S``."""
        if self.clock() - self._mark[0] >= BLOCK_S:  # type: ignore[index] - start() ran
            self._end(n_runs)

    def close(self, n_runs: int) -> None:
        """The runs after the last full block form one more block, or join the last one
        when they are too few to say anything on their own."""
        if not self.ends or n_runs - self.ends[-1] >= 3:
            self._end(n_runs)
        else:
            self.ends[-1] = n_runs

    def _end(self, n_runs: int) -> None:
        import os

        now = self.clock()
        cpu, host = self.probe()
        t0, cpu0, host0 = self._mark  # type: ignore[misc] - start() ran
        wall = max(now - t0, 1e-9)
        own = cpu - cpu0
        busy = bool(self.threads) and own / (wall * self.threads) < BUSY_CPU_SHARE
        if host is not None and host0 is not None and wall >= BLOCK_S:
            # (shorter, and /proc/stat's 10 ms ticks say nothing)
            others = (host - host0 - own) / wall
            busy = busy or others > max(OTHERS_BUSY_CORES,
                                        OTHERS_BUSY_SHARE * (os.cpu_count() or 1))
        self.ends.append(n_runs)
        self.busy.append(bool(busy))
        self._mark = (now, cpu, host)


@dataclass
class _Runs:
    times: list[float]
    stable: bool
    blocks: _Blocks


def _timed_runs(sess, feeds: dict, limits: _Limits, on_run: Callable[[], None] | None,
                clock: Callable[[], float], start: float, blocks: _Blocks) -> _Runs:
    """Milliseconds of each run until the median is stable or time is up, and which."""
    times: list[float] = []
    next_check = limits.min_runs
    blocks.start()
    while True:
        t0 = clock()
        sess.run(None, feeds)
        times.append((clock() - t0) * 1000.0)
        blocks.maybe_end(len(times))
        if on_run is not None:
            on_run()
        elapsed = clock() - start
        if elapsed >= limits.max_time_s and len(times) >= 5:
            blocks.close(len(times))
            return _Runs(times, False, blocks)
        if len(times) >= next_check and elapsed >= limits.min_time_s:
            # Checking costs a sort; doing it every ~10% more runs keeps it negligible.
            next_check = len(times) + max(1, len(times) // 10)
            if stability(times) <= limits.target_ci:
                blocks.close(len(times))
                return _Runs(times, True, blocks)


QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0}


def quiet_estimate(times_ms: Sequence[float], block_ends: Sequence[int],
                   block_busy: Sequence[bool], seed: int = 0
                   ) -> dict[str, tuple[float, float, float]] | None:
    """Per quantile, ``(estimate, low, high)``: the quantile of the runs in the faster half
    of the quiet blocks (of all blocks when fewer than ``MIN_QUIET_BLOCKS`` ran quiet), and
    a ~95% interval from resampling those blocks. None without runs."""
    a = np.asarray(times_ms, dtype=float)
    if len(a) == 0:
        return None
    edges = [0, *block_ends]
    blocks = [a[edges[i]:edges[i + 1]] for i in range(len(block_ends))
              if edges[i + 1] > edges[i]]
    busy = [b for i, b in enumerate(block_busy) if edges[i + 1] > edges[i]]
    quiet = [blk for blk, b in zip(blocks, busy) if not b]
    pool = quiet if len(quiet) >= MIN_QUIET_BLOCKS else blocks
    if not pool:
        pool = [a]
    medians = np.array([np.median(b) for b in pool])
    point = _faster_half(pool, medians, np.arange(len(pool)))
    rng = np.random.default_rng(seed)
    boots = np.array([_faster_half(pool, medians, rng.integers(0, len(pool), len(pool)))
                      for _ in range(_BOOTSTRAP if len(pool) > 1 else 0)])
    out = {}
    for i, q in enumerate(QUANTILES):
        est = float(point[i])
        lo, hi = ((float(np.percentile(boots[:, i], 2.5)), float(np.percentile(boots[:, i], 97.5)))
                  if len(boots) else (est, est))
        if len(pool) < MIN_QUIET_BLOCKS:  # a handful of blocks vouches for little
            lo, hi = min(lo, float(a.min())), max(hi, float(np.percentile(a, QUANTILES[q])))
        out[q] = (est, min(lo, est), max(hi, est))
    return out


def _faster_half(pool: list[np.ndarray], medians: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """p50, p90, p99 of the runs in the faster half (by median) of blocks ``idx``."""
    order = idx[np.argsort(medians[idx], kind="stable")]
    keep = order[:max(1, (len(order) + 1) // 2)]
    runs = np.concatenate([pool[i] for i in keep])
    return np.percentile(runs, list(QUANTILES.values()))
