"""Metrics computed on a stage's outputs over the eval data.

A :class:`Metric` is the recipe's ``metric``: which :class:`OutputMetric` scores which of the
model's outputs, and how the per-output values make one figure (the worst scored output).
By default a metric compared to the baseline (``fidelity`` and the task metrics
``agreement``, ``topk_agreement``, ``detection_agreement``) scores every output; a metric
needing labels (``accuracy``, ``top5``, ``mse``) or a user's ``module:fn`` scores the first
output, the one the labels describe.

Built in, per output: ``accuracy`` and ``top5`` (labels needed), ``mse`` (targets needed,
lower is better), ``fidelity`` (mean cosine similarity of each sample's output to the
baseline's; per channel group where one tensor mixes units, the worst group; on one value
per sample ``1 - mean |output - baseline| / the baseline's spread``, see
:func:`fidelity_caveat` and docs/metrics.md), ``agreement`` (thresholded or argmax decisions
equal to the baseline's), ``topk_agreement`` (the baseline's top-1 among the stage's top k)
and ``detection_agreement`` (F1 of boxes matched to the baseline's at an IoU). A user metric
is ``module:fn`` taking ``(outputs, targets)`` as numpy arrays and returning a float; set
``fn.higher_is_better = False`` on it for a loss-like metric.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactor._imports import resolve_callable
from compactor.data import Outputs, PerBatch, outputs_of
from compactor.errors import DataError, RecipeError

ShapeCheck = Callable[[tuple[int, ...]], "str | None"]


@dataclass(frozen=True)
class OutputMetric:
    """One metric on one output: ``fn(outputs, targets, reference) -> float``."""

    name: str
    higher_is_better: bool
    needs_targets: bool
    needs_reference: bool
    fn: Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], float]
    # what is wrong with an output of this per-batch shape for the metric (None: fine)
    shape_problem: ShapeCheck | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in self.params.items()) + ")"

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


@dataclass(frozen=True)
class OutputScore:
    """One output's value under its metric."""

    output: str
    metric: str
    value: float
    higher_is_better: bool


