"""Sensitivity: how the metric moves when each prunable layer alone is pruned by several
amounts, and a per-layer plan that reaches a MACs target where it hurts least.

Every point is measured the way the pipeline measures a stage: the pruned model is
exported to ONNX and run in ONNX Runtime on the recipe's eval data; its MACs are counted
on the ONNX graph at batch 1. The suggestion is greedy: it raises, one layer at a time, the
amount with the smallest metric loss per MAC saved, checks the combination by pruning it
for real (MACs counted in torch, since layers interact), and finally measures the chosen
combination like every other point.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compactor.data import Outputs, PerBatch, feeds_for_batch, latency_shape
from compactor.errors import PassError, RecipeError

log = logging.getLogger(__name__)

DEFAULT_AMOUNTS = (0.25, 0.5, 0.75)


@dataclass
class Point:
    amount: float
    metric: float
    drop: float  # positive: worse than the baseline
    macs_ratio: float | None  # the whole model's MACs kept, measured on the ONNX graph
    width: int  # channels (or heads) the layer keeps

    def to_dict(self) -> dict[str, Any]:
        return {"amount": self.amount, "metric": self.metric, "drop": self.drop,
                "macs_ratio": self.macs_ratio, "width": self.width}


@dataclass
class LayerSensitivity:
    name: str
    kind: str  # channels | heads
    width: int
    points: list[Point] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "width": self.width,
                "points": [p.to_dict() for p in self.points]}


@dataclass
class Suggestion:
    target_macs: float
    layers: dict[str, float]
    reachable: bool
    macs_ratio: float | None = None  # measured on the ONNX graph
    metric: float | None = None
    drop: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def yaml(self) -> str:
        """The prune pass as a recipe's ``passes:`` entry, ready to paste."""
        lines = ["  - prune:"]
        for k, v in self.settings.items():
            lines.append(f"      {k}: {json.dumps(v)}")
        lines.append("      layers:")
        for name, a in self.layers.items():
            lines.append(f"        {json.dumps(name)}: {a:g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"target_macs": self.target_macs, "reachable": self.reachable,
                "layers": self.layers, "macs_ratio": self.macs_ratio, "metric": self.metric,
                "drop": self.drop, "settings": self.settings, "yaml": self.yaml()}


@dataclass
class SensitivityResult:
    recipe: str
    metric: str
    higher_is_better: bool
    baseline_metric: float
    baseline_macs: int | None
    amounts: tuple[float, ...]
    layers: list[LayerSensitivity]
    suggestion: Suggestion | None
    settings: dict[str, Any]
    kept_for_outputs: list[str]
    eval_samples: int
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "baseline": {"metric": self.baseline_metric, "macs": self.baseline_macs},
            "amounts": list(self.amounts), "settings": self.settings,
            "layers": [layer.to_dict() for layer in self.layers],
            "kept_for_outputs": self.kept_for_outputs,
            "suggestion": self.suggestion.to_dict() if self.suggestion else None,
            "eval_samples": self.eval_samples, "seconds": round(self.seconds, 1),
            "warnings": self.warnings,
            "measured": "metric in ONNX Runtime on the eval data; MACs on the ONNX graph at "
                        "batch 1",
        }


# --------------------------------------------------------------------------- measuring


