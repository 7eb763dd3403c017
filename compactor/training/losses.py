"""Distillation losses: soft targets (KL), labels (CE), outputs (MSE, normalised MSE, cosine),
feature hints.

Each output loss compares one student output tensor to the teacher's. ``DistillLoss``
combines them with weights, over every output a model has (``HeadLoss``: which output, which
loss, what weight), and returns the total and each weighted part, so the progress line and
the stage record show what each output learns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("kl", "ce", "mse", "cosine")
TEACHER_LOSSES = ("kl", "mse", "cosine")
# what one output can be trained with (ce: on the data's labels, the labelled output only)
HEAD_LOSSES = ("kl", "ce", "mse", "nmse", "cosine")
# a teacher output whose variance is below this is treated as constant by ``nmse``
MIN_VARIANCE = 1e-12


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher ‖ student) of the softmax at temperature T,
    scaled by T² so its gradients keep their size as T changes.

    The class axis is the last one; every other axis counts as a sample (so token-level
    logits of shape (batch, tokens, vocab) work too).
    """
    t = temperature
    s = student.reshape(-1, student.shape[-1]).float() / t
    q = teacher.reshape(-1, teacher.shape[-1]).float() / t
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(q, dim=-1), reduction="batchmean",
                    log_target=True) * (t * t)


