"""How many channels and heads each layer keeps, which ones, and reaching a MACs or
parameter target.

Widths are decided here, not by Torch-Pruning's own pruner, so that every layer ends at an
exact, predictable width: ``amount`` of its channels removed (rounded to a multiple of
``round_to``, never below one multiple), and never a layer emptied. Torch-Pruning's
dependency graph (``graph.py``) says which channels go together and removes them.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from compactor.errors import PassError
from compactor.pruning.attention import AttentionBlock, find_attention, split_multihead_attention
from compactor.pruning.count import count_macs, count_params
from compactor.pruning.graph import (
    LayerError,
    PruningGraph,
    Unit,
    make_importance,
    run_tracked,
)

log = logging.getLogger(__name__)

Gradients = Callable[[nn.Module], None]


class EmptiesLayer(PassError):
    """Pruning as asked would remove every channel (or head) of a layer."""

    def __init__(self, message: str, hint: str, layer: str):
        super().__init__(message, hint)
        self.layer = layer


@dataclass(frozen=True)
class PruneSpec:
    """What to prune, validated already (the prune pass's config, or sensitivity's)."""

    amount: float | None = None  # fraction of channels removed from each unit
    layers: tuple[tuple[str, float], ...] = ()  # (glob, amount): per-layer, first match wins
    heads: float | None = None  # fraction of heads removed per attention block; None: amount
    importance: str = "l2"
    global_ranking: bool = False
    round_to: int = 8
    ignore: tuple[str, ...] = ()
    steps: int = 1
    seed: int = 0


@dataclass
class UnitResult:
    name: str
    kind: Literal["channels", "heads"]
    amount: float  # asked for (global ranking: the global amount)
    before: int  # channels, or heads
    after: int
    layers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "amount": round(self.amount, 4),
                "before": self.before, "after": self.after, "layers": list(self.layers)}


@dataclass
class PruneReport:
    units: list[UnitResult] = field(default_factory=list)
    kept_for_outputs: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    replaced_attention: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": [u.to_dict() for u in self.units],
            "kept_for_outputs": self.kept_for_outputs,
            "not_traced": self.unreached,
            "ignored": self.ignored,
            "attention_replaced": self.replaced_attention,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- widths


def kept_width(width: int, amount: float, round_to: int, name: str, what: str = "channels"
               ) -> int:
    """Channels a layer of ``width`` keeps when ``amount`` of them are removed: rounded to
    the nearest multiple of ``round_to`` (at least one multiple) when the layer is wider
    than that. Raises when nothing would be left."""
    if amount <= 0:
        return width
    raw = width * (1.0 - amount)
    if raw < 1.0:
        raise EmptiesLayer(
            f"prune: removing {amount:.3g} of the {width} {what} of '{name}' would remove every "
            f"one of them",
            f"prune '{name}' less (a per-layer amount under 'layers'), or add it to 'ignore'",
            name,
        )
    if round_to > 1 and width > round_to:
        keep = max(round_to, int(math.floor(raw / round_to + 0.5)) * round_to)
    else:
        keep = max(1, int(math.floor(raw + 0.5)))
    return min(keep, width)


def kept_heads(heads: int, amount: float, name: str) -> int:
    if amount <= 0:
        return heads
    keep = heads - int(math.floor(heads * amount + 0.5))
    if keep < 1:
        raise EmptiesLayer(
            f"prune: removing {amount:.3g} of the {heads} heads of '{name}' would remove every "
            "head",
            f"lower 'heads', or give '{name}' a smaller amount under 'layers'",
            name,
        )
    return keep


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    if n <= 0:
        return []
    # stable: ties (e.g. all-zero channels) go in channel order, so runs are reproducible
    order = torch.sort(scores, stable=True).indices
    return sorted(int(i) for i in order[:n])


def _matches(name: str, pattern: str) -> bool:
    """An ``ignore`` pattern matches a module and, through it, its children."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


# --------------------------------------------------------------------------- pruning