class _Measure:
    """Exports a torch model and measures metric and MACs in ONNX Runtime."""

    def __init__(self, ctx, metric, batches, work: Path, dims=None):
        self.ctx, self.metric, self.batches, self.work = ctx, metric, batches, work
        # MACs at the recipe's latency shape (measure.dims; else the eval data's median)
        self.dims = latency_shape(ctx.inputs, batches, dims).dims
        self.reference: Outputs | None = None
        self.baseline_value: float | None = None
        self.baseline_macs: int | None = None
        self.n = 0

    def __call__(self, module) -> tuple[float, int | None]:
        import onnx

        from compactor.exporting import ExportConfig, export_module, quiet
        from compactor.measure.latency import session
        from compactor.measure.macs import count_macs

        self.n += 1
        path = self.work / f"point-{self.n}.onnx"
        try:
            with quiet():
                export_module(module, self.ctx.inputs, self.batches[0], path,
                              ExportConfig(exporter="legacy", simplify=False))
        except PassError:
            export_module(module, self.ctx.inputs, self.batches[0], path,
                          ExportConfig(simplify=False))
        sess = session(path)
        names = {i.name for i in sess.get_inputs()}
        outs, tgts = [], []
        for b in self.batches:
            outs.append(sess.run(None, {k: v for k, v in b.inputs.items() if k in names}))
            if b.target is not None:
                tgts.append(b.target)
        # every output, per batch (batches padded to their own length give outputs of
        # different shapes); the metric scores the outputs the recipe names
        outputs = Outputs.of([o.name for o in sess.get_outputs()], outs)
        if self.reference is not None and outputs.names != self.reference.names:
            outputs = Outputs(self.reference.names, outputs.values)
        targets = PerBatch.of(tgts) if tgts and len(tgts) == len(outs) else None
        if self.reference is None:
            self.reference = outputs
        value = self.metric.score(outputs, targets, self.reference)
        sample = {k: v.shape for k, v in
                  feeds_for_batch(self.ctx.inputs, self.batches, 1, self.dims).items()}
        macs = count_macs(onnx.load(str(path), load_external_data=False), sample)
        path.unlink(missing_ok=True)
        return value, macs


# --------------------------------------------------------------------------- analysis


def analyze(recipe, amounts: Sequence[float] = DEFAULT_AMOUNTS, target_macs: float | None = 0.5,
            importance: str | None = None, ignore: Sequence[str] | None = None,
            max_batches: int | None = None, progress=None) -> SensitivityResult:
    """Sensitivity of each prunable layer of ``recipe``'s model, and a suggestion of per-layer
    amounts for ``target_macs`` (the fraction of the baseline's MACs kept)."""
    from compactor.metrics import get_metric
    from compactor.model import load_model
    from compactor.passes.prune import model_inputs, taylor_gradients
    from compactor.pipeline import build_context
    from compactor.progress import Progress

    t0 = time.perf_counter()
    progress = progress or Progress()
    amounts = _check_args(recipe, amounts, target_macs)
    base_cfg, spec, settings = _base_spec(recipe, importance, ignore)

    with progress.task("load model"):
        baseline, _ = load_model(recipe.model, recipe.base_dir)
    work = Path(tempfile.mkdtemp(prefix=f"compactor-sensitivity-{recipe.name}-"))
    try:
        ctx = build_context(recipe, recipe.model.inputs, work, progress)
        batches = ctx.eval_batches[:max_batches] if max_batches else ctx.eval_batches
        metric = get_metric(recipe.metric, recipe.base_dir)
        measure = _Measure(ctx, metric, batches, work, recipe.measure.dims)
        model = baseline.module
        trace_inputs, count_inputs = model_inputs(model, ctx.inputs, batches[0])
        gradients = taylor_gradients(ctx, base_cfg.taylor_batches if base_cfg else 4) \
            if spec.importance == "taylor" else None
        with progress.task("baseline: export and evaluate"):
            base_value, base_macs = measure(model)
        measure.baseline_value, measure.baseline_macs = base_value, base_macs
        units, report = _prunable(model, trace_inputs, spec)
        sweep = _Sweep(model, trace_inputs, spec, gradients, measure, metric, base_value)
        layers = [sweep.layer(name, kind, width, amounts, progress)
                  for name, kind, width in units]

        suggestion = None
        if target_macs is not None:
            with progress.task(f"suggestion for MACs ≤ {target_macs:g} of baseline"):
                suggestion = _suggest(sweep, count_inputs, layers, target_macs)
                suggestion.settings = settings
        return SensitivityResult(
            recipe=recipe.name, metric=metric.name, higher_is_better=metric.higher_is_better,
            baseline_metric=base_value, baseline_macs=base_macs, amounts=amounts,
            layers=layers, suggestion=suggestion, settings=settings,
            kept_for_outputs=report.kept_for_outputs,
            eval_samples=sum(b.size for b in batches), seconds=time.perf_counter() - t0,
            warnings=report.warnings,
        )
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _check_args(recipe, amounts: Sequence[float], target_macs: float | None
                ) -> tuple[float, ...]:
    amounts = tuple(sorted(set(float(a) for a in amounts)))
    if not amounts or any(not 0 < a < 1 for a in amounts):
        raise RecipeError("sensitivity: amounts must be fractions in (0, 1)",
                          "e.g. --amounts 0.25,0.5,0.75")
    if target_macs is not None and not 0 < target_macs < 1:
        raise RecipeError(f"sensitivity: target MACs {target_macs:g} must be in (0, 1)",
                          "the fraction of the baseline's MACs kept, e.g. 0.5")
    if recipe.model.kind != "torch":
        raise RecipeError(
            "sensitivity prunes the torch model, and this recipe's model is ONNX",
            "give the model as model.factory (or model.torchscript) to analyse it",
        )
    return amounts


