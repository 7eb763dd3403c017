"""A Progress that records what a run reports, and can press Ctrl-C at a given step."""

from __future__ import annotations

import contextlib
import os
import signal

from compactor.progress import Progress, Task


class _Bar(Task):
    def __init__(self, owner):
        self.owner = owner

    def advance(self, n: int = 1) -> None:
        self.owner.steps += n
        if self.owner.interrupt_at == self.owner.steps:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    def status(self, text: str) -> None:
        self.owner.statuses.append(text)


class RecordingProgress(Progress):
    """Counts training steps, keeps status lines, and can press Ctrl-C at a given step."""

    def __init__(self, interrupt_at: int | None = None):
        self.interrupt_at = interrupt_at
        self.steps = 0
        self.statuses: list[str] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def task(self, description, total=None):
        yield _Bar(self) if description.startswith("distill: train") else Task()

    def note(self, message):
        self.notes.append(message)


def ctrl_c_at_training_step(monkeypatch, step: int) -> None:
    """Press Ctrl-C during the forward pass of training step ``step`` (counted over every
    training pass of the run), through distillation's loss."""
    import torch

    from compactor.training import losses

    real = losses.DistillLoss.__call__
    seen = {"n": 0}

    def pressing(self, *args, **kwargs):
        if torch.is_grad_enabled():
            seen["n"] += 1
            if seen["n"] == step:
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(losses.DistillLoss, "__call__", pressing)


def count_teacher_calls(monkeypatch) -> dict[str, int]:
    """``calls["n"]`` counts the distill teacher's forward passes from here on."""
    from compactor.passes import distill

    calls = {"n": 0}
    real = distill._Teacher.__call__

    def counting(self, batch):
        calls["n"] += 1
        return real(self, batch)

    monkeypatch.setattr(distill._Teacher, "__call__", counting)
    return calls