class _Plan:
    """Per unit and attention block: the amount to remove, and the widths to start from."""

    def __init__(self, model: nn.Module, graph: PruningGraph, blocks: list[AttentionBlock],
                 spec: PruneSpec, report: PruneReport):
        self._ignore(model, spec, report)
        units = graph.units(self.ignored_modules)
        report.kept_for_outputs = list(graph.output_units)
        report.unreached = graph.unreached()
        self.init = {u.name: u.group_width for u in units}
        self.groups = {u.name: u.channel_groups for u in units}
        self.layers = {u.name: u.layers for u in units}
        self.overridden: set[str] = set()
        used_globs: set[str] = set()
        self.amount = self._channel_amounts(units, spec, used_globs)
        self.blocks: dict[str, AttentionBlock] = {}
        self.head_amount: dict[str, float] = {}
        self.init_heads: dict[str, int] = {}
        self._head_amounts(blocks, spec, used_globs, report)
        unused = [g for g, _ in spec.layers if g not in used_globs]
        if unused:
            report.warnings.append(
                "layers: pattern" + "s" * (len(unused) > 1) + " matched no prunable layer: "
                + ", ".join(repr(g) for g in unused)
                + f" (prunable: {', '.join(list(self.init)[:8] + list(self.init_heads)[:4])}"
                + ("..." if len(self.init) > 8 or len(self.init_heads) > 4 else "") + ")"
            )

    def _ignore(self, model: nn.Module, spec: PruneSpec, report: PruneReport) -> None:
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [g for g in spec.ignore if not any(_matches(n, g) for n in names)]
        if unmatched:
            report.warnings.append(
                f"ignore: pattern{'s' * (len(unmatched) > 1)} matched no module: "
                + ", ".join(repr(g) for g in unmatched)
            )
        self.ignored = [n for n in names if any(_matches(n, g) for g in spec.ignore)]
        # a pattern naming a parent ignores its children: keep only the top names
        report.ignored = [n for n in self.ignored
                          if not any(n.startswith(p + ".") for p in self.ignored)]
        self.ignored_modules = [model.get_submodule(n) for n in report.ignored]
        self.ignored_ids = {id(m) for top in self.ignored_modules for m in top.modules()}

    def _override(self, names: tuple[str, ...], spec: PruneSpec, used_globs: set[str]
                  ) -> float | None:
        """The amount of the first ``layers`` glob matching any of ``names`` (the first
        name is the unit's), or None."""
        glob = next((g for g, _ in spec.layers
                     if any(fnmatch.fnmatchcase(n, g) for n in names)), None)
        if glob is None:
            return None
        used_globs.add(glob)
        self.overridden.add(names[0])
        return dict(spec.layers)[glob]

    def _channel_amounts(self, units: list[Unit], spec: PruneSpec, used_globs: set[str]
                         ) -> dict[str, float]:
        amount: dict[str, float] = {}
        for u in units:
            a = self._override((u.name, *u.layers), spec, used_globs)
            if a is None:
                a = spec.amount or 0.0
            if a > 0:
                amount[u.name] = a
        return amount

    def _head_amounts(self, blocks: list[AttentionBlock], spec: PruneSpec,
                      used_globs: set[str], report: PruneReport) -> None:
        for b in blocks:
            if any(id(p) in self.ignored_ids for p in (b.module, *b.projections)):
                continue
            a = self._override((b.name,), spec, used_globs)
            if a is None:
                a = spec.heads if spec.heads is not None else (spec.amount or 0.0)
            if a <= 0:
                continue
            why_not = b.prunable
            if why_not:
                report.warnings.append(f"heads of '{b.name}' are not pruned: {why_not}")
                continue
            self.blocks[b.name] = b
            self.head_amount[b.name] = a
            self.init_heads[b.name] = b.num_heads

    def check(self, spec: PruneSpec) -> None:
        """Fail before any surgery when the final widths would empty a layer."""
        for name, a in self.amount.items():
            if spec.global_ranking and name not in self.overridden:
                continue
            kept_width(self.init[name], a, self._round(name, spec), name)
        for name, a in self.head_amount.items():
            kept_heads(self.init_heads[name], a, name)

    def _round(self, name: str, spec: PruneSpec) -> int:
        return spec.round_to if self.groups[name] == 1 else 1

    def empty(self) -> bool:
        return not self.amount and not self.head_amount