def _prunable(model, trace_inputs, spec) -> tuple[list[tuple[str, str, int]], Any]:
    """Each prunable layer as (name, kind, width), and the pruner's report on the model."""
    from compactor.pruning.pruner import discover

    plan, report = discover(model, trace_inputs, replace(spec, amount=0.5))
    units = [(n, "channels", w * plan.groups[n]) for n, w in plan.init.items()]
    units += [(n, "heads", h) for n, h in plan.init_heads.items()]
    if not units:
        raise PassError("sensitivity: the model has no prunable layer",
                        "see `compactor optimize` with a prune pass for why")
    return units, report


def _base_spec(recipe, importance: str | None, ignore: Sequence[str] | None):
    """The recipe's prune settings (or the defaults) with no amounts: each point sets its
    own. Returns the prune config (or None), the spec and the settings a suggestion keeps."""
    from compactor.passes.prune import spec_from_config
    from compactor.pruning.pruner import PruneSpec

    base_cfg = next((cfg for name, cfg in recipe.pass_list if name == "prune"), None)
    spec = spec_from_config(base_cfg, recipe.seed) if base_cfg is not None else PruneSpec(
        seed=recipe.seed)
    spec = replace(spec, amount=None, layers=(), heads=None, global_ranking=False,
                   importance=importance or spec.importance,
                   ignore=tuple(ignore) if ignore is not None else spec.ignore)
    settings: dict[str, Any] = {"importance": spec.importance, "round_to": spec.round_to}
    if spec.ignore:
        settings["ignore"] = list(spec.ignore)
    if spec.steps > 1:
        settings["steps"] = spec.steps
    return base_cfg, spec, settings


@dataclass
class _Sweep:
    """Prunes copies of one model by per-layer amounts and measures them."""

    model: Any
    trace_inputs: Any
    spec: Any
    gradients: Any
    measure: _Measure
    metric: Any
    base_value: float

    def pruned(self, layers: tuple[tuple[str, float], ...]):
        """A pruned copy of the model and the pruner's report."""
        from compactor.pruning.pruner import prune_model

        m = copy.deepcopy(self.model)
        rep = prune_model(m, self.trace_inputs, replace(self.spec, layers=layers),
                          self.gradients)
        return m, rep

    def layer(self, name: str, kind: str, width: int, amounts: tuple[float, ...],
              progress) -> LayerSensitivity:
        """One layer alone pruned by each amount (an amount that empties it is skipped)."""
        from compactor.pruning.pruner import EmptiesLayer

        row = LayerSensitivity(name, kind, width)
        base_macs = self.measure.baseline_macs
        with progress.task(f"{name}: {len(amounts)} amounts", total=len(amounts)) as task:
            for a in amounts:
                try:
                    m, rep = self.pruned(((name, a),))
                except EmptiesLayer:
                    task.advance()
                    continue
                value, macs = self.measure(m)
                kept = next((u.after for u in rep.units if u.name == name), width)
                row.points.append(Point(
                    a, value, self.metric.drop(self.base_value, value),
                    None if not (macs and base_macs) else macs / base_macs, kept))
                task.advance()
        return row