@dataclass(frozen=True)
class Metric:
    """The recipe's metric over a model's outputs: ``assigned`` are the outputs the recipe
    names, each with its metric; ``default`` scores every other output (None: only the named
    ones). :meth:`score` is the worst scored output's value."""

    name: str
    higher_is_better: bool
    needs_targets: bool
    needs_reference: bool
    assigned: tuple[tuple[str, OutputMetric], ...] = ()
    default: OutputMetric | None = None

    @classmethod
    def one(cls, m: OutputMetric) -> Metric:
        return cls(m.label, m.higher_is_better, m.needs_targets, m.needs_reference, (), m)

    def plan(self, names: Sequence[str],
             shapes: Mapping[str, tuple[tuple[int, ...], ...]] | None = None
             ) -> tuple[tuple[str, OutputMetric], ...]:
        """Which metric scores which of the model's outputs ``names`` (RecipeError, exit 2:
        an output that does not exist, or a task metric on an output of the wrong shape)."""
        for out, _m in self.assigned:
            if out not in names:
                close = difflib.get_close_matches(out, list(names), n=1)
                raise RecipeError(
                    f"metric: the model has no output named {out!r} (it has "
                    f"{', '.join(repr(n) for n in names)})",
                    (f"did you mean {close[0]!r}? " if close else "")
                    + "name outputs as `compactor inspect MODEL` lists them")
        plan = list(self.assigned)
        if self.default is not None:
            named = {o for o, _ in self.assigned}
            rest = [n for n in names if n not in named]
            if not self.default.needs_reference:  # labels (or a user fn) describe one output
                rest = rest[:1]
            plan += [(n, self.default) for n in rest]
        for out, m in plan:
            for shape in (shapes or {}).get(out, ()):
                problem = m.shape_problem(shape) if m.shape_problem else None
                if problem:
                    raise RecipeError(
                        f"metric {m.name!r} cannot score output {out!r} of shape "
                        f"{list(shape)}: {problem}",
                        "choose a metric for that output's shape in metric.outputs "
                        "(see docs/metrics.md)")
        return tuple(plan)

    def score_outputs(self, outputs: Outputs, targets: PerBatch | None,
                      reference: Outputs | None) -> tuple[OutputScore, ...]:
        plan = self.plan(outputs.names)
        return tuple(
            OutputScore(name, m.label,
                        m.score(outputs[name], targets,
                                None if reference is None else reference[name]),
                        m.higher_is_better)
            for name, m in plan)

    def aggregate(self, scores: Sequence[OutputScore]) -> float:
        values = [s.value for s in scores]
        return min(values) if self.higher_is_better else max(values)

    @property
    def first(self) -> OutputMetric:
        """The metric of the first output the recipe names (or the default)."""
        m = self.assigned[0][1] if self.assigned else self.default
        if m is None:
            raise ValueError("a Metric scores at least one output")
        return m

    @property
    def fn(self) -> Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], float]:
        """:attr:`first`'s function."""
        return self.first.fn

    def compute(self, outputs: np.ndarray, targets: np.ndarray | None,
                reference: np.ndarray | None) -> float:
        """:meth:`OutputMetric.compute` of :attr:`first` on one output's arrays."""
        return self.first.compute(outputs, targets, reference)

    def score(self, outputs: PerBatch | Outputs, targets: PerBatch | None,
              reference: PerBatch | Outputs | None) -> float:
        """The worst scored output's value. A bare :class:`PerBatch` is the model's first
        output, scored with :attr:`first`."""
        if isinstance(outputs, PerBatch):
            ref = reference.first if isinstance(reference, Outputs) else reference
            return self.first.score(outputs, targets, ref)
        ref = None if reference is None else outputs_of(reference)
        return self.aggregate(self.score_outputs(outputs, targets, ref))

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse)."""
        return baseline - value if self.higher_is_better else value - baseline


# --------------------------------------------------------------------------- labels


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


# --------------------------------------------------------------------------- fidelity


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1)
    b = np.asarray(b, dtype=np.float64).reshape(b.shape[0], -1)
    num = (a * b).sum(axis=1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    den = na * nb
    # two zero vectors agree; a zero vector beside a non-zero one (scores collapsed to
    # 0 by int8) does not
    both_zero = (na == 0) & (nb == 0)
    return np.where(den == 0, np.where(both_zero, 1.0, 0.0), num / np.where(den == 0, 1.0, den))


# channels whose largest magnitudes differ by this much are in different units
MIXED_UNITS_RATIO = 100.0
# sorted channel magnitudes jumping by more than this start a new group
GROUP_GAP = 10.0
MAX_CHANNELS = 1024


@dataclass(frozen=True)
class ChannelGroups:
    """A tensor mixing units along ``axis``: its channels grouped by magnitude."""

    axis: int
    groups: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]  # each group's largest magnitude

    def describe(self) -> str:
        parts = [f"{_span(g)} (|x| up to {s:.3g})" for g, s in zip(self.groups, self.scales)]
        return f"axis {self.axis}: channels " + "; ".join(parts)


def _span(g: Sequence[int]) -> str:
    if list(g) == list(range(g[0], g[-1] + 1)):
        return f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}"
    return ",".join(str(i) for i in g[:8]) + ("…" if len(g) > 8 else "")


def mixed_units(reference: np.ndarray) -> ChannelGroups | None:
    """Where a detector-head-like ``[B, C, N]`` / ``[B, N, C]`` tensor holds values of very
    different scale along its channel axis (the shorter of axes 1 and 2: ``[B, 4+C, N]``
    pixels beside scores), its channel groups:
    channels sorted by largest magnitude, split where it jumps by more than ``GROUP_GAP``.
    None when every channel has about the same scale (under ``MIXED_UNITS_RATIO`` apart)."""
    ref = np.asarray(reference, dtype=np.float64)
    # Only a detector head's layout, [B, C, N] or [B, N, C] (channels: the shorter axis).
    # Not [B, F] features nor [B, C, H, W] maps, whose nearly dead ReLU channels would
    # make groups of noise; not values within ±1 (probabilities, scores): one unit.
    if ref.ndim != 3 or not ref.size or float(np.abs(ref).max()) <= 1.0:
        return None
    for axis in (1 if ref.shape[1] <= ref.shape[2] else 2,):
        c = ref.shape[axis]
        if not 2 <= c <= MAX_CHANNELS:
            continue
        other = tuple(a for a in range(ref.ndim) if a != axis)
        scale = np.abs(ref).max(axis=other)
        live = scale[scale > 0]
        if len(live) < 2 or live.max() / live.min() < MIXED_UNITS_RATIO:
            continue
        order = np.argsort(scale)
        groups, cur = [], [int(order[0])]
        for prev, i in zip(order[:-1], order[1:]):
            lo = max(scale[prev], 1e-300)
            if scale[i] / lo > GROUP_GAP:
                groups.append(cur)
                cur = []
            cur.append(int(i))
        groups.append(cur)
        groups = [sorted(g) for g in groups]
        groups.sort(key=lambda g: g[0])
        return ChannelGroups(axis, tuple(tuple(g) for g in groups),
                             tuple(float(scale[g].max()) for g in groups))
    return None


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
    mixed = mixed_units(ref)
    if mixed is None:
        return float(cosine_per_sample(out, ref).mean())
    # each unit group on its own: one cosine would be the large values' alone
    return min(float(cosine_per_sample(np.take(out, g, axis=mixed.axis),
                                       np.take(ref, g, axis=mixed.axis)).mean())
               for g in mixed.groups)


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
    """Why fidelity cannot be trusted on this (baseline) output, or None: one value per
    sample (the cosine of two 1-element vectors is always ±1; fidelity falls back to
    :func:`spread_agreement` there) or the same output for every eval sample (the metric
    cannot tell a model that still responds to its input from one that does not)."""
    parts = [np.asarray(p) for p in reference.parts]
    if not parts:
        return None
    if all(p.ndim <= 1 or int(np.prod(p.shape[1:])) <= 1 for p in parts):
        return ("one value per sample, where a cosine is always 1; fidelity is measured "
                "as 1 - mean abs error / the baseline's spread instead, which does not "
                "know which errors matter (a decision threshold, say)")
    if _constant(reference):
        return ("the same value for every eval sample, so fidelity cannot tell whether "
                "the model still responds to its input")
    return None


def _constant(reference: PerBatch) -> bool:
    if not reference.uniform or len(reference) < 2:
        return False
    flat = reference.joined().reshape(len(reference), -1)
    return bool(np.all(flat == flat[:1]))


def mixed_units_note(reference: PerBatch) -> str | None:
    """How fidelity splits this (baseline) output into unit groups, or None."""
    if not reference.uniform:
        return None
    mixed = mixed_units(reference.joined())
    if mixed is None:
        return None
    return ("mixes units in one tensor (" + mixed.describe() + "); fidelity scores each "
            "group on its own and takes the worst")


# --------------------------------------------------------------------------- the baseline's mean


@dataclass(frozen=True)
class ConstantCheck:
    """A stage's error on one output against the baseline's, next to the error of
    predicting the baseline's per-element mean over the eval set for every sample, and the
    ratio's ~95% confidence interval (a bootstrap over the eval samples)."""

    mse: float
    constant_mse: float
    low: float  # the ratio mse / constant_mse: its interval
    high: float
    part: str = ""  # the unit group checked, where the output mixes units

    @property
    def ratio(self) -> float:
        return self.mse / self.constant_mse if self.constant_mse > 0 else float("inf")

    @property
    def status(self) -> str:
        """fail: worse than the constant beyond the eval data's noise; pass: better;
        inconclusive: the interval straddles 1 (as good as a constant, within noise)."""
        if self.low > 1.0:
            return "fail"
        if self.high <= 1.0:
            return "pass"
        return "inconclusive"

    @property
    def broken(self) -> bool:
        return self.status == "fail"