def ce_loss(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class labels (or one-hot / soft label rows)."""
    logits = student.reshape(student.shape[0], -1).float()
    if labels.ndim == 2 and labels.shape[1] == logits.shape[1] and labels.shape[1] > 1:
        labels = labels.float()
        return -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits, labels.reshape(-1).long())


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def nmse_loss(student: torch.Tensor, teacher: torch.Tensor, variance: float) -> torch.Tensor:
    """MSE divided by the teacher's variance of this output (over the training data): free
    of the output's units, so a head in pixels and one in probabilities weigh alike. 1.0 is
    what predicting the teacher's mean (a constant) scores; 0 is the teacher itself."""
    return F.mse_loss(student.float(), teacher.float()) / max(float(variance), MIN_VARIANCE)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each sample's output to the teacher's, averaged."""
    s = student.reshape(student.shape[0], -1).float()
    t = teacher.reshape(teacher.shape[0], -1).float()
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def hint_loss(student: torch.Tensor, teacher: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """A feature hint: MSE between a (projected) student feature and the teacher's.

    ``mask`` (batch, positions), nonzero where a position is real: features of shape
    (batch, positions, ...) are averaged over the real positions only, so padding (whose
    hidden states the model's output never uses) neither adds to the loss nor dilutes it."""
    if mask is None:
        return F.mse_loss(student.float(), teacher.float())
    if tuple(mask.shape) != tuple(student.shape[:mask.ndim]):
        raise ValueError(f"a hint mask of shape {list(mask.shape)} does not fit features of "
                         f"shape {list(student.shape)}")
    keep = (mask != 0).reshape(*mask.shape, *([1] * (student.ndim - mask.ndim)))
    sq = (student.float() - teacher.float()).square() * keep
    per_position = math.prod(student.shape[mask.ndim:])
    return sq.sum() / (keep.sum() * per_position).clamp(min=1)


def make_projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module | None:
    """A learned map from the student feature's width to the teacher's, or None when they
    already match. Channels-first 4-D/3-D maps (conv features) get a 1×1 convolution;
    anything else (linear or transformer features) a linear layer on the last axis.

    Raises ValueError when the features differ in more than their width."""
    if student.shape == teacher.shape:
        return None
    if student.ndim != teacher.ndim or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student feature {list(student.shape)} and teacher feature "
                         f"{list(teacher.shape)} differ in more than their width")
    if student.ndim in (3, 4) and _conv_like(student, teacher):
        conv = nn.Conv2d if student.ndim == 4 else nn.Conv1d
        return conv(student.shape[1], teacher.shape[1], kernel_size=1, bias=False)
    if student.shape[:-1] == teacher.shape[:-1]:
        return nn.Linear(student.shape[-1], teacher.shape[-1], bias=False)
    raise ValueError(f"student feature {list(student.shape)} and teacher feature "
                     f"{list(teacher.shape)} differ in more than their width")


def _conv_like(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Channels-first features whose spatial axes match (the width is axis 1)."""
    return student.shape[2:] == teacher.shape[2:] and student.shape[1] != teacher.shape[1]


@dataclass(frozen=True)
class LossWeights:
    """Weights of each loss on the first (labelled) output; a weight of 0 leaves it out."""

    kl: float = 0.0
    ce: float = 0.0
    mse: float = 0.0
    cosine: float = 0.0

    @classmethod
    def from_mapping(cls, weights: Mapping[str, float]) -> LossWeights:
        return cls(**{k: float(v) for k, v in weights.items()})

    def active(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in LOSSES if getattr(self, k) > 0}

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(self, k) > 0 for k in TEACHER_LOSSES)

    def heads(self, temperature: float, index: int = 0, name: str = "") -> list[HeadLoss]:
        """These weights as loss terms on output ``index``."""
        return [HeadLoss(index, name, k, w, temperature) for k, w in self.active().items()]


@dataclass(frozen=True)
class HeadLoss:
    """One loss term on one output: the output's position among the model's outputs, its
    name (the prefix of its loss part; empty for a model with one output), the loss, its
    weight, the temperature (``kl``) and the teacher's variance of the output (``nmse``)."""

    index: int
    name: str
    kind: str
    weight: float
    temperature: float = 4.0
    variance: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in HEAD_LOSSES:
            raise ValueError(f"unknown loss {self.kind!r}; one of {', '.join(HEAD_LOSSES)}")

    @property
    def part(self) -> str:
        """The name of this term among the loss parts: ``kl``, or ``boxes.nmse``."""
        return f"{self.name}.{self.kind}" if self.name else self.kind

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce" and self.weight > 0

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor | None,
                 labels: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "ce":
            if labels is None:
                raise ValueError("the 'ce' loss needs labels and this batch has none")
            return ce_loss(student, labels)
        if teacher is None:
            raise ValueError(f"the {self.part!r} loss needs the teacher's output")
        if self.kind == "kl":
            return kl_loss(student, teacher, self.temperature)
        if self.kind == "mse":
            return mse_loss(student, teacher)
        if self.kind == "nmse":
            return nmse_loss(student, teacher, self.variance)
        return cosine_loss(student, teacher)


Outputs = torch.Tensor | Sequence[torch.Tensor]


def _as_tuple(outputs: Outputs | None) -> tuple[torch.Tensor, ...] | None:
    if outputs is None:
        return None
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


class DistillLoss:
    """The weighted sum of the output losses and the feature hints.

    ``weights`` (with ``temperature``) are terms on the first output, as a one-output model
    has them; ``heads`` add terms on any output. Student and teacher outputs are given as
    one tensor (the first output) or as the sequence of every output, in the model's order.
    """

    def __init__(self, weights: LossWeights | None = None, temperature: float = 4.0,
                 hint_weights: Sequence[float] = (), heads: Sequence[HeadLoss] = ()):
        self.temperature = temperature
        self.hint_weights = tuple(hint_weights)
        first = weights.heads(temperature) if weights is not None else []
        self.heads = tuple(h for h in (*first, *heads) if h.weight > 0)
        parts = [h.part for h in self.heads]
        if len(set(parts)) != len(parts):
            raise ValueError(f"loss terms repeat: {parts}")

    @property
    def needs_teacher(self) -> bool:
        return any(h.needs_teacher for h in self.heads)

    @property
    def needs_labels(self) -> bool:
        return any(h.kind == "ce" for h in self.heads)

    def without_labels(self) -> DistillLoss:
        """The same terms less those on labels (for data that has none)."""
        return DistillLoss(None, self.temperature, self.hint_weights,
                           [h for h in self.heads if h.kind != "ce"])

    def __call__(
        self,
        student: Outputs,
        teacher: Outputs | None,
        labels: torch.Tensor | None,
        student_features: Sequence[torch.Tensor] = (),
        teacher_features: Sequence[torch.Tensor] = (),
        hint_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s_outs, t_outs = _as_tuple(student), _as_tuple(teacher)
        parts: dict[str, torch.Tensor] = {}
        for h in self.heads:
            t = None if t_outs is None or h.kind == "ce" else t_outs[h.index]
            parts[h.part] = h.weight * h(s_outs[h.index], t, labels)
        hints = zip(self.hint_weights, student_features, teacher_features, strict=False)
        for i, (hw, s, t) in enumerate(hints):
            parts[f"hint{i}"] = hw * hint_loss(s, t, hint_mask)
        total = sum(parts.values()) if parts else s_outs[0].new_zeros(())
        return total, parts
