"""A three-head toy: one torch model with outputs of three kinds, like a face detector's.

- ``logits`` (batch, 4): class scores
- ``box`` (batch, 4): a box in pixels (0-160), a regression in large units
- ``landmarks`` (batch, 5, 2): five points in [0, 1], a regression in small units

The teacher is a wider net with fixed weights; the student is a narrower one (what pruning
leaves), untrained. Recipes name these functions by path (``ref_multihead("build_student")``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

MULTIHEAD = Path(__file__).resolve()
FEATURES = 16
CLASSES = 4
LANDMARKS = 5
OUTPUTS = ("logits", "box", "landmarks")
INPUT = {"name": "x", "shape": ["batch", FEATURES], "dtype": "float32"}


def ref_multihead(fn: str) -> str:
    """A recipe reference to a function of this file, by absolute path."""
    return f"{MULTIHEAD}:{fn}"


class ThreeHeads(nn.Module):
    """A shared trunk and three heads; returns (logits, box, landmarks)."""

    def __init__(self, width: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, width), nn.Tanh(),
                                   nn.Linear(width, width), nn.Tanh())
        self.cls = nn.Linear(width, CLASSES)
        self.box = nn.Linear(width, 4)
        self.points = nn.Linear(width, LANDMARKS * 2)

    def forward(self, x):
        h = self.trunk(x)
        box = 160.0 * torch.sigmoid(self.box(h))
        points = torch.sigmoid(self.points(h)).reshape(-1, LANDMARKS, 2)
        return self.cls(h), box, points


class DictHeads(ThreeHeads):
    """The same heads returned as a dict (Hugging Face style)."""

    def forward(self, x):
        logits, box, points = super().forward(x)
        return {"logits": logits, "box": box, "landmarks": points}


def build_teacher() -> ThreeHeads:
    torch.manual_seed(7)
    model = ThreeHeads(64)
    with torch.no_grad():  # sharper heads than a fresh init: outputs that vary with x
        for head in (model.cls, model.box, model.points):
            head.weight.mul_(4.0)
    return model.eval()


def build_student() -> ThreeHeads:
    torch.manual_seed(11)
    return ThreeHeads(24).eval()


def build_dict_student() -> DictHeads:
    torch.manual_seed(11)
    return DictHeads(24).eval()


def build_one_head() -> nn.Module:
    """A student with a single output (for a teacher with three)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES)).eval()


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def train_batches() -> list[tuple]:
    """Label-free training batches: 12 of 32 inputs."""
    return [(_inputs(32, 100 + i),) for i in range(12)]


def eval_batches() -> list[tuple]:
    """Held-out inputs: 3 batches of 64."""
    return [(_inputs(64, 200 + i),) for i in range(3)]


def head_errors(student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    """Each head's mean squared error to the teacher over the teacher's variance of it, on
    the eval batches (1.0: no better than the teacher's mean, a constant)."""
    x = torch.from_numpy(np.concatenate([b[0] for b in eval_batches()]))
    with torch.inference_mode():
        s, t = _tuple(student(x)), _tuple(teacher(x))
    return {name: float(((a - b) ** 2).mean() / b.var(unbiased=False))
            for name, a, b in zip(OUTPUTS, s, t, strict=True)}


def _tuple(out) -> tuple:
    return tuple(out.values()) if isinstance(out, dict) else tuple(out)
