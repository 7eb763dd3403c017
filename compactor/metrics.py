"""Metrics computed on a stage's outputs over the eval data.

Built in: ``accuracy`` and ``top5`` (labels needed), ``mse`` (targets needed, lower is
better) and ``fidelity`` (mean cosine similarity of each sample's output to the baseline
model's output: needs no labels; on outputs of one value per sample, where a cosine is
always ±1, ``1 - mean |output - baseline| / the baseline's spread`` instead, see
:func:`fidelity_caveat` and docs/metrics.md). A user metric is ``module:fn`` taking
``(outputs, targets)`` as numpy arrays and returning a float; set ``fn.higher_is_better =
False`` on it for a loss-like metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compactor._imports import resolve_callable
from compactor.data import PerBatch
from compactor.errors import DataError, RecipeError


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    needs_targets: bool
    needs_reference: bool
    fn: Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], float]

    def compute(
        self, outputs: np.ndarray, targets: np.ndarray | None, reference: np.ndarray | None
    ) -> float:
        if self.needs_targets and targets is None:
            raise DataError(
                f"metric {self.name!r} needs labels, but the eval data has no targets",
                "yield (inputs, target) batches, or use 'metric: fidelity', which needs none",
            )
        value = float(self.fn(outputs, targets, reference))
        if not np.isfinite(value):
            raise DataError(
                f"metric {self.name!r} is {value} on this model's outputs",
                "the model produced NaN/inf on the eval data; check the data and the weights",
            )
        return value

    def score(self, outputs: PerBatch, targets: PerBatch | None,
              reference: PerBatch | None) -> float:
        """The metric over per-batch outputs: on them joined when every batch has the same
        per-sample shape (exactly :meth:`compute`), else batch by batch, each value weighted
        by its batch's samples (batches padded to their own length)."""
        given = [p for p in (outputs, targets, reference) if p is not None]
        if all(p.uniform for p in given):
            return self.compute(outputs.joined(), None if targets is None else targets.joined(),
                                None if reference is None else reference.joined())
        if any(p.sizes != outputs.sizes for p in given):
            raise DataError(
                f"metric {self.name!r}: outputs, targets and reference are batched differently",
                "yield the same batches (in the same order) for every stage",
            )
        total = 0.0
        for i, n in enumerate(outputs.sizes):
            total += n * self.compute(
                outputs.parts[i], None if targets is None else targets.parts[i],
                None if reference is None else reference.parts[i])
        return total / max(len(outputs), 1)

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse)."""
        return baseline - value if self.higher_is_better else value - baseline


def _labels(targets: np.ndarray, n: int) -> np.ndarray:
    t = np.asarray(targets)
    if t.ndim == 2 and t.shape[1] > 1:
        t = t.argmax(axis=1)
    t = t.reshape(-1)
    if t.shape[0] != n:
        raise DataError(
            f"eval targets have {t.shape[0]} labels for {n} outputs",
            "each sample needs one class label (or a one-hot row)",
        )
    return t.astype(np.int64)


def _logits(outputs: np.ndarray) -> np.ndarray:
    out = np.asarray(outputs)
    if out.ndim == 1:
        raise DataError(
            "classification metrics need (batch, classes) outputs; the model outputs 1-D",
            "use 'mse' or a custom metric for this model",
        )
    return out.reshape(out.shape[0], -1)


def _accuracy(outputs, targets, _ref) -> float:
    logits = _logits(outputs)
    return float((logits.argmax(axis=1) == _labels(targets, logits.shape[0])).mean())


def _top5(outputs, targets, _ref) -> float:
    logits = _logits(outputs)
    labels = _labels(targets, logits.shape[0])
    k = min(5, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def _mse(outputs, targets, _ref) -> float:
    out = np.asarray(outputs, dtype=np.float64)
    tgt = np.asarray(targets, dtype=np.float64)
    if out.size != tgt.size:
        raise DataError(
            f"mse: outputs have {out.size} values, targets {tgt.size}",
            "targets must have the model output's shape",
        )
    return float(np.mean((out.reshape(-1) - tgt.reshape(-1)) ** 2))


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1)
    b = np.asarray(b, dtype=np.float64).reshape(b.shape[0], -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    out = np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))
    return out


def _fidelity(outputs, _targets, reference) -> float:
    if np.shape(outputs) != np.shape(reference):
        raise DataError(
            f"fidelity: outputs have shape {np.shape(outputs)}, the baseline's "
            f"{np.shape(reference)}",
            "a stage must keep the baseline's output shape",
        )
    out, ref = np.asarray(outputs), np.asarray(reference)
    if out.ndim == 0 or out.size <= out.shape[0]:  # one value per sample: cosine is ±1
        return spread_agreement(out, ref)
    return float(cosine_per_sample(outputs, reference).mean())


def spread_agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """``1 - mean |outputs - reference| / spread``, the spread being the reference's mean
    absolute deviation from its own mean (so the reference scores 1 and predicting its mean
    for every sample scores about 0), floored at -1. A constant reference is measured
    against its mean magnitude instead (or in absolute units when that is 0)."""
    out = np.asarray(outputs, dtype=np.float64).reshape(-1)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    err = float(np.mean(np.abs(out - ref))) if ref.size else 0.0
    spread = float(np.mean(np.abs(ref - ref.mean()))) if ref.size else 0.0
    if spread <= 0:
        spread = float(np.mean(np.abs(ref))) if ref.size else 0.0
    if spread <= 0:
        spread = 1.0
    return max(1.0 - err / spread, -1.0)


def fidelity_caveat(reference: PerBatch) -> str | None:
    """Why per-sample cosine fidelity cannot be trusted on this (baseline) output, or None:
    one value per sample (the cosine of two 1-element vectors is always ±1; fidelity falls
    back to :func:`spread_agreement` there) or the same output for every eval sample (the
    metric cannot tell a model that still responds to its input from one that does not)."""
    parts = [np.asarray(p) for p in reference.parts]
    if not parts:
        return None
    if all(p.ndim <= 1 or int(np.prod(p.shape[1:])) <= 1 for p in parts):
        return ("one value per sample, where a cosine is always 1; fidelity is measured "
                "as 1 - mean abs error / the baseline's spread instead, which does not "
                "know which errors matter (a decision threshold, say)")
    if reference.uniform and len(reference) >= 2:
        flat = reference.joined().reshape(len(reference), -1)
        constant = bool(np.all(flat == flat[:1]))
    else:
        constant = False
    if constant:
        return ("the same value for every eval sample, so fidelity cannot tell whether "
                "the model still responds to its input")
    return None


BUILTIN = {
    "accuracy": Metric("accuracy", True, True, False, _accuracy),
    "top5": Metric("top5", True, True, False, _top5),
    "mse": Metric("mse", False, True, False, _mse),
    "fidelity": Metric("fidelity", True, False, True, _fidelity),
}


def get_metric(ref: str, base_dir: Path) -> Metric:
    if ref in BUILTIN:
        return BUILTIN[ref]
    fn, _ = resolve_callable(ref, base_dir, RecipeError, "metric")
    higher = bool(getattr(fn, "higher_is_better", True))
    return Metric(ref, higher, False, False, lambda o, t, _r: fn(o, t))
