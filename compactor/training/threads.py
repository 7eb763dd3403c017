"""The faster of all threads and one, chosen from a training loop's own first steps.

On a shared CPU host whose other cores are busy, torch's threads wait for each other at
every small op: measured on a 2-core host at 1-min load 3.3, one epoch of the demo's
width-64 CNN took 21-26 s on 2 threads and 6-7 s on one, while on a quiet host 2 threads
win. No fixed choice is right, so the loop times its own steps both ways and keeps the
faster; the steps taken while timing are ordinary training steps (nothing is thrown away).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

# Step k of a run uses PLAN[k] (as a fraction: 1 = all threads, 0 = one); a warm-up step
# starts each setting, its time is not counted.
_PLAN = (1, 1, 1, 0, 0, 0)
_TIMED = {1: (1, 2), 0: (4, 5)}
MIN_STEPS = 4 * len(_PLAN)  # below this, probing costs more than it can win


class ThreadChooser:
    """Sets torch's intra-op threads before each of the first steps and, after
    ``len(_PLAN)`` steps, keeps whichever setting stepped faster (the median of its timed
    steps). Inactive (a no-op) off CPU, under torchrun, with one thread, or on short runs."""

    def __init__(self, device: Any, total_steps: int, distributed: bool) -> None:
        self.many = torch.get_num_threads()
        on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
        self.active = (on_cpu and not distributed and self.many > 1
                       and total_steps >= MIN_STEPS)
        self.times: list[float] = []
        self.chosen: int | None = None if self.active else self.many

    def before(self, step: int) -> None:
        if self.active and step < len(_PLAN):
            torch.set_num_threads(self.many if _PLAN[step] else 1)

    def after(self, step: int, seconds: float) -> None:
        if not self.active or step >= len(_PLAN):
            return
        self.times.append(seconds)
        if step == len(_PLAN) - 1:
            many = statistics.median(self.times[i] for i in _TIMED[1])
            one = statistics.median(self.times[i] for i in _TIMED[0])
            self.chosen = 1 if one < many else self.many
            torch.set_num_threads(self.chosen)

    def restore(self) -> None:
        torch.set_num_threads(self.many)

    def record(self) -> dict[str, Any] | None:
        if not self.active or self.chosen is None:
            return None
        t = self.times
        return {"threads": self.chosen, "of": self.many,
                "step_ms": {"all": round(1e3 * statistics.median(t[i] for i in _TIMED[1]), 2),
                            "one": round(1e3 * statistics.median(t[i] for i in _TIMED[0]), 2)}}
