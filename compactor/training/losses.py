"""Distillation losses: soft targets (KL), labels (CE), outputs (MSE, cosine), feature hints.

Every loss takes the student's and the teacher's first output tensor (the one the recipe's
metric is computed on). ``DistillLoss`` combines them with weights and returns the total and
each weighted part, so the progress line and the stage record can show what is learned.
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
    """Weights of each loss; a weight of 0 leaves the loss out."""

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


class DistillLoss:
    """The weighted sum of the output losses and the feature hints."""

    def __init__(self, weights: LossWeights, temperature: float = 4.0,
                 hint_weights: Sequence[float] = ()):
        self.weights = weights
        self.temperature = temperature
        self.hint_weights = tuple(hint_weights)

    def __call__(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        labels: torch.Tensor | None,
        student_features: Sequence[torch.Tensor] = (),
        teacher_features: Sequence[torch.Tensor] = (),
        hint_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        w = self.weights
        if w.kl:
            parts["kl"] = w.kl * kl_loss(student, teacher, self.temperature)
        if w.ce:
            if labels is None:
                raise ValueError("the 'ce' loss needs labels and this batch has none")
            parts["ce"] = w.ce * ce_loss(student, labels)
        if w.mse:
            parts["mse"] = w.mse * mse_loss(student, teacher)
        if w.cosine:
            parts["cosine"] = w.cosine * cosine_loss(student, teacher)
        hints = zip(self.hint_weights, student_features, teacher_features, strict=False)
        for i, (hw, s, t) in enumerate(hints):
            parts[f"hint{i}"] = hw * hint_loss(s, t, hint_mask)
        total = sum(parts.values()) if parts else student.new_zeros(())
        return total, parts
