"""Candidates timed against their float input in one run, on the target profile's settings.

Sessions are created with the profile's threads and optimization level, and timed in
alternating blocks (float, candidate 1, candidate 2, ..., float, ...), so load from other
processes hits every model alike and the ratios stay fair on a busy machine. A block is
0.15 s of runs in a row (at least four), of which the first quarter is not counted: right
after a switch, the previous session's worker threads still spin and the int8 kernels run
slow for a few runs (measured here: interleaving single runs made fp32 MiniLM 37 ms instead
of 21 ms on 2 cores, and int8 ratios swing between 1.2x and 1.9x).

That in-process timing ranks, but it is not how a model is served: alone in its process.
It can be unfair to one kind of graph: on all-MiniLM-L6-v2 (AMX Xeon, 2 threads) it timed
the transformer-fused dynamic int8 model at 1.39x fp32 and the unfused one at 1.90x, while
each alone in a fresh process ran at 1.85x and 1.62x. So the final choice between the
candidates that pass the budget is timed by :func:`compare_in_processes`: each model alone
in a fresh process (compactor's measurement worker), alternating with the float one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactor.profiles import Profile

BLOCK_S = 0.15  # each model runs this long in a row per round (at least MIN_BLOCK runs)
MIN_BLOCK = 4


@dataclass(frozen=True)
class Timing:
    """p50 milliseconds per model, measured interleaved in one run."""

    p50_ms: dict[str, float]
    runs: int
    profile: str
    batch_size: int
    threads: int
    seconds: float
    # Median over rounds of (reference's time / this model's time) in the same round:
    # runs next to each other share whatever else the host was doing.
    paired: dict[str, float] = field(default_factory=dict)
    # The lower end of a distribution-free ~95% confidence interval of that median (an
    # order statistic of the per-round ratios): what the timing can vouch for.
    paired_low: dict[str, float] = field(default_factory=dict)
    in_processes: bool = False  # each model alone in a fresh process (else interleaved)

    def speedup(self, key: str, reference: str) -> float:
        if key in self.paired:
            return self.paired[key]
        return self.p50_ms[reference] / self.p50_ms[key]

    def speedup_low(self, key: str, reference: str) -> float:
        """The speed-up's lower confidence bound; without per-round figures (a timer that
        reports one number per model), the speed-up itself."""
        if key in self.paired_low:
            return self.paired_low[key]
        return self.speedup(key, reference)

    def to_dict(self) -> dict[str, Any]:
        how = ({"method": "each model alone in a fresh process", "repeats": self.runs}
               if self.in_processes else {"rounds": self.runs, "block_s": BLOCK_S})
        return {"profile": self.profile, "batch_size": self.batch_size,
                "threads": self.threads, **how, "seconds": round(self.seconds, 2)}


def compare_latency(models: Mapping[str, Path], profile: Profile,
                    feeds: Mapping[str, np.ndarray], batch_size: int,
                    max_seconds: float = 10.0, min_rounds: int = 5,
                    max_rounds: int = 100, reference: str = "float") -> Timing:
    """Interleaved p50 latency of each model on ``feeds``, within about ``max_seconds``
    (at least ``min_rounds`` rounds). ``reference`` is always timed to the end."""
    from compactor.measure.latency import session

    t_start = time.perf_counter()
    sessions = {k: session(Path(p), profile) for k, p in models.items()}
    names = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}
    feed = {k: {n: v for n, v in feeds.items() if n in names[k]} for k in sessions}
    block = _block_sizes(sessions, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}  # per round: the block's p50
    active = list(sessions)
    rounds = 0
    while rounds < max_rounds:
        order = active if rounds % 2 == 0 else active[::-1]
        for k in order:
            times[k].append(_block_p50(sessions[k], feed[k], block[k]))
        rounds += 1
        if rounds in (2, min_rounds) and len(active) > 2:
            # A model far slower than the best is out of the race: stop timing it (its
            # figure stays, from its first rounds), so the close ones get the time.
            limit = 3.0 if rounds == 2 else 2.0
            best = min(float(np.median(times[k])) for k in active)
            active = [k for k in active if k == reference
                      or float(np.median(times[k])) <= limit * best]
        if rounds >= min_rounds and time.perf_counter() - t_start > max_seconds:
            break
    threads, _ = profile.threads_on_host()
    paired, low = {}, {}
    if reference in times:
        ref = times[reference]
        for k, v in times.items():
            n = min(len(v), len(ref))
            ratios = np.asarray(ref[:n]) / np.asarray(v[:n])
            paired[k] = float(np.median(ratios))
            low[k] = median_lower_bound(ratios)
    return Timing({k: float(np.median(v)) for k, v in times.items()}, rounds, profile.name,
                  batch_size, threads, time.perf_counter() - t_start, paired, low)


def median_lower_bound(values: np.ndarray) -> float:
    """Lower end of a distribution-free ~95% confidence interval of the median: the
    order statistic at n/2 - 0.98·sqrt(n) (normal approximation to the binomial). With
    few rounds it is the smallest value: every round must agree."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0:
        return float("nan")
    j = int(math.floor(n / 2 - 0.98 * math.sqrt(n)))
    return float(v[min(max(j, 0), n - 1)])


def _block_sizes(sessions: Mapping[str, Any], feed: Mapping[str, dict]) -> dict[str, int]:
    """Warm each model up, and size its block to about ``BLOCK_S`` of runs."""
    per_run: dict[str, float] = {}
    for k, s in sessions.items():
        for _ in range(3):
            t0 = time.perf_counter()
            s.run(None, feed[k])
            per_run[k] = time.perf_counter() - t0
    return {k: int(min(max(math.ceil(BLOCK_S / max(t, 1e-6)), MIN_BLOCK), 1000))
            for k, t in per_run.items()}


def _block_p50(sess, feed: dict, n: int) -> float:
    """p50 milliseconds of ``n`` runs in a row; the first quarter runs while the last
    model's block settles, and is not kept."""
    kept = []
    for i in range(n):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= n // 4:
            kept.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(kept))


PROCESS_RUN_S = 0.75  # seconds of runs per model per fresh process (after warm-up)


def compare_in_processes(models: Mapping[str, Path], profile: Profile,
                         feeds: Mapping[str, np.ndarray], batch_size: int, work: Path,
                         repeats: int = 3, reference: str = "float") -> Timing:
    """p50 latency of each model alone in a fresh process (as served), the models
    alternating, ``repeats`` times; the paired speed-ups are the median over repeats of the
    ratio within a repeat."""
    from compactor.measure.latency import measure_in_subprocess

    t_start = time.perf_counter()
    timing = {"warmup": 5, "min_runs": 10, "min_time_s": PROCESS_RUN_S,
              "max_time_s": 2 * PROCESS_RUN_S}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats):
        for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
            lat, _ = measure_in_subprocess(Path(models[k]), profile, {batch_size: dict(feeds)},
                                           work, timing=timing)
            times[k].append(lat[batch_size].p50)
    threads, _ = profile.threads_on_host()
    paired, low = {}, {}
    if reference in times:
        ref = np.asarray(times[reference])
        for k, v in times.items():
            ratios = ref / np.asarray(v)
            paired[k] = float(np.median(ratios))
            low[k] = median_lower_bound(ratios)
    return Timing({k: float(np.median(v)) for k, v in times.items()}, repeats, profile.name,
                  batch_size, threads, time.perf_counter() - t_start, paired, low,
                  in_processes=True)
