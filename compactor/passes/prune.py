"""``prune``: torch → torch, structured pruning that removes channels, neurons and attention
heads for real, so the exported model has fewer parameters and runs faster.

Torch-Pruning's dependency graph finds every layer that shares a channel (through
BatchNorm, residual sums, concatenations, reshapes...) and removes it from all of them; no
mask is left behind. How much goes is either an ``amount`` (the fraction of each layer's
channels removed) or a ``target`` (the fraction of the baseline's MACs or parameters kept,
reached by searching the amount). Layers whose channels are a model output (the final
classifier, an embedding model's output width) are never pruned, so output shapes stay.

After pruning the model must run on the recipe's inputs, give outputs of the same shapes,
and export to ONNX; the stage records parameters and MACs before and after.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from compactor.errors import PassError
from compactor.passes.base import Pass, PassConfig, register

if TYPE_CHECKING:
    from compactor.budgets import SizeFloor
    from compactor.data import Batch
    from compactor.passes.base import RunContext
    from compactor.spec import InputSpec
    from compactor.stage import Stage

log = logging.getLogger(__name__)

IMPORTANCE = Literal["l1", "l2", "taylor", "bn_scale", "random"]


class PruneTarget(PassConfig):
    """What the pruned model keeps, as a fraction of the baseline: exactly one of them."""

    macs: float | None = Field(default=None, gt=0, lt=1,
                               description="fraction of the baseline's MACs kept")
    params: float | None = Field(default=None, gt=0, lt=1,
                                 description="fraction of the baseline's parameters kept")

    @model_validator(mode="after")
    def _one(self) -> PruneTarget:
        given = [k for k in ("macs", "params") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("target: give exactly one of 'macs' or 'params' (a fraction of "
                             "the baseline kept, e.g. {macs: 0.5})")
        return self

    @property
    def kind(self) -> str:
        return "macs" if self.macs is not None else "params"

    @property
    def fraction(self) -> float:
        return float(self.macs if self.macs is not None else self.params)


class PruneConfig(PassConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              serialize_by_alias=True)

    amount: float | None = Field(
        default=None, gt=0, lt=1,
        description="fraction of the channels removed from each prunable layer",
    )
    target: PruneTarget | None = Field(
        default=None, description="{macs: F} or {params: F}: fraction of the baseline kept"
    )
    steps: int = Field(default=1, ge=1, le=50,
                       description="iterative rounds; importance is re-estimated each round")
    importance: IMPORTANCE = Field(
        default="l2", description="l1 | l2 (weight magnitude), taylor (weight x gradient on "
        "training data), bn_scale (BatchNorm scale), random",
    )
    global_: bool = Field(
        default=False, alias="global",
        description="rank channels across all layers (layers lose different fractions)",
    )
    round_to: int = Field(default=8, ge=1, le=256,
                          description="pruned widths are multiples of this (SIMD-friendly)")
    ignore: tuple[str, ...] = Field(
        default=(), description="module-name globs never pruned (the final classifier/head "
        "is kept automatically)",
    )
    layers: dict[str, float] = Field(
        default_factory=dict,
        description="per-layer amounts, module-name glob → fraction removed (for an "
        "attention block: of its heads); the first matching glob wins",
    )
    heads: float | None = Field(
        default=None, ge=0, lt=1,
        description="fraction of attention heads removed per attention block (default: "
        "amount)",
    )
    taylor_batches: int = Field(default=4, ge=1, description="training batches for taylor")
    check_export: bool = Field(default=True, description="check the pruned model exports")

    @field_validator("layers")
    @classmethod
    def _layer_amounts(cls, v: dict[str, float]) -> dict[str, float]:
        for glob, a in v.items():
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < 1:
                raise ValueError(
                    f"layers[{glob!r}]: amount {a!r} must be in [0, 1) (0 leaves it as is)"
                )
        return v

    @model_validator(mode="after")
    def _how_much(self) -> PruneConfig:
        if self.amount is not None and self.target is not None:
            raise ValueError("give 'amount' or 'target', not both")
        if self.amount is None and self.target is None and not self.layers:
            raise ValueError(
                "say how much to prune: 'amount: 0.3' (of each layer's channels), "
                "'target: {macs: 0.5}' (of the baseline kept), or per-layer 'layers:'"
            )
        return self


@register
class PrunePass(Pass):
    name = "prune"
    Config = PruneConfig
    input_kind = "torch"
    output_kind = "torch"
    summary = "structured pruning (Torch-Pruning): channels, neurons, attention heads removed"

    def size_floor(self, floor: SizeFloor) -> SizeFloor | None:
        from dataclasses import replace

        cfg: PruneConfig = self.config
        if cfg.global_:
            return None  # layers lose different fractions: no cheap bound on the weights
        elif cfg.target is not None:
            # every layer loses the same fraction a of its channels, so keeps between (1-a)²
            # and (1-a) of its MACs and of its weights alike: weights ≥ (MACs kept)². A
            # params target is squared too: the bisection stops anywhere at or below it (a
            # round_to step can overshoot), so the target itself is no floor.
            keep = cfg.target.fraction**2
        else:
            cut = max([cfg.amount or 0.0, cfg.heads or 0.0, *cfg.layers.values()])
            keep = (1 - cut) ** 2
        return replace(floor, weights=floor.weights * keep)

    def run(self, stage: Stage, ctx: RunContext) -> Stage:
        from compactor.pruning import graph as tpg
        from compactor.pruning.pruner import measure, prune_model, prune_to_target

        cfg: PruneConfig = self.config
        batch = ctx.eval_batches[0]
        trace_inputs, count_inputs = model_inputs(stage.module, ctx.inputs, batch)
        model = copy.deepcopy(stage.module).eval()
        before = measure(model, count_inputs)
        reference = output_shapes(stage.module, ctx.inputs, batch)
        spec = spec_from_config(cfg, ctx.seed)
        gradients = taylor_gradients(ctx, cfg.taylor_batches) if cfg.importance == "taylor" \
            else None
        record: dict[str, Any] = {"torch_pruning": tpg.version(), "importance": cfg.importance,
                                  "global": cfg.global_, "round_to": cfg.round_to,
                                  "steps": cfg.steps}
        if cfg.target is not None:
            kind, frac = cfg.target.kind, cfg.target.fraction
            with ctx.progress.task(f"prune: searching for {kind} ≤ {frac:g} of baseline",
                                   total=None) as task:
                model, report, search = prune_to_target(
                    model, trace_inputs, count_inputs, spec, kind, frac, gradients,
                    on_trial=task.advance,
                )
            record["target"] = search.to_dict()
        else:
            report = prune_model(model, trace_inputs, spec, gradients)
        record.update(report.to_dict())
        after = measure(model, count_inputs)
        record["params"] = {"before": before["params"], "after": after["params"],
                            "ratio": round(after["params"] / max(1, before["params"]), 4)}
        record["macs"] = {"before": before["macs"], "after": after["macs"],
                          "ratio": round(after["macs"] / max(1, before["macs"]), 4),
                          "at": "batch 1, torch FLOP counter"}
        check_pruned(model, ctx.inputs, ctx.eval_batches[:2], reference)
        if cfg.check_export:
            record["export_check"] = check_export(model, ctx, len(stage.lineage))
        model.eval()
        return stage.derive("prune", module=model, record=record,
                            warnings=tuple(report.warnings))


def spec_from_config(cfg: PruneConfig, seed: int = 0):
    from compactor.pruning.pruner import PruneSpec

    return PruneSpec(
        amount=cfg.amount, layers=tuple(cfg.layers.items()), heads=cfg.heads,
        importance=cfg.importance, global_ranking=cfg.global_, round_to=cfg.round_to,
        ignore=cfg.ignore, steps=cfg.steps, seed=seed,
    )


# --------------------------------------------------------------------------- inputs, checks


def model_inputs(module, specs: Sequence[InputSpec], batch: Batch):
    """Inputs to trace with (two real samples, as the exporter passes them) and to count
    MACs at (one sample, cut along each input's batch axis; a scalar stays whole)."""
    from compactor.exporting import example_inputs, to_torch, use_kwargs

    def pack(arrays):
        tensors = to_torch(specs, arrays)
        if use_kwargs(module, specs):
            return {s.name: t for s, t in zip(specs, tensors, strict=True)}
        return tuple(tensors)

    two = example_inputs(specs, batch)
    one = batch.head(1).inputs
    return pack(two), pack(one)


def output_shapes(module, specs: Sequence[InputSpec], batch: Batch) -> list[tuple[int, ...]]:
    from compactor.exporting import call_module, flatten_outputs

    return [tuple(a.shape) for a in flatten_outputs(call_module(module, specs, batch.inputs))]


def check_pruned(model, specs: Sequence[InputSpec], batches: Sequence[Batch],
                 reference: list[tuple[int, ...]]) -> None:
    """The pruned model runs on real inputs and its outputs keep their shapes."""
    from compactor.exporting import flatten_outputs, to_torch, use_kwargs
    from compactor.pruning.graph import LayerError, run_tracked

    for i, b in enumerate(batches):
        tensors = to_torch(specs, b.inputs)
        kw = use_kwargs(model, specs)
        inputs = {s.name: t for s, t in zip(specs, tensors, strict=True)} if kw \
            else tuple(tensors)
        try:
            out = flatten_outputs(run_tracked(model, inputs))
        except LayerError as e:
            raise PassError(
                f"prune: the pruned model fails on the eval data{_in(e)}: {e.error}",
                "Torch-Pruning could not follow an op of this model (see 'not_traced' and "
                "warnings with --debug); add the layer to 'ignore'",
            ) from e
        if i == 0:
            shapes = [tuple(a.shape) for a in out]
            if shapes != reference:
                raise PassError(
                    f"prune: the pruned model's output shapes {shapes} differ from the "
                    f"baseline's {reference}",
                    "a layer feeding an output was pruned; add it to 'ignore'",
                )


def _in(e) -> str:
    return f" in layer '{e.layer}' ({e.cls})" if e.layer else ""


def check_export(model, ctx: RunContext, index: int) -> dict[str, Any]:
    from compactor.exporting import ExportConfig, export_module

    path = ctx.work_path(f"{index:02d}-prune-check.onnx")
    try:
        rec = export_module(model, ctx.inputs, ctx.eval_batches[0], path, ExportConfig(),
                            ctx.output_names)
    except PassError as e:
        raise PassError(f"prune: the pruned model does not export to ONNX: {e.message}",
                        e.hint) from e
    finally:
        path.unlink(missing_ok=True)
    return {"exporter": rec.get("exporter"), "opset": rec.get("opset")}


# --------------------------------------------------------------------------- taylor


def taylor_gradients(ctx: RunContext, n_batches: int):
    """A function filling each parameter's ``.grad`` from ``n_batches`` training batches.

    The loss: cross-entropy for integer labels, MSE for float targets of the output's
    shape; otherwise a fixed random projection of the outputs (label-free: a channel scores
    by how much the outputs depend on it)."""
    batches: list[Batch] = []
    for b in ctx.source("train").batches():
        batches.append(b)
        if len(batches) >= n_batches:
            break
    specs = ctx.inputs
    seed = ctx.seed

    def fill(model) -> None:
        import torch
        import torch.nn.functional as F

        from compactor.exporting import to_torch, use_kwargs
        from compactor.pruning.graph import _tensors

        kw = use_kwargs(model, specs)
        for i, b in enumerate(batches):
            tensors = to_torch(specs, b.inputs)
            with torch.enable_grad():
                out = model(**{s.name: t for s, t in zip(specs, tensors, strict=True)}) if kw \
                    else model(*tensors)
                y = _tensors(out)[0]
                loss = None
                if b.target is not None:
                    t = torch.from_numpy(b.target)
                    if not t.is_floating_point() and y.dim() == 2 and t.dim() == 1:
                        loss = F.cross_entropy(y, t.long())
                    elif t.is_floating_point() and t.shape == y.shape:
                        loss = F.mse_loss(y, t.to(y.dtype))
                if loss is None:
                    # no usable labels: a random projection of the outputs, so a channel
                    # scores by how far the outputs move with it (their norm alone would
                    # give nothing for normalized embeddings)
                    gen = torch.Generator().manual_seed(seed + i)
                    loss = (y.float() * torch.randn(y.shape, generator=gen)).sum()
                loss.backward()

    return fill