BOOTSTRAP = 1000


def _per_sample(outputs: PerBatch, reference: PerBatch) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's mean squared error to the reference, and the reference's mean squared
    deviation from its per-element mean (a scalar mean where batches differ in shape)."""
    if reference.uniform and outputs.uniform:
        ref = reference.joined().astype(np.float64)
        out = outputs.joined().astype(np.float64)
        if out.shape != ref.shape:
            raise ValueError("shapes differ")
        mean = ref.mean(axis=0, keepdims=True)
        axes = tuple(range(1, ref.ndim))
        return (((out - ref) ** 2).mean(axis=axes) if axes else (out - ref) ** 2,
                ((ref - mean) ** 2).mean(axis=axes) if axes else (ref - mean) ** 2)
    mean = reference.flat().astype(np.float64).mean()
    err, dev = [], []
    for o, r in zip(outputs.parts, reference.parts):
        o, r = o.astype(np.float64), r.astype(np.float64)
        if o.shape != r.shape:
            raise ValueError("shapes differ")
        err.append(((o - r) ** 2).reshape(len(r), -1).mean(axis=1))
        dev.append(((r - mean) ** 2).reshape(len(r), -1).mean(axis=1))
    return np.concatenate(err), np.concatenate(dev)


def constant_predictor_check(outputs: PerBatch, reference: PerBatch, seed: int = 0
                             ) -> ConstantCheck | None:
    """None where the check means nothing: a non-numeric output, different shapes, fewer
    than 2 samples, or a baseline output that (nearly) does not vary over the eval set.
    An output mixing units (see :func:`mixed_units`) is checked per unit group, the worst
    group reported: the pixels' error would otherwise hide the scores'."""
    groups = None
    try:
        if reference.uniform and outputs.uniform and len(reference) >= 2:
            groups = mixed_units(reference.joined())
    except (TypeError, ValueError):
        groups = None
    if groups is not None:
        checks = [_constant_check(
            PerBatch.of([np.take(outputs.joined(), g, axis=groups.axis)]),
            PerBatch.of([np.take(reference.joined(), g, axis=groups.axis)]), seed,
            f"channels {_span(g)} of axis {groups.axis}")
            for g in groups.groups]
        checks = [c for c in checks if c is not None]
        return max(checks, key=lambda c: (c.low, c.ratio)) if checks else None
    return _constant_check(outputs, reference, seed)


def _constant_check(outputs: PerBatch, reference: PerBatch, seed: int, part: str = ""
                    ) -> ConstantCheck | None:
    try:
        err, dev = _per_sample(outputs, reference)
    except (TypeError, ValueError):
        return None
    n = len(err)
    magnitude = float(np.mean(reference.flat().astype(np.float64) ** 2)) if n else 0.0
    constant_mse = float(dev.mean()) if n else 0.0
    if n < 2 or not np.isfinite(constant_mse) or constant_mse <= 1e-12 * max(magnitude, 1e-30):
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))
    boot = err[idx].mean(axis=1) / np.maximum(dev[idx].mean(axis=1), 1e-300)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return ConstantCheck(float(err.mean()), constant_mse, low, high, part)


# --------------------------------------------------------------------------- task metrics


def _same_shape(name: str, outputs, reference) -> tuple[np.ndarray, np.ndarray]:
    out, ref = np.asarray(outputs), np.asarray(reference)
    if out.shape != ref.shape:
        raise DataError(f"{name}: outputs have shape {list(out.shape)}, the baseline's "
                        f"{list(ref.shape)}", "a stage must keep the baseline's output shape")
    return out, ref


def agreement(threshold: float | None = None) -> OutputMetric:
    """Share of decisions equal to the baseline's: ``output > threshold`` element by element
    when a threshold is given or the output has one value per sample (default 0.5), else
    the argmax over the last axis."""

    def fn(outputs, _targets, reference) -> float:
        out, ref = _same_shape("agreement", outputs, reference)
        per_sample = int(np.prod(out.shape[1:])) if out.ndim > 1 else 1
        if threshold is not None or per_sample <= 1:
            t = 0.5 if threshold is None else threshold
            return float(((out > t) == (ref > t)).mean())
        return float((out.argmax(axis=-1) == ref.argmax(axis=-1)).mean())

    def shape_problem(shape: tuple[int, ...]) -> str | None:
        if len(shape) == 0:
            return "a 0-d output has no samples to agree on"
        return None

    return OutputMetric("agreement", True, False, True, fn, shape_problem,
                        {} if threshold is None else {"threshold": threshold})


def topk_agreement(k: int = 5) -> OutputMetric:
    """Share of samples (and positions) whose baseline top-1 class over the last axis is
    among the stage's top ``k``."""

    def fn(outputs, _targets, reference) -> float:
        out, ref = _same_shape("topk_agreement", outputs, reference)
        kk = min(k, out.shape[-1])
        top = np.argpartition(-out, kk - 1, axis=-1)[..., :kk]
        return float((top == ref.argmax(axis=-1)[..., None]).any(axis=-1).mean())

    def shape_problem(shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2 or shape[-1] < 2:
            return "it needs class scores along the last axis ([batch, ..., classes >= 2])"
        return None

    return OutputMetric("topk_agreement", True, False, True, fn, shape_problem, {"k": k})


@dataclass(frozen=True)
class BoxLayout:
    """How a detector head lays out its boxes: ``[B, 4+C, N]`` (``channels_first``, as
    YOLOv8 exports) or ``[B, N, 4+C]`` (``channels_last``); ``auto`` takes the smaller of
    axes 1 and 2 as the channels. The first 4 channels are the box (``xywh``: centre and
    size, or ``xyxy``: corners); the rest are class scores."""

    layout: str = "auto"
    box_format: str = "xywh"

    def split(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``[B, N, 4]`` as corners and scores ``[B, N, C]``."""
        first = self.layout == "channels_first" or (
            self.layout == "auto" and a.shape[1] <= a.shape[2])
        a = np.asarray(a, dtype=np.float64)
        a = np.swapaxes(a, 1, 2) if first else a
        box, scores = a[..., :4], a[..., 4:]
        if self.box_format == "xywh":
            xy, wh = box[..., :2], np.abs(box[..., 2:]) / 2
            box = np.concatenate([xy - wh, xy + wh], axis=-1)
        else:  # corners in either order
            box = np.concatenate([np.minimum(box[..., :2], box[..., 2:]),
                                  np.maximum(box[..., :2], box[..., 2:])], axis=-1)
        return box, scores


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4] (corners)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def detections(box: np.ndarray, scores: np.ndarray, score_threshold: float, iou: float,
               max_det: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """One sample's detections after a class-wise greedy NMS: (boxes [k,4], classes [k])."""
    cls = scores.argmax(axis=-1)
    conf = scores.max(axis=-1)
    keep = np.flatnonzero(conf >= score_threshold)
    keep = keep[np.argsort(-conf[keep], kind="stable")][: max_det * 10]
    chosen: list[int] = []
    for c in np.unique(cls[keep]):
        idx = keep[cls[keep] == c]
        while len(idx):
            chosen.append(int(idx[0]))
            if len(idx) == 1:
                break
            over = _iou(box[idx[:1]], box[idx[1:]])[0] >= iou
            idx = idx[1:][~over]
    chosen = sorted(chosen, key=lambda i: -conf[i])[:max_det]
    return box[chosen], cls[chosen]


def _matches(b_box, b_cls, s_box, s_cls, iou: float) -> int:
    """Greedy one-to-one matches of stage detections to baseline ones (same class, IoU)."""
    if not len(b_box) or not len(s_box):
        return 0
    ious = _iou(s_box, b_box)
    ious[s_cls[:, None] != b_cls[None, :]] = 0.0
    used = np.zeros(len(b_box), dtype=bool)
    tp = 0
    for i in range(len(s_box)):
        cand = np.where(~used & (ious[i] >= iou), ious[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= 0:
            used[j] = True
            tp += 1
    return tp


def detection_agreement(iou: float = 0.5, score_threshold: float = 0.25,
                        layout: str = "auto", box_format: str = "xywh") -> OutputMetric:
    """F1 of the stage's detections against the baseline's, a detection matching when the
    class is the same and the boxes overlap at IoU >= ``iou``; detections are the anchors
    whose best class score is >= ``score_threshold``, after class-wise NMS at ``iou``
    (every sample's counts summed: 1.0 when neither model detects anything)."""
    lay = BoxLayout(layout, box_format)

    def fn(outputs, _targets, reference) -> float:
        out, ref = _same_shape("detection_agreement", outputs, reference)
        (sb, ss), (bb, bs) = lay.split(out), lay.split(ref)
        tp = n_base = n_stage = 0
        for i in range(out.shape[0]):
            b_box, b_cls = detections(bb[i], bs[i], score_threshold, iou)
            s_box, s_cls = detections(sb[i], ss[i], score_threshold, iou)
            tp += _matches(b_box, b_cls, s_box, s_cls, iou)
            n_base, n_stage = n_base + len(b_box), n_stage + len(s_box)
        return 1.0 if n_base + n_stage == 0 else 2.0 * tp / (n_base + n_stage)

    def shape_problem(shape: tuple[int, ...]) -> str | None:
        if len(shape) != 3:
            return "it needs a [batch, 4+classes, anchors] or [batch, anchors, 4+classes] output"
        first = layout == "channels_first" or (layout == "auto" and shape[1] <= shape[2])
        if (shape[1] if first else shape[2]) < 5:
            return "it needs at least 5 channels (4 box coordinates and a class score)"
        return None

    return OutputMetric("detection_agreement", True, False, True, fn, shape_problem,
                        {"iou": iou, "score_threshold": score_threshold, "layout": layout,
                         "box_format": box_format})


BUILTIN = {
    "accuracy": OutputMetric("accuracy", True, True, False, _accuracy),
    "top5": OutputMetric("top5", True, True, False, _top5),
    "mse": OutputMetric("mse", False, True, False, _mse),
    "fidelity": OutputMetric("fidelity", True, False, True, _fidelity),
    "agreement": agreement(),
    "topk_agreement": topk_agreement(),
    "detection_agreement": detection_agreement(),
}
TASK_METRICS = {"agreement": agreement, "topk_agreement": topk_agreement,
                "detection_agreement": detection_agreement}


def output_metric(ref: str, params: Mapping[str, Any], base_dir: Path) -> OutputMetric:
    """One output's metric: a built-in (task metrics take their parameters) or module:fn."""
    if ref in TASK_METRICS:
        return TASK_METRICS[ref](**params)
    if ref in BUILTIN:
        return BUILTIN[ref]
    fn, _ = resolve_callable(ref, base_dir, RecipeError, "metric")
    higher = bool(getattr(fn, "higher_is_better", True))
    return OutputMetric(ref, higher, False, False, lambda o, t, _r: fn(o, t))


def get_metric(ref: Any, base_dir: Path) -> Metric:
    """The recipe's ``metric``: a name (``fidelity``, ``module:fn``...) or a
    ``recipe.MetricSpec`` (anything with ``name``, ``params()``, ``outputs``)."""
    if isinstance(ref, str):
        return Metric.one(output_metric(ref, {}, base_dir))
    default = output_metric(ref.name, ref.params(), base_dir) if ref.name else None
    assigned = tuple((out, output_metric(spec.name, spec.params(), base_dir))
                     for out, spec in ref.per_output().items())
    if ref.name and ref.output_list() is not None:
        assigned = tuple((out, default) for out in ref.output_list())
        default = None
    metrics = [m for _, m in assigned] + ([default] if default is not None else [])
    directions = {m.higher_is_better for m in metrics}
    if len(directions) > 1:
        raise RecipeError(
            "metric: the outputs' metrics disagree on direction ("
            + ", ".join(f"{m.name}: {'higher' if m.higher_is_better else 'lower'} is better"
                        for m in metrics) + "), so no worst output can be taken",
            "score every output with metrics where higher is better (or all lower)")
    name = default.label if default is not None and not assigned else ", ".join(
        f"{m.label}[{out}]" for out, m in assigned) + (
        f", {default.label}[others]" if default is not None else "")
    return Metric(name, directions.pop(), any(m.needs_targets for m in metrics),
                  any(m.needs_reference for m in metrics), assigned, default)
