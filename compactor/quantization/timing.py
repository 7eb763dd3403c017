"""Candidates timed against their float input in one run, on the target profile's settings.

Sessions are created with the profile's threads and optimization level, and their runs are
interleaved (float, candidate 1, candidate 2, ..., float, ...), so load from other processes
hits every model alike and the ratios stay fair on a busy machine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactor.profiles import Profile


@dataclass(frozen=True)
class Timing:
    """p50 milliseconds per model, measured interleaved in one run."""

    p50_ms: dict[str, float]
    runs: int
    profile: str
    batch_size: int
    threads: int
    seconds: float

    def speedup(self, key: str, reference: str) -> float:
        return self.p50_ms[reference] / self.p50_ms[key]

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "batch_size": self.batch_size,
                "threads": self.threads, "runs_per_model": self.runs,
                "seconds": round(self.seconds, 2)}


def compare_latency(models: Mapping[str, Path], profile: Profile,
                    feeds: Mapping[str, np.ndarray], batch_size: int,
                    max_seconds: float = 10.0, min_rounds: int = 10,
                    max_rounds: int = 200, reference: str = "float") -> Timing:
    """Interleaved p50 latency of each model on ``feeds``, within about ``max_seconds``
    (at least ``min_rounds`` rounds). ``reference`` is always timed to the end."""
    from compactor.measure.latency import session

    t_start = time.perf_counter()
    sessions = {k: session(Path(p), profile) for k, p in models.items()}
    names = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}
    feed = {k: {n: v for n, v in feeds.items() if n in names[k]} for k in sessions}
    for k, s in sessions.items():  # warm up
        for _ in range(3):
            s.run(None, feed[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    active = list(sessions)
    rounds = 0
    while rounds < max_rounds:
        order = active if rounds % 2 == 0 else active[::-1]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feed[k])
            times[k].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
        if rounds == min_rounds and len(active) > 2:
            # A model at over twice the best one's time is out of the race: stop timing it
            # (its figure stays, from its first rounds), so the close ones get the runs.
            best = min(float(np.median(times[k])) for k in active)
            active = [k for k in active if k == reference
                      or float(np.median(times[k])) <= 2.0 * best]
        if rounds >= min_rounds and time.perf_counter() - t_start > max_seconds:
            break
    threads, _ = profile.threads_on_host()
    return Timing({k: float(np.median(v)) for k, v in times.items()}, rounds, profile.name,
                  batch_size, threads, time.perf_counter() - t_start)