class _Greedy:
    """Per layer, its measured options (amount, metric lost, MACs saved) and the one
    chosen so far; upgrades the cheapest loss per MAC saved."""

    def __init__(self, layers: list[LayerSensitivity]):
        self.options = {
            layer.name: [(0.0, 0.0, 0.0)] + [
                (p.amount, max(p.drop, 0.0), 1.0 - p.macs_ratio)
                for p in layer.points if p.macs_ratio is not None
            ]
            for layer in layers
        }
        self.chosen = {name: 0 for name in self.options}  # index into options

    def any_option(self) -> bool:
        return any(len(opts) > 1 for opts in self.options.values())

    def saved(self) -> float:
        return sum(self.options[n][i][2] for n, i in self.chosen.items())

    def upgrade(self) -> bool:
        best = None
        for name, opts in self.options.items():
            cur = opts[self.chosen[name]]
            for j in range(self.chosen[name] + 1, len(opts)):
                gain = opts[j][2] - cur[2]
                if gain <= 0:
                    continue
                cost = (opts[j][1] - cur[1]) / gain
                if best is None or cost < best[0] - 1e-12:
                    best = (cost, name, j)
        if best is None:
            return False
        self.chosen[best[1]] = best[2]
        return True

    def plan(self) -> dict[str, float]:
        return {n: self.options[n][i][0] for n, i in self.chosen.items()
                if self.options[n][i][0] > 0}


def _suggest(sweep: _Sweep, count_inputs, layers: list[LayerSensitivity],
             target: float) -> Suggestion:
    """Greedy: raise the layer amount with the least metric lost per MAC saved, until the
    pruned model (checked for real, in torch) keeps at most ``target`` of the MACs."""
    from compactor.pruning.pruner import measure as count

    base_torch = count(sweep.model, count_inputs)["macs"]
    greedy = _Greedy(layers)
    if not greedy.any_option():
        return Suggestion(target, {}, False)
    needed = 1.0 - target
    reachable = False
    pruned = None
    for _ in range(200):
        while greedy.saved() < needed and greedy.upgrade():
            pass
        m, _ = sweep.pruned(tuple(greedy.plan().items()))
        ratio = count(m, count_inputs)["macs"] / base_torch
        if ratio <= target:
            reachable, pruned = True, m
            break
        # layers interact (pruning one shrinks its neighbours' inputs too): ask for more
        needed = greedy.saved() + (ratio - target)
        if not greedy.upgrade():
            pruned = m
            break
    layers_plan = greedy.plan()
    s = Suggestion(target, layers_plan, reachable)
    if pruned is not None and layers_plan:
        measure = sweep.measure
        value, macs = measure(pruned)
        s.metric, s.drop = value, sweep.metric.drop(sweep.base_value, value)
        s.macs_ratio = None if not (macs and measure.baseline_macs) else \
            macs / measure.baseline_macs
    return s


# --------------------------------------------------------------------------- writing