def prune_model(model: nn.Module, example_inputs: tuple | dict, spec: PruneSpec,
                gradients: Gradients | None = None) -> PruneReport:
    """Prune ``model`` in place as ``spec`` says; returns what was done.

    ``example_inputs``: real inputs (a tuple of positional tensors, or a dict of keyword
    tensors) to trace the model with. ``gradients``: fills ``.grad`` of every parameter
    from a few batches of training data (needed by ``taylor``).
    """
    report = PruneReport()
    graph, plan = _trace(model, example_inputs, spec, report)
    if plan.empty():
        raise PassError(
            "prune: nothing to prune: " + _why_nothing(plan, report),
            "check 'ignore' and 'layers', and that the model's layers run in forward() "
            "with autograd on (no torch.no_grad, .detach() or numpy in between)",
        )
    plan.check(spec)
    if spec.importance == "taylor" and gradients is None:
        raise PassError("prune: importance 'taylor' needs training data",
                        "set data.train in the recipe, or use importance: l2")
    scorer = _Scorer(graph, make_importance(spec.importance), make_importance("l2"))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for step in range(1, spec.steps + 1):
            frac = step / spec.steps
            if gradients is not None and spec.importance == "taylor":
                _fill_gradients(model, gradients)
            cuts = _channel_cuts(graph, plan, spec, scorer, step)
            heads_cut = _head_cuts(graph, plan, scorer, frac)
            for unit, channels in cuts:
                graph.remove(unit, channels)
            for block, unit, channels, target in heads_cut:
                graph.remove(unit, channels)
                block.set_heads(target)
            _check_runs(model, example_inputs, step, spec.steps)
    for p in model.parameters():
        p.grad = None
    _fill_report(report, model, graph, plan, spec, scorer.fell_back)
    return report


def _trace(model: nn.Module, example_inputs: tuple | dict, spec: PruneSpec,
           report: PruneReport) -> tuple[PruningGraph, _Plan]:
    """Split fused attention, trace the dependency graph and plan what ``spec`` removes."""
    report.replaced_attention = split_multihead_attention(model)
    blocks = find_attention(model)
    protected = [p for b in blocks for p in b.projections]
    for p in model.parameters():
        p.requires_grad_(True)
    graph = PruningGraph(model, example_inputs, protected)
    return graph, _Plan(model, graph, blocks, spec, report)


@dataclass
class _Scorer:
    """Channel scores by the chosen importance, or by l2 where it has nothing to rank by
    (say, taylor without BatchNorm); remembers where it fell back."""

    graph: PruningGraph
    importance: Any
    fallback: Any
    fell_back: list[str] = field(default_factory=list)

    def __call__(self, unit: Unit, name: str) -> torch.Tensor:
        scores = self.graph.scores(unit, self.importance)
        if scores is None:
            self.fell_back.append(name)
            scores = self.graph.scores(unit, self.fallback)
        return scores


def _channel_cuts(graph: PruningGraph, plan: _Plan, spec: PruneSpec, scorer: _Scorer,
                  step: int) -> list[tuple[Unit, list[int]]]:
    """The channels each unit loses in round ``step``: per layer, or by one global ranking
    for the units without a per-layer amount."""
    frac = step / spec.steps
    units = {u.name: u for u in graph.units(plan.ignored_modules)}
    cuts: list[tuple[Unit, list[int]]] = []
    pool: list[tuple[Unit, torch.Tensor]] = []
    for name, a in plan.amount.items():
        unit = units.get(name)
        if unit is None:  # pragma: no cover - the graph lost a unit between steps
            raise PassError(f"prune: layer '{name}' vanished from the graph at step "
                            f"{step}", "use steps: 1")
        per_group = scorer(unit, name).view(unit.channel_groups, -1).mean(0)
        if spec.global_ranking and name not in plan.overridden:
            pool.append((unit, per_group))
            continue
        keep = kept_width(plan.init[name], a * frac, plan._round(name, spec), name)
        cuts.append((unit, _expand(unit, _lowest(per_group, unit.group_width - keep))))
    if pool:
        cuts += _global_cuts(pool, plan, spec, frac)
    return cuts


