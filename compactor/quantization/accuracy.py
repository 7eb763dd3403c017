"""The accuracy budget of the int8 search, judged on the recipe's metric.

The eval data is split (seeded) into a *search* part, on which candidates and fallbacks are
chosen, and a *held-out* part that must also hold the budget, so the choice is not fitted to
the samples it was made on. Drops are measured against the baseline's outputs on the same
samples (``fidelity`` compares to them) or, for a ``quantize.max_accuracy_drop``, against
the pass's float input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactor.data import Batch, Outputs, PerBatch, outputs_of
from compactor.metrics import Metric


@dataclass(frozen=True)
class Budget:
    """The largest allowed drop, in metric units, and where it comes from."""

    allowed: float
    source: str  # quantize.max_accuracy_drop | targets[i] (<profile>) | default
    text: str  # as written: 0.01 or "2%"
    relative_to: str  # "input" (the float model quantize got) or "baseline" (stage 0)
    enforced: bool = True  # a default guard steers the search but fails nothing

    def to_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "source": self.source, "as_written": self.text,
                "relative_to": self.relative_to, "enforced": self.enforced}


@dataclass(frozen=True)
class Score:
    value: float
    drop: float
    ok: bool
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": round(self.value, 6), "drop": round(self.drop, 6), "ok": self.ok,
                "samples": self.samples}


@dataclass
class Part:
    """Some eval samples: inputs re-batched, targets, and reference outputs."""

    name: str
    index: np.ndarray
    batches: list[Batch]
    targets: PerBatch | None
    reference: Outputs | None = None  # the metric's reference (baseline) outputs, all
    ref_value: float = 0.0  # the value the drop is measured from

    @property
    def samples(self) -> int:
        return int(len(self.index))


def _split(batches: Sequence[Batch], parts: dict[str, np.ndarray]
           ) -> dict[str, list[Batch]]:
    """Each part's samples (global indices, in order) as batches: the rows of each eval
    batch that belong to the part, so batches of different shapes stay apart."""
    out: dict[str, list[Batch]] = {k: [] for k in parts}
    member = {}
    for k, idx in parts.items():
        for i in idx:
            member[int(i)] = k
    start = 0
    for b in batches:
        rows = np.arange(start, start + b.size)
        for k in parts:
            sel = np.array([r - start for r in rows if member.get(int(r)) == k], dtype=int)
            if len(sel):
                out[k].append(b.rows(sel))
        start += b.size
    return out


def _targets(batches: Sequence[Batch]) -> PerBatch | None:
    if batches and all(b.target is not None for b in batches):
        return PerBatch.of(b.target for b in batches)
    return None


def run_per_batch(path: Path, batches: Sequence[Batch]) -> PerBatch:
    """The first output of ``path`` on each of ``batches``."""
    from compactor.measure.latency import session

    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    return PerBatch.of(
        sess.run(None, {k: v for k, v in b.inputs.items() if k in names})[0] for b in batches)


def run_all(path: Path, batches: Sequence[Batch], names: Sequence[str] | None = None
            ) -> Outputs:
    """Every output of ``path`` on each of ``batches`` (under ``names``, the reference's,
    when given: an output renamed by a tool is still the same output, in the same order)."""
    from compactor.measure.latency import session

    sess = session(path)
    feeds = {i.name for i in sess.get_inputs()}
    own = [o.name for o in sess.get_outputs()]
    if names is not None and len(names) == len(own):
        own = list(names)
    return Outputs.of(own, (sess.run(None, {k: v for k, v in b.inputs.items() if k in feeds})
                            for b in batches))


def run_outputs(path: Path, batches: Sequence[Batch]) -> np.ndarray:
    """The first output of ``path`` on ``batches``, concatenated; batches of different
    per-sample shapes (padded to their own length) give every value in one vector, which
    still compares element by element with another model's on the same batches."""
    return run_per_batch(path, batches).flat()


class AccuracyJudge:
    """Scores a model on the search or held-out part against a :class:`Budget`."""

    def __init__(self, metric: Metric, eval_batches: Sequence[Batch], input_model: Path,
                 budget_fn, baseline_outputs: Outputs | PerBatch | None,
                 holdout_fraction: float, seed: int,
                 input_outputs: Outputs | PerBatch | None = None):
        """``budget_fn(reference_value_on_all_eval) -> Budget``: relative budgets need the
        value they are relative to, which is known only once the reference is measured.
        ``input_outputs``: the input model's eval outputs when already at hand (the
        pipeline evaluated it); else the model is run here. Every output the metric names
        is scored (a bare PerBatch is the first output alone)."""
        self.metric = metric
        n = sum(b.size for b in eval_batches)
        order = np.random.default_rng(seed).permutation(n)
        n_hold = int(round(n * holdout_fraction)) if n >= 4 else 0
        n_hold = min(max(n_hold, 1 if n >= 4 else 0), n - 1)
        split = {"search": np.sort(order[: n - n_hold]), "held-out": np.sort(order[n - n_hold:])}
        split = {k: v for k, v in split.items() if len(v)}
        batches = _split(eval_batches, split)
        targets = _targets(eval_batches)
        self.parts = {
            k: Part(k, idx, batches[k], None if targets is None else targets.take(idx))
            for k, idx in split.items()
        }
        # The input model's outputs: the reference when the baseline's are not at hand.
        sizes = tuple(b.size for b in eval_batches)
        baseline_outputs = None if baseline_outputs is None else outputs_of(baseline_outputs)
        names = None if baseline_outputs is None else baseline_outputs.names
        if input_outputs is not None:
            input_outputs = outputs_of(input_outputs)
        if (input_outputs is None or input_outputs.sizes != sizes
                or (names is not None and len(input_outputs.names) != len(names))):
            input_outputs = run_all(input_model, eval_batches, names)
        if (names is not None and input_outputs.names != names
                and len(input_outputs.names) == len(names)):
            input_outputs = Outputs(names, input_outputs.values)
        self.input_outputs = input_outputs
        reference = baseline_outputs if baseline_outputs is not None else self.input_outputs
        if reference.sizes != sizes:
            reference = self.input_outputs
        self.reference = reference
        probe = budget_fn(0.0)
        from_input = probe.relative_to == "input" or baseline_outputs is None
        source = self.input_outputs if from_input else reference
        full_value = metric.score(source, targets, reference)
        self.budget: Budget = budget_fn(full_value)
        self.reference_value = full_value
        for p in self.parts.values():
            p.reference = reference.take(p.index)
            p.ref_value = metric.score(source.take(p.index), p.targets, p.reference)

    @property
    def has_holdout(self) -> bool:
        return "held-out" in self.parts

    def score(self, path: Path, part: str = "search") -> Score:
        p = self.parts[part]
        out = run_all(path, p.batches, self.reference.names)
        value = self.metric.score(out, p.targets, p.reference)
        drop = self.metric.drop(p.ref_value, value)
        return Score(value, drop, drop <= self.budget.allowed + 1e-12, p.samples)

    def search_batches(self, max_samples: int | None = None) -> list[Batch]:
        """Search-part batches (for sensitivity analysis; never held-out samples)."""
        batches = self.parts["search"].batches
        if max_samples is None:
            return batches
        out, seen = [], 0
        for b in batches:
            if seen >= max_samples:
                break
            keep = min(b.size, max_samples - seen)
            out.append(b.head(keep))
            seen += keep
        return out