def write(result: SensitivityResult, folder: Path) -> dict[str, Path]:
    """sensitivity.json, sensitivity.md (table, suggestion) and sensitivity.svg (chart)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "sensitivity.json", "markdown": folder / "sensitivity.md",
             "chart": folder / "sensitivity.svg"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(result), encoding="utf-8")
    paths["chart"].write_text(svg_chart(result), encoding="utf-8")
    return paths


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}g}"


def markdown(r: SensitivityResult) -> str:
    head = ["layer", "kind", "width"] + [f"{a:g}" for a in r.amounts]
    lines = [
        f"# Pruning sensitivity: {r.recipe}",
        "",
        f"Metric `{r.metric}` ({'higher' if r.higher_is_better else 'lower'} is better) on "
        f"{r.eval_samples} eval samples, measured in ONNX Runtime; baseline "
        f"{_fmt(r.baseline_metric)}. Each cell: the metric with only that layer pruned by the "
        "column's amount (and the model's MACs kept, counted on the ONNX graph at batch 1). "
        f"Importance: {r.settings.get('importance')}, round_to: {r.settings.get('round_to')}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for layer in r.layers:
        by = {p.amount: p for p in layer.points}
        cells = [f"{_fmt(by[a].metric)} ({_fmt(by[a].macs_ratio, 3)})" if a in by else "n/a"
                 for a in r.amounts]
        lines.append(f"| `{layer.name}` | {layer.kind} | {layer.width} | " + " | ".join(cells)
                     + " |")
    if r.kept_for_outputs:
        lines += ["", "Not pruned (their channels are model outputs): "
                  + ", ".join(f"`{n}`" for n in r.kept_for_outputs) + "."]
    s = r.suggestion
    if s is not None:
        lines += ["", f"## Suggestion for MACs ≤ {s.target_macs:g} of the baseline", ""]
        if not s.reachable:
            lines.append("Not reachable with these amounts (try larger --amounts); the "
                         "largest plan found:")
        if s.metric is not None:
            lines.append(f"Measured: MACs {_fmt(s.macs_ratio, 3)} of the baseline, "
                         f"{r.metric} {_fmt(s.metric)} (drop {_fmt(s.drop, 3)}).")
        lines += ["", "```yaml", "passes:", s.yaml(), "```"]
    return "\n".join(lines) + "\n"


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_chart(r: SensitivityResult) -> str:
    """Metric against amount, one line per layer (baseline at amount 0)."""
    w, h, left, right, top, bottom = 760, 420, 70, 230, 40, 50
    pw, ph = w - left - right, h - top - bottom
    values = [r.baseline_metric] + [p.metric for layer in r.layers for p in layer.points]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def X(a: float) -> float:
        return left + pw * a / max(r.amounts)

    def Y(v: float) -> float:
        return top + ph * (hi - v) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{_esc(r.recipe)}: {_esc(r.metric)} with '
           'one layer pruned (ONNX Runtime)</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>']
    for a in (0.0, *r.amounts):
        out.append(f'<text x="{X(a):.1f}" y="{top + ph + 16}" text-anchor="middle">{a:g}</text>')
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        out.append(f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{Y(v):.1f}" x2="{left + pw}" y2="{Y(v):.1f}" '
                   'stroke="#eee"/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 10}" text-anchor="middle">amount pruned '
               '(fraction of the layer removed)</text>')
    out.append(f'<line x1="{left}" y1="{Y(r.baseline_metric):.1f}" x2="{left + pw}" '
               f'y2="{Y(r.baseline_metric):.1f}" stroke="#999" stroke-dasharray="4 3"/>')
    legend_x = w - right
    for i, layer in enumerate(r.layers):
        pts = [(0.0, r.baseline_metric)] + [(p.amount, p.metric) for p in layer.points]
        ly = top + 14 * i
        out += _layer_line(layer.name, [(X(a), Y(v)) for a, v in pts],
                           _COLORS[i % len(_COLORS)], legend_x, ly if ly < h - 20 else None)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _layer_line(name: str, pts: list[tuple[float, float]], color: str, legend_x: float,
                ly: float | None) -> list[str]:
    """One layer's line from the baseline through its points, and its legend entry (none
    where ``ly`` is None: the legend is full)."""
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    out = [f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>']
    for x, y in pts[1:]:
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
    if ly is not None:
        out.append(f'<line x1="{legend_x + 12}" y1="{ly}" x2="{legend_x + 30}" '
                   f'y2="{ly}" stroke="{color}" stroke-width="3"/>')
        out.append(f'<text x="{legend_x + 36}" y="{ly + 4}">{_esc(name[-28:])}</text>')
    return out


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(layer: LayerSensitivity, worst: float) -> str:
    """Metric drop at each amount as a bar (taller: worse); '·' where not measured."""
    if worst <= 0:
        worst = 1.0
    return "".join(SPARK[min(7, int(max(p.drop, 0.0) / worst * 7.999))] for p in layer.points)