def _head_cuts(graph: PruningGraph, plan: _Plan, scorer: _Scorer, frac: float) -> list[tuple]:
    """Per attention block: the lowest-scored heads' channels in its query projection
    (Torch-Pruning takes key and value along), and the heads it keeps."""
    heads_cut = []
    for name, block in plan.blocks.items():
        target = kept_heads(plan.init_heads[name], plan.head_amount[name] * frac, name)
        n = block.num_heads - target
        if n <= 0:
            continue
        unit = graph.head_unit(block.projections[0])
        d = block.head_dim
        per_head = scorer(unit, name).view(block.num_heads, d).mean(1)
        heads = _lowest(per_head, n)
        channels = [h * d + i for h in heads for i in range(d)]
        heads_cut.append((block, unit, channels, target))
    return heads_cut


def _fill_report(report: PruneReport, model: nn.Module, graph: PruningGraph, plan: _Plan,
                 spec: PruneSpec, fell_back: list[str]) -> None:
    final = {u.name: u for u in graph.units(plan.ignored_modules)}
    for name, a in plan.amount.items():
        u = final[name]
        report.units.append(UnitResult(name, "channels", a, plan.init[name] * plan.groups[name],
                                       u.width, plan.layers[name]))
    for name, block in plan.blocks.items():
        report.units.append(UnitResult(name, "heads", plan.head_amount[name],
                                       plan.init_heads[name], block.num_heads,
                                       tuple(n for n, m in model.named_modules()
                                             if m in block.projections)))
    if fell_back:
        report.notes.append(
            f"{spec.importance} had nothing to rank {len(set(fell_back))} layer(s) by "
            f"(e.g. '{fell_back[0]}': no BatchNorm); they were ranked by l2 instead"
        )
    report.warnings += [w for w in graph.warnings if "Unknown operation" in w]


def _check_runs(model: nn.Module, example_inputs: tuple | dict, step: int, steps: int) -> None:
    """The model still runs after a round of surgery; if not, say in which layer."""
    try:
        run_tracked(model, example_inputs)
    except LayerError as e:
        where = f" in layer '{e.layer}' ({e.cls})" if e.layer else ""
        rnd = f" (round {step} of {steps})" if steps > 1 else ""
        raise PassError(
            f"prune: the pruned model no longer runs{where}{rnd}: {e.error}",
            "Torch-Pruning could not follow an op between the layers it pruned; add the "
            "layer (or the block around it) to 'ignore'",
        ) from e


def _expand(unit: Unit, per_group: list[int]) -> list[int]:
    """Indices within one channel group → the same indices in every group."""
    gw = unit.group_width
    return [g * gw + i for g in range(unit.channel_groups) for i in per_group]


def _global_cuts(pool, plan: _Plan, spec: PruneSpec, frac: float):
    """One ranking across every pooled unit (each unit's scores are normalized to mean 1
    by Torch-Pruning, so they compare): the lowest-ranked channels go, until the pool keeps
    ``1 - amount`` of its initial channels. Each unit keeps at least one ``round_to``."""
    total_init = sum(plan.init[u.name] for u, _ in pool)
    current = sum(u.group_width for u, _ in pool)
    target = round(total_init * (1 - (spec.amount or 0.0) * frac))
    n = current - target
    if n <= 0:
        return []
    allscores = torch.cat([s for _, s in pool])
    threshold = torch.sort(allscores, stable=True).values[min(n, len(allscores)) - 1]
    cuts = []
    for unit, scores in pool:
        below = int((scores <= threshold).sum())
        r = plan._round(unit.name, spec)
        floor = min(r, unit.group_width) if r > 1 else 1
        keep = unit.group_width - below
        if r > 1 and unit.group_width > r:
            keep = int(math.floor(keep / r + 0.5)) * r
        keep = min(unit.group_width, max(floor, keep))
        cuts.append((unit, _expand(unit, _lowest(scores, unit.group_width - keep))))
    return cuts


