"""Two models timed paired and interleaved in one process: the ratio a relative budget
(``min_speedup``, a regression against an older artifact, "int8 is SLOWER") is judged on.

Both sessions run under the profile's settings, in alternating blocks (reference, model,
model, reference, ...), so load from other processes hits both alike; the figure is the
median over rounds of (reference's block p50 / model's block p50), with a distribution-free
~95% interval from the order statistics of those per-round ratios. Two figures timed
minutes apart, under different neighbours, are never divided.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from compactor.profiles import Profile
from compactor.verdict import Interval

BLOCK_S = 0.1  # each model runs about this long in a row per round (at least MIN_BLOCK runs)
MIN_BLOCK = 4
MIN_ROUNDS = 6


def median_interval(values: np.ndarray) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free ~95% interval (order statistics at
    n/2 ∓ 0.98·sqrt(n)); with few values, their range."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    half = 0.98 * math.sqrt(n)
    lo = int(math.floor(n / 2 - half))
    hi = int(math.ceil(n / 2 + half)) - 1
    return float(np.median(v)), float(v[max(lo, 0)]), float(v[min(max(hi, 0), n - 1)])


def paired_speedup(reference: Path, model: Path, profile: Profile,
                   feeds: Mapping[str, np.ndarray], seconds: float,
                   clock: Callable[[], float] = time.perf_counter) -> Interval:
    """How many times faster ``model`` runs than ``reference`` on ``feeds``, timed paired
    for about ``seconds`` (at least ``MIN_ROUNDS`` rounds)."""
    from compactor.measure.latency import session

    sessions = [session(Path(reference), profile), session(Path(model), profile)]
    feed = []
    for s in sessions:
        names = {i.name for i in s.get_inputs()}
        feed.append({k: v for k, v in feeds.items() if k in names})
    block = [_block_size(s, f, clock) for s, f in zip(sessions, feed)]
    ratios = []
    t_end = clock() + seconds
    while len(ratios) < MIN_ROUNDS or clock() < t_end:
        order = (0, 1) if len(ratios) % 2 == 0 else (1, 0)
        ms = {i: _block_p50(sessions[i], feed[i], block[i], clock) for i in order}
        ratios.append(ms[0] / ms[1] if ms[1] > 0 else float("inf"))
    med, lo, hi = median_interval(np.asarray(ratios))
    return Interval(med, lo, hi, note=f"{len(ratios)} paired rounds")


def _block_size(sess, feed: dict, clock: Callable[[], float]) -> int:
    """Warm the session up, and size its block to about ``BLOCK_S`` of runs."""
    per_run = 0.0
    for _ in range(3):
        t0 = clock()
        sess.run(None, feed)
        per_run = clock() - t0
    return int(min(max(math.ceil(BLOCK_S / max(per_run, 1e-6)), MIN_BLOCK), 1000))


def _block_p50(sess, feed: dict, n: int, clock: Callable[[], float]) -> float:
    """p50 milliseconds of ``n`` runs in a row; the first quarter runs while the other
    session's threads wind down, and is not kept."""
    kept = []
    for i in range(n):
        t0 = clock()
        sess.run(None, feed)
        if i >= n // 4:
            kept.append((clock() - t0) * 1000.0)
    return float(np.median(kept))