def _fill_gradients(model: nn.Module, gradients: Gradients) -> None:
    for p in model.parameters():
        p.grad = None
    gradients(model)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _why_nothing(plan: _Plan, report: PruneReport) -> str:
    parts = []
    if report.unreached:
        parts.append("Torch-Pruning's graph does not reach layer(s) "
                     + ", ".join(repr(n) for n in report.unreached[:6])
                     + " from the model's outputs")
    if report.kept_for_outputs and not plan.init:
        parts.append("the only prunable layers feed the outputs directly ("
                     + ", ".join(report.kept_for_outputs[:4]) + ")")
    if plan.init and not plan.amount:
        parts.append("no amount applies to any of the prunable layers ("
                     + ", ".join(list(plan.init)[:6]) + ")")
    if report.ignored and not plan.init:
        parts.append("'ignore' covers every prunable layer")
    return "; ".join(parts) or "the model has no prunable conv or linear layer"


# --------------------------------------------------------------------------- targets


@dataclass
class TargetSearch:
    kind: str
    target: float
    achieved: float
    amount: float
    trials: list[tuple[float, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "achieved": round(self.achieved, 4),
                "amount": round(self.amount, 4),
                "trials": [[round(a, 4), round(r, 4)] for a, r in self.trials]}


def measure(model: nn.Module, count_inputs: tuple | dict) -> dict[str, int]:
    return {"params": count_params(model), "macs": count_macs(model, count_inputs)}


def prune_to_target(model: nn.Module, example_inputs: tuple | dict, count_inputs: tuple | dict,
                    spec: PruneSpec, kind: str, fraction: float,
                    gradients: Gradients | None = None, iterations: int = 12,
                    on_trial: Callable[[], None] | None = None,
                    ) -> tuple[nn.Module, PruneReport, TargetSearch]:
    """Prune a copy of ``model`` so it keeps at most ``fraction`` of its ``kind`` (``macs``
    or ``params``): the smallest ``amount`` (global, or every layer's) that gets there,
    found by bisection. Returns the pruned copy."""
    base = measure(model, count_inputs)[kind]
    trials: list[tuple[float, float]] = []

    def trial(a: float) -> tuple[nn.Module, PruneReport, float]:
        m = copy.deepcopy(model)
        rep = prune_model(m, example_inputs, replace(spec, amount=a), gradients)
        r = measure(m, count_inputs)[kind] / base
        trials.append((a, r))
        if on_trial:
            on_trial()
        return m, rep, r

    hi = max_amount(model, example_inputs, spec)
    best = trial(hi)
    if best[2] > fraction:
        floor_units = [u.name for u in best[1].units
                       if u.after <= max(1, min(spec.round_to, u.before)) or u.after <= 1]
        raise EmptiesLayer(
            f"prune: target {kind} {fraction:g} of the baseline is out of reach: with every "
            f"prunable layer cut to its minimum the model keeps {best[2]:.3f}"
            + (f" (at their minimum: {', '.join(floor_units[:6])})" if floor_units else "")
            + "; going further would remove every channel of a layer",
            f"ask for {kind}: {math.ceil(best[2] * 100) / 100:g} or more, lower round_to, or "
            "stop ignoring layers",
            floor_units[0] if floor_units else "",
        )
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m, rep, r = trial(mid)
        if r <= fraction:
            hi, best = mid, (m, rep, r)
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    model_out, report, achieved = best
    return model_out, report, TargetSearch(kind, fraction, achieved, hi, trials)


def discover(model: nn.Module, example_inputs: tuple | dict, spec: PruneSpec
             ) -> tuple[_Plan, PruneReport]:
    """What ``spec`` would prune in ``model`` (traced on a copy; nothing is removed)."""
    report = PruneReport()
    _, plan = _trace(copy.deepcopy(model), example_inputs, spec, report)
    return plan, report


def max_amount(model: nn.Module, example_inputs: tuple | dict, spec: PruneSpec) -> float:
    """The largest default ``amount`` that empties no layer (global ranking never empties
    one; a per-layer amount under ``layers`` does not move)."""
    plan, _ = discover(model, example_inputs, replace(spec, amount=0.5))
    bound = 0.99
    if not spec.global_ranking:
        for name, width in plan.init.items():
            if name not in plan.overridden:
                bound = min(bound, 1.0 - 1.0 / width)
    if spec.heads is None:
        for name, heads in plan.init_heads.items():
            if name in plan.overridden:
                continue
            bound = min(bound, 1.0 - 0.5 / heads - 1e-6)
    return max(bound, 0.0)
