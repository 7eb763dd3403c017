"""``distill``: torch → torch, knowledge distillation from a teacher into the current stage.

The teacher is the recipe's baseline model (the stage before any pruning) unless
``teacher:`` names another model (a model spec, like the recipe's ``model:``). The student
is the current stage, or, for transformers, the current stage with only some of its layers
kept (``student: {keep_layers: [0, 2, 4]}``).

Losses combine with weights: ``kl`` (Hinton's soft targets at ``temperature``, scaled by
T²), ``ce`` (labels, when the training data has them), ``mse`` and ``cosine`` (outputs, for
embedding and regression models), and feature ``hints`` (a student module's output matched
to a teacher module's with MSE, through a learned projection when widths differ; the
projection is dropped after training; ``hint_mask`` names the input that marks padding, which
the hints then leave out). Left unset, the losses follow the metric: ``kl``
(+ ``ce`` with labels) for classification, ``cosine`` + ``mse`` for ``fidelity``, ``mse``
otherwise, so unlabelled data works out of the box: the student learns from the teacher's
outputs alone.

Those losses train the first output (the labelled one). Every other output of the model is
distilled too, by default with ``nmse`` (MSE over the teacher's variance of that output, so
heads in pixels and in probabilities weigh alike); ``outputs: {name: {loss, weight,
temperature}}`` sets any output's loss and weight (``weight: 0`` leaves it out).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from compactor.errors import DataError, PassError, RecipeError, did_you_mean
from compactor.passes.base import Pass, PassConfig, register
from compactor.spec import ModelSource

if TYPE_CHECKING:
    from compactor.budgets import SizeFloor
    from compactor.data import Batch
    from compactor.passes.base import RunContext
    from compactor.spec import DataSpec, ModelSpec
    from compactor.stage import Stage

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "top5")


# A teacher is a model source like the recipe's ``model:``, without inputs (it is fed the
# recipe's inputs): one spec, one set of rules.
TeacherSpec = ModelSource


class StudentSpec(PassConfig):
    keep_layers: tuple[int, ...] = Field(
        min_length=1, description="indices of the transformer layers the student keeps"
    )
    layers: str | None = Field(
        default=None,
        description="module path of the layer stack (an nn.ModuleList); default: the "
        "largest stack of repeated blocks",
    )

    @model_validator(mode="after")
    def _unique(self) -> StudentSpec:
        if any(i < 0 for i in self.keep_layers):
            raise ValueError("student.keep_layers: layer indices start at 0")
        if len(set(self.keep_layers)) != len(self.keep_layers):
            raise ValueError(f"student.keep_layers: {list(self.keep_layers)} repeats a layer")
        return self


class LossWeightsConfig(PassConfig):
    kl: float = Field(default=0.0, ge=0, description="soft targets at `temperature`, × T²")
    ce: float = Field(default=0.0, ge=0, description="cross-entropy on the data's labels")
    mse: float = Field(default=0.0, ge=0, description="mean squared error to the teacher")
    cosine: float = Field(default=0.0, ge=0, description="1 - cosine to the teacher's output")

    @model_validator(mode="after")
    def _some(self) -> LossWeightsConfig:
        if not any((self.kl, self.ce, self.mse, self.cosine)):
            raise ValueError("losses: give at least one loss a weight above 0 "
                             "(or leave 'losses' out for the default)")
        return self


class OutputLossSpec(PassConfig):
    loss: Literal["kl", "mse", "nmse", "cosine"] = Field(
        default="nmse",
        description="kl: soft targets (logits); mse: squared error in the output's units; "
        "nmse: squared error over the teacher's variance of the output (unit-free); "
        "cosine: 1 - cosine per sample (embeddings)",
    )
    weight: float = Field(default=1.0, ge=0, description="0 leaves the output out")
    temperature: float | None = Field(
        default=None, gt=0, description="kl only; default: the pass's temperature"
    )

    @model_validator(mode="after")
    def _temperature_is_for_kl(self) -> OutputLossSpec:
        if self.temperature is not None and self.loss != "kl":
            raise ValueError(f"temperature applies to loss 'kl', and this output's loss is "
                             f"{self.loss!r}")
        return self


class HintSpec(PassConfig):
    student: str = Field(min_length=1, description="student module name")
    teacher: str = Field(min_length=1, description="teacher module name")
    weight: float = Field(default=1.0, gt=0)


class DistillConfig(PassConfig):
    teacher: TeacherSpec | None = Field(
        default=None, description="default: the recipe's baseline model"
    )
    student: StudentSpec | None = Field(
        default=None, description="default: the current stage as it is"
    )
    losses: LossWeightsConfig | None = Field(
        default=None, description="the first (labelled) output's losses; default: chosen "
        "from the metric and the data's labels"
    )
    outputs: dict[str, OutputLossSpec] = Field(
        default_factory=dict,
        description="per output (by name): its loss and weight; an output not named here is "
        "distilled with the default (the first: 'losses'; the others: nmse, weight 1)",
    )
    temperature: float = Field(default=4.0, gt=0)
    hints: tuple[HintSpec, ...] = ()
    hint_mask: str | None = Field(
        default=None, min_length=1,
        description="a model input (batch × positions, 0 = padding, e.g. attention_mask): the "
        "hints' MSE counts only the positions where it is nonzero",
    )
    epochs: int | None = Field(default=3, ge=1, description="passes over data.train")
    steps: int | None = Field(default=None, ge=1, description="a budget in steps instead")
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup: float = Field(default=0.05, ge=0, lt=1, description="fraction of the steps")
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    select_best: bool = Field(default=True, description="keep the best epoch on eval data")
    patience: int | None = Field(default=None, ge=1, description="early stopping, in epochs")
    min_delta: float = Field(default=0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    freeze: tuple[str, ...] = Field(
        default=(), description="student parameter-name globs kept fixed (e.g. embeddings)"
    )
    cache_teacher: bool = Field(
        default=True,
        description="compute the teacher's outputs (and hinted features) on each training "
        "batch once, not every epoch; they stay in memory",
    )

    @model_validator(mode="before")
    @classmethod
    def _budget(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("steps") is not None:
            if raw.get("epochs") is not None:
                raise ValueError("give 'epochs' or 'steps', not both")
            raw = {**raw, "epochs": None}
        return raw

    @model_validator(mode="after")
    def _mask_needs_hints(self) -> DistillConfig:
        if self.hint_mask is not None and not self.hints:
            raise ValueError("hint_mask applies to feature hints, and no 'hints' are given")
        return self


@register
class DistillPass(Pass):
    name = "distill"
    Config = DistillConfig
    input_kind = "torch"
    output_kind = "torch"
    summary = "knowledge distillation from the baseline (or a teacher) into the current stage"
    distributed = True  # trains data-parallel under torchrun

    @classmethod
    def check_recipe(cls, config: DistillConfig, index: int, model: ModelSpec,
                     data: DataSpec) -> None:
        if model.outputs:
            try:
                _check_output_names(config, list(model.outputs), f"passes[{index}].distill")
            except RecipeError as e:
                raise ValueError(f"{e.message}; {e.hint}") from e
        names = [i.name for i in model.inputs]
        mask = config.hint_mask
        if mask is not None and names and mask not in names:
            hint = did_you_mean(mask, names)
            raise ValueError(
                f"passes[{index}].distill.hint_mask: {mask!r} is not one of the model's "
                f"inputs ({', '.join(names)})" + (f"; {hint}" if hint else "")
            )
        if data.train is None:
            raise ValueError(
                f"passes[{index}] 'distill' trains the model and needs training data: "
                "set data.train (label-free batches are fine)"
            )

    def size_floor(self, floor: SizeFloor) -> SizeFloor | None:
        # trains the model it is given; a student cut from it is smaller by an amount only
        # building it would tell
        return floor if self.config.student is None else None

    def run(self, stage: Stage, ctx: RunContext) -> Stage:
        import torch

        from compactor.training import ddp
        from compactor.training.loop import TrainTask, train

        cfg: DistillConfig = self.config
        device = _device(cfg.device)
        distributed = ddp.ensure_initialized(device.type == "cuda")
        if distributed and device.type == "cuda":
            device = torch.device("cuda", ddp.local_rank())
        torch.manual_seed(ctx.seed)
        record: dict[str, Any] = {"device": str(device)}

        batches = _train_batches(ctx)
        metric = ctx.metric
        weights = _weights_for(cfg, metric.name, batches, record)

        student = copy.deepcopy(stage.module)
        if cfg.student is not None:
            student, record["student"] = keep_layers(student, cfg.student)
        frozen = _freeze(student, cfg.freeze)
        if frozen:
            record["frozen_params"] = sum(p.numel() for p in frozen)
        student.to(device)

        from compactor.exporting import use_kwargs
        from compactor.training.hints import Distillable

        model = Distillable(student, ctx.inputs, use_kwargs(student, ctx.inputs))
        probe = batches[0]
        names = _output_names(_student_outputs(model, probe, device), ctx.output_names)
        heads = _plan_heads(cfg, weights, names, record)
        needs_teacher = any(h.needs_teacher for h in heads) or bool(cfg.hints)
        teacher = _Teacher.build(cfg, ctx, stage, device) if needs_teacher else None
        record["teacher"] = teacher.description if teacher else None
        if any(h.kind == "kl" for h in heads):
            record["temperature"] = cfg.temperature
        cache: dict[int, Any] = {}  # teacher outputs and features per training batch
        try:
            model.attach_hints([h.student for h in cfg.hints])
            if teacher is not None:
                teacher.attach_hints([h.teacher for h in cfg.hints])
            self._check_and_project(model, teacher, probe, heads, names, cfg, device, record)
            heads = _with_variances(heads, teacher, batches, cfg, cache, record,
                                    ctx.progress)
            model.to(device)
            find_unused = _has_unused_params(model, teacher, probe, heads, cfg, device)
            wrapped = ddp.wrap(model, device, find_unused=find_unused)
            step, evaluate = self._step_and_eval(
                model, wrapped, teacher, heads, cache, cfg, ctx, metric, device
            )
            task = TrainTask(model, step, evaluate, batches, metric.name,
                             metric.higher_is_better, device)
            result = train(
                task, _loop_config(cfg, ctx.seed), ctx.checkpoint_dir(), key=ctx.pass_key,
                progress=ctx.progress, resume=ctx.resume, writable=ctx.writes,
                label="distill: train",
            )
        finally:
            model.detach_hints()
            if teacher is not None:
                teacher.close()
        _record_result(result, cfg, metric.name, record, ctx.progress)
        warnings = _report_heads(heads, result, record, ctx.progress)
        for p in frozen:
            p.requires_grad_(True)
        out = model.student.to("cpu").eval()
        return stage.derive("distill", module=out, record=record, warnings=warnings)

    # ------------------------------------------------------------------ pieces

    def _check_and_project(self, model: Any, teacher: _Teacher | None, batch: Batch,
                           heads: Sequence[Any], names: Sequence[str], cfg: DistillConfig,
                           device: Any, record: dict[str, Any]) -> None:
        """One probe batch: the outputs a loss compares must agree in shape; hint widths
        get their projections."""
        import torch

        model.eval()
        with torch.no_grad():
            s_outs, s_feats = model(_tensors(batch, model.specs, device))
        record["outputs"] = {
            n: {"shape": list(o.shape[1:]), "losses": {h.kind: h.weight for h in heads
                                                       if h.index == i}}
            for i, (n, o) in enumerate(zip(names, s_outs, strict=True))
        }
        if teacher is None:
            return
        t_outs, t_feats = teacher(batch)
        _check_output_shapes(heads, names, s_outs, t_outs)
        projections: list[Any] = []
        for h, s, t in zip(cfg.hints, s_feats, t_feats, strict=True):
            from compactor.training.losses import make_projection

            try:
                proj = make_projection(s, t)
            except ValueError as e:
                raise PassError(
                    f"distill: hint {h.student} → {h.teacher}: {e}",
                    "pair modules whose outputs differ only in width (channels or hidden "
                    "size): same batch, same spatial size / sequence length",
                ) from e
            projections.append(proj)
        model.set_projections(projections)
        if cfg.hint_mask is not None:
            mask_shape = list(batch.inputs[cfg.hint_mask].shape)
            for h, s, t in zip(cfg.hints, s_feats, t_feats, strict=True):
                if any(list(f.shape[:len(mask_shape)]) != mask_shape for f in (s, t)):
                    raise PassError(
                        f"distill: hint_mask {cfg.hint_mask!r} has shape {mask_shape} on the "
                        f"probe batch, and hint {h.student} → {h.teacher} has features of "
                        f"shape {list(s.shape)} (student) and {list(t.shape)} (teacher)",
                        "a hint mask fits features that start with its (batch, positions) "
                        "axes, such as a transformer's hidden states; drop hint_mask otherwise",
                    )
            record["hint_mask"] = cfg.hint_mask
        record["hints"] = [
            {"student": h.student, "teacher": h.teacher, "weight": h.weight,
             "student_shape": list(s.shape[1:]), "teacher_shape": list(t.shape[1:]),
             "projection": None if p is None else type(p).__name__}
            for h, s, t, p in zip(cfg.hints, s_feats, t_feats, projections, strict=True)
        ]

    def _step_and_eval(self, model: Any, wrapped: Any, teacher: _Teacher | None,
                       heads: Sequence[Any], cache: dict[int, Any], cfg: DistillConfig,
                       ctx: RunContext, metric: Any, device: Any):
        import torch

        from compactor.training.loop import EvalResult
        from compactor.training.losses import DistillLoss

        loss_fn = DistillLoss(None, cfg.temperature, [h.weight for h in cfg.hints], heads)
        specs = model.specs

        def step(batch: Batch):
            t_outs, t_feats = _teacher_outputs(teacher, batch, cfg, cache)
            s_outs, s_feats = wrapped(_tensors(batch, specs, device))
            labels = _labels(batch, device) if loss_fn.needs_labels else None
            loss, parts = loss_fn(s_outs, t_outs, labels, s_feats, t_feats,
                                  _hint_mask(batch, cfg, device))
            return loss, parts, batch.size

        eval_batches = ctx.eval_batches
        eval_has_labels = all(b.target is not None for b in eval_batches)
        # the output losses only (hinted features are not captured in evaluation)
        eval_loss_fn = DistillLoss(None, cfg.temperature, (), heads)
        if not eval_has_labels:
            eval_loss_fn = eval_loss_fn.without_labels()
        teacher_eval_all = ([teacher(b)[0] for b in eval_batches] if teacher is not None
                            else None)
        # the first output of each, as the metric's reference takes them
        teacher_eval = ([t[0] for t in teacher_eval_all] if teacher_eval_all is not None
                        else None)
        from compactor.data import PerBatch

        # per batch: batches padded to their own length give outputs of different shapes
        targets = PerBatch.of(b.target for b in eval_batches) if eval_has_labels else None
        reference = None
        if metric.needs_reference:
            reference = _reference_outputs(ctx, eval_batches, teacher_eval)

        def evaluate() -> EvalResult:
            model.eval()
            outs, total, n = [], 0.0, 0
            parts_sum: dict[str, float] = {}
            with torch.no_grad():
                for i, b in enumerate(eval_batches):
                    s_outs, _ = model(_tensors(b, specs, device))
                    outs.append([o.float().cpu().numpy() for o in s_outs])
                    t_outs = teacher_eval_all[i] if teacher_eval_all is not None else None
                    if eval_loss_fn.heads and (t_outs is not None or not
                                               eval_loss_fn.needs_teacher):
                        labels = _labels(b, device) if eval_loss_fn.needs_labels else None
                        loss, parts = eval_loss_fn(s_outs, t_outs, labels)
                        total += float(loss) * b.size
                        n += b.size
                        for k, v in parts.items():
                            parts_sum[k] = parts_sum.get(k, 0.0) + float(v) * b.size
            value = metric.score(_scored_outputs(outs, reference), targets, reference)
            parts = {k: v / n for k, v in parts_sum.items()} if n and len(parts_sum) > 1 else {}
            return EvalResult(value=value, loss=total / n if n else 0.0, parts=parts)

        return step, evaluate


# --------------------------------------------------------------------------- helpers


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise PassError("distill: device 'cuda' was asked for and no CUDA device is available",
                        "use device: auto (CUDA when available, else CPU)")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _freeze(student: Any, patterns: Sequence[str]) -> list[Any]:
    """Turn off gradients of the parameters matching ``patterns``; return them."""
    import fnmatch

    if not patterns:
        return []
    named = dict(student.named_parameters())
    out = []
    for i, pattern in enumerate(patterns):
        hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            hint = did_you_mean(pattern, list(named))
            raise RecipeError(
                f"distill: freeze[{i}]: {pattern!r} matches no parameter of the student",
                (hint + " " if hint else "") + "patterns are globs over parameter names, "
                f"e.g. {', '.join(list(named)[:3])}",
            )
        out.extend(named[n] for n in hits)
    unique = list({id(p): p for p in out}.values())
    for p in unique:
        p.requires_grad_(False)
    return unique


def _weights_for(cfg: DistillConfig, metric: str, batches: Sequence[Batch],
                 record: dict[str, Any]):
    """The loss weights to train with; ``ce`` needs labelled training batches."""
    has_labels = all(b.target is not None for b in batches)
    weights = _loss_weights(cfg, metric, has_labels)
    record["losses"] = weights.active()
    if weights.ce and not has_labels:
        raise DataError(
            "distill: losses.ce needs labels, and data.train yields batches without targets",
            "yield (inputs, target) training batches, or drop 'ce' (label-free "
            "distillation learns from the teacher's outputs alone)",
        )
    return weights


def _check_output_names(cfg: DistillConfig, names: Sequence[str], where: str) -> None:
    """Every name in ``outputs`` is one of the model's; the first output's losses are set
    once (by ``losses`` or by its ``outputs`` entry)."""
    for name in cfg.outputs:
        if name not in names:
            hint = did_you_mean(name, list(names))
            raise RecipeError(
                f"{where}.outputs: {name!r} is not one of the model's outputs "
                f"({', '.join(names)})",
                (hint + " " if hint else "") + "outputs are named by model.outputs in the "
                "recipe, else as exported: 'output' for one, 'output_0', 'output_1', ... "
                "for several",
            )
    if cfg.losses is not None and names and names[0] in cfg.outputs:
        raise RecipeError(
            f"{where}: the first output {names[0]!r} has its losses set twice, by 'losses' "
            f"and by 'outputs.{names[0]}'",
            "keep one of them",
        )


def _student_outputs(model: Any, batch: Batch, device: Any) -> tuple:
    """The student's outputs on one batch (in eval mode, without gradients)."""
    import torch

    model.eval()
    with torch.no_grad():
        outs, _ = model(_tensors(batch, model.specs, device))
    if not outs:
        raise PassError("distill: the student's forward() returned no tensor",
                        "return the model's outputs as a tensor, a tuple or a dict of tensors")
    return outs


def _output_names(outputs: Sequence[Any], given: Sequence[str]) -> list[str]:
    """The outputs' names: the recipe's ``model.outputs``, else the exported defaults."""
    from compactor.exporting import default_output_names

    n = len(outputs)
    if len(given) > n:
        raise PassError(
            f"distill: model.outputs names {len(given)} outputs ({', '.join(given)}) and "
            f"the student returns {n}",
            "name as many outputs as forward() returns, in its order",
        )
    return list(given) + default_output_names(n)[len(given):]


def _plan_heads(cfg: DistillConfig, weights: Any, names: Sequence[str],
                record: dict[str, Any]) -> list[Any]:
    """The loss terms on each output: the first with ``losses`` (or the metric's default),
    the others ``nmse``, each replaced by its ``outputs`` entry when it has one."""
    from compactor.training.losses import HeadLoss

    _check_output_names(cfg, names, "distill")
    several = len(names) > 1
    heads: list[HeadLoss] = []
    for i, name in enumerate(names):
        label = name if several else ""
        spec = cfg.outputs.get(name)
        if spec is not None:
            heads.append(HeadLoss(i, label, spec.loss, spec.weight,
                                  spec.temperature or cfg.temperature))
        elif i == 0:
            heads.extend(weights.heads(cfg.temperature, 0, label))
        else:
            heads.append(HeadLoss(i, label, "nmse", 1.0, cfg.temperature))
    heads = [h for h in heads if h.weight > 0]
    if not heads and not cfg.hints:
        raise RecipeError(
            "distill: every output has weight 0 and there are no hints: nothing to distill",
            "give at least one output a weight above 0",
        )
    record["losses"] = {h.kind: h.weight for h in heads if h.index == 0}
    return heads


def _check_output_shapes(heads: Sequence[Any], names: Sequence[str], s_outs: Sequence[Any],
                         t_outs: Sequence[Any]) -> None:
    """Each output a teacher loss compares has the same shape in teacher and student."""
    several = len(names) > 1
    for i, name in enumerate(names):
        used = [h.kind for h in heads if h.index == i and h.needs_teacher]
        if not used:
            continue
        what = f"output {name!r}" if several else "output"
        if i >= len(t_outs):
            raise PassError(
                f"distill: the teacher returns {len(t_outs)} output(s) and the student "
                f"{len(s_outs)}; the student's {what} has no teacher output to match",
                f"give {name!r} weight 0 under 'outputs', or use a teacher with the "
                "student's outputs",
            )
        s_shape, t_shape = list(s_outs[i].shape), list(t_outs[i].shape)
        if s_shape != t_shape:
            raise PassError(
                f"distill: the teacher's {what} has shape {t_shape} and the student's "
                f"{s_shape} on the same batch; {', '.join(used)} need them equal",
                "use a teacher with the student's outputs (same classes, same embedding "
                "width), or distill through feature hints only",
            )


# without a cache, nmse's variances come from this many training batches (extra teacher runs)
VARIANCE_BATCHES = 8


def _with_variances(heads: Sequence[Any], teacher: _Teacher | None, batches: Sequence[Batch],
                    cfg: DistillConfig, cache: dict[int, Any], record: dict[str, Any],
                    progress: Any) -> list[Any]:
    """``nmse`` heads with the teacher's variance of their output over the training batches
    (every batch when the teacher's outputs are cached: the cache is filled here, so the
    teacher still runs once per batch; else the first VARIANCE_BATCHES)."""
    wanted = sorted({h.index for h in heads if h.kind == "nmse"})
    if not wanted or teacher is None:
        return list(heads)
    sums = {i: [0.0, 0.0, 0] for i in wanted}
    seen = batches if cfg.cache_teacher else batches[:VARIANCE_BATCHES]
    with progress.task("distill: teacher outputs", total=len(seen)) as bar:
        for b in seen:
            t_outs, _ = _teacher_outputs(teacher, b, cfg, cache)
            for i in wanted:
                t = t_outs[i].detach().double()
                acc = sums[i]
                acc[0] += float(t.sum())
                acc[1] += float(t.square().sum())
                acc[2] += t.numel()
            bar.advance()
    variances = {}
    for i, (s1, s2, n) in sums.items():
        mean = s1 / max(n, 1)
        variances[i] = max(s2 / max(n, 1) - mean * mean, 0.0)
    out = [dataclasses.replace(h, variance=variances[h.index]) if h.kind == "nmse" else h
           for h in heads]
    for i, entry in enumerate(record.get("outputs", {}).values()):
        if i in variances:
            entry["teacher_variance"] = float(f"{variances[i]:.6g}")
    return out


def _teacher_outputs(teacher: _Teacher | None, batch: Batch, cfg: DistillConfig,
                     cache: dict[int, Any]) -> tuple[Any, list]:
    """The teacher's outputs and hinted features on ``batch``, from the cache when it has
    them (the batches are the same objects every epoch)."""
    if teacher is None:
        return None, []
    if cfg.cache_teacher and id(batch) in cache:
        return cache[id(batch)]
    got = teacher(batch)
    if cfg.cache_teacher:
        cache[id(batch)] = got
    return got


def _report_heads(heads: Sequence[Any], result: Any, record: dict[str, Any],
                  progress: Any) -> tuple[str, ...]:
    """Each output's eval loss at the kept epoch, said to the user; a warning for a head
    whose error is no smaller than the teacher's own spread (a constant would do as well)."""
    if len(record.get("outputs", {})) < 2 or not result.history:
        return ()
    kept = result.history[record["kept_epoch"] - 1]
    parts = kept.get("eval_parts") or {}
    if not parts:
        return ()
    progress.note("distill: eval loss per output at the kept epoch: "
                  + " · ".join(f"{k} {v:.4g}" for k, v in parts.items()))
    warnings = []
    for h in heads:
        if h.kind != "nmse" or h.part not in parts or h.variance <= 0:
            continue
        ratio = parts[h.part] / h.weight
        record["outputs"][h.name]["eval_nmse"] = round(ratio, 6)
        if ratio >= 1.0:
            warnings.append(
                f"distill: output {h.name!r} ends with a squared error {ratio:.2f}× the "
                "teacher's variance on the eval data: no better than predicting a constant"
            )
    return tuple(warnings)


def _loop_config(cfg: DistillConfig, seed: int):
    from compactor.training.loop import LoopConfig

    return LoopConfig(
        epochs=cfg.epochs or 1, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup=cfg.warmup, schedule=cfg.schedule, max_grad_norm=cfg.max_grad_norm,
        select_best=cfg.select_best, patience=cfg.patience, min_delta=cfg.min_delta,
        seed=seed,
    )


def _record_result(result: Any, cfg: DistillConfig, metric: str, record: dict[str, Any],
                   progress: Any) -> None:
    """What training did, in the record, and which epoch was kept, said to the user."""
    record.update(result.to_record())
    record["kept_epoch"] = result.best_epoch if cfg.select_best else result.epochs
    if result.history:
        kept = result.history[record["kept_epoch"] - 1]
        progress.note(
            f"distill: kept epoch {record['kept_epoch']}/{result.epochs} "
            f"({'the best; ' if cfg.select_best else 'the last; '}"
            f"{metric} {kept[metric]:.4g} in torch)"
            + (", stopped early" if result.stopped_early else "")
            + (f", resumed at step {result.resumed_from['step']}"
               if result.resumed_from else "")
        )


def _train_batches(ctx: RunContext) -> list[Batch]:
    if ctx.data.spec.train is None:
        raise DataError("distill needs training data, and data.train is not set",
                        "add 'data: {train: data.py:fn}' (or a .npz file) to the recipe")
    return ctx.source("train").take()


def _loss_weights(cfg: DistillConfig, metric: str, has_labels: bool):
    from compactor.training.losses import LossWeights

    if cfg.losses is not None:
        return LossWeights.from_mapping(cfg.losses.model_dump())
    if metric in CLASSIFICATION_METRICS:
        return LossWeights(kl=1.0, ce=0.5 if has_labels else 0.0)
    if metric == "fidelity":
        return LossWeights(cosine=1.0, mse=1.0)
    return LossWeights(mse=1.0)


def _tensors(batch: Batch, specs: Sequence[Any], device: Any) -> list:
    import torch

    return [torch.from_numpy(np.asarray(batch.inputs[s.name], order="C")).to(device)
            for s in specs]


def _hint_mask(batch: Batch, cfg: DistillConfig, device: Any):
    import torch

    if cfg.hint_mask is None:
        return None
    return torch.from_numpy(np.asarray(batch.inputs[cfg.hint_mask], order="C")).to(device)


def _labels(batch: Batch, device: Any):
    import torch

    return torch.from_numpy(np.asarray(batch.target, order="C")).to(device)


def _scored_outputs(outs: list[list[np.ndarray]], reference: Any):
    """The student's eval outputs as the metric scores them: every output under the
    baseline's names when the reference has them all (the pipeline's baseline outputs),
    else the first output alone."""
    from compactor.data import Outputs, PerBatch

    if isinstance(reference, Outputs) and outs and len(outs[0]) == len(reference.names):
        return Outputs.of(reference.names, outs)
    return PerBatch.of(o[0] for o in outs)


def _reference_outputs(ctx: RunContext, batches: Sequence[Batch], teacher_eval):
    """The baseline's outputs on each eval batch, for metrics measured against it: every
    output as the pipeline evaluated the baseline (so the metric scores every head), else
    the first output, computed here."""
    import torch

    from compactor.data import Outputs, PerBatch

    known = ctx.reference.outputs
    if isinstance(known, Outputs) and known.sizes == tuple(b.size for b in batches):
        return known
    from compactor.exporting import call_module
    from compactor.training.hints import first_tensor

    base = ctx.baseline
    if base is None or base.kind != "torch":
        if teacher_eval is None:
            raise PassError("distill: the metric compares to the baseline's outputs, "
                            "which are not available", "use another metric")
        return PerBatch.of(t.float().cpu().numpy() for t in teacher_eval)
    outs = []
    with torch.inference_mode():
        for b in batches:
            out = first_tensor(call_module(base.module, ctx.inputs, b.inputs))
            outs.append(out.float().cpu().numpy())
    return PerBatch.of(outs)


def _import_nn():
    from torch import nn

    return nn


class _Teacher:
    """The teacher's forward pass: every output and the hinted features, without
    gradients."""

    def __init__(self, description: str, device: Any, module: Any = None, session: Any = None,
                 specs: Sequence[Any] = (), use_kw: bool = False):
        self.description = description
        self.device = device
        self.module = module
        self.session = session
        self.specs = tuple(specs)
        self.use_kw = use_kw
        from compactor.training.hints import FeatureCapture

        self.capture = FeatureCapture()

    @classmethod
    def build(cls, cfg: DistillConfig, ctx: RunContext, stage: Stage, device: Any) -> _Teacher:
        from compactor.exporting import use_kwargs

        if cfg.teacher is None:
            base = ctx.baseline
            if base is None or base.kind != "torch":
                raise PassError("distill: no torch baseline to teach from",
                                "name a teacher with 'teacher: {factory: ...}'")
            module, desc = base.module, "baseline"
        else:
            from compactor.model import load_model
            from compactor.spec import ModelSpec

            spec = ModelSpec(**cfg.teacher.model_dump(exclude_defaults=True),
                             inputs=ctx.inputs)
            loaded, _files = load_model(spec, ctx.base_dir)
            desc = f"teacher {cfg.teacher.describe()}"
            if loaded.kind == "onnx":
                if cfg.hints:
                    raise RecipeError(
                        "distill: feature hints need a torch teacher; this teacher is ONNX",
                        "give the teacher as a factory or torchscript model, or drop hints",
                    )
                from compactor.measure.latency import session

                return cls(desc, device, session=session(loaded.onnx_path), specs=ctx.inputs)
            module = loaded.module
        # The student is a deep copy, so the teacher is never trained; on a GPU the teacher is
        # copied too, because .to() moves a module in place and the baseline must stay as is.
        if device.type != "cpu":
            module = copy.deepcopy(module)  # .to() moves in place; the baseline stays as is
        module.to(device)
        return cls(desc, device, module=module, specs=ctx.inputs,
                   use_kw=use_kwargs(module, ctx.inputs))

    def attach_hints(self, names: Sequence[str]) -> None:
        if names:
            self.capture.attach(self.module, names, "teacher")

    def close(self) -> None:
        self.capture.detach()

    def __call__(self, batch: Batch):
        import torch

        from compactor.training.hints import output_tensors

        if self.session is not None:
            names = {i.name for i in self.session.get_inputs()}
            res = self.session.run(None, {k: v for k, v in batch.inputs.items() if k in names})
            return tuple(torch.from_numpy(r).to(self.device) for r in res), []
        tensors = _tensors(batch, self.specs, self.device)
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            if self.use_kw:
                out = self.module(**{s.name: t for s, t in zip(self.specs, tensors, strict=True)})
            else:
                out = self.module(*tensors)
        if was_training:
            self.module.train()
        return tuple(t.detach() for t in output_tensors(out)), list(self.capture.features)


def _has_unused_params(model: Any, teacher: _Teacher | None, batch: Batch,
                       heads: Sequence[Any], cfg: DistillConfig, device: Any) -> bool:
    """Whether some trainable parameter gets no gradient (DDP must then be told so).

    Found with one probe step whose side effects (BatchNorm statistics, the RNG) are
    undone, so a distributed run starts from the same state as a single-process one."""
    import torch

    from compactor.training import ddp
    from compactor.training.losses import DistillLoss

    if not ddp.initialized():
        return False
    loss_fn = DistillLoss(None, cfg.temperature, [h.weight for h in cfg.hints], heads)
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.train()
        t_outs, t_feats = teacher(batch) if teacher is not None else (None, [])
        s_outs, s_feats = model(_tensors(batch, model.specs, device))
        labels = _labels(batch, device) if loss_fn.needs_labels else None
        loss, _ = loss_fn(s_outs, t_outs, labels, s_feats, t_feats,
                          _hint_mask(batch, cfg, device))
        model.zero_grad(set_to_none=True)
        loss.backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return unused


# --------------------------------------------------------------------------- students


def find_layer_stack(module: Any, path: str | None = None) -> tuple[str, Any]:
    """The transformer's stack of layers: the named nn.ModuleList, or the one of repeated
    blocks holding the most parameters."""
    nn = _import_nn()
    modules = dict(module.named_modules())
    if path is not None:
        found = modules.get(path)
        if not isinstance(found, nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            hint = did_you_mean(path, lists)
            raise RecipeError(
                f"distill: student.layers: {path!r} is not an nn.ModuleList of the model",
                (hint + " " if hint else "") + (
                    f"layer stacks in this model: {', '.join(lists[:6])}" if lists
                    else "this model has no nn.ModuleList"),
            )
        return path, found
    candidates = [
        (n, m) for n, m in modules.items()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        raise PassError(
            "distill: student.keep_layers: found no stack of repeated layers in the model",
            "keep_layers works on models whose layers sit in an nn.ModuleList (transformers); "
            "name it with student.layers",
        )
    return max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def keep_layers(module: Any, spec: StudentSpec) -> tuple[Any, dict[str, Any]]:
    """``module`` (already a copy) with only the layers ``spec.keep_layers`` of its stack."""
    nn = _import_nn()
    path, stack = find_layer_stack(module, spec.layers)
    n = len(stack)
    bad = [i for i in spec.keep_layers if i >= n]
    if bad:
        raise RecipeError(
            f"distill: student.keep_layers: {path} has {n} layers (0-{n - 1}); "
            f"{', '.join(map(str, bad))} does not exist",
            f"choose indices from 0 to {n - 1}",
        )
    kept = nn.ModuleList([stack[i] for i in spec.keep_layers])
    for new_i, layer in enumerate(kept):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_i
    parent_name, _, attr = path.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, kept)
    for sub in module.modules():
        conf = getattr(sub, "config", None)
        if conf is not None and getattr(conf, "num_hidden_layers", None) == n:
            conf.num_hidden_layers = len(kept)
            types = getattr(conf, "layer_types", None)
            if isinstance(types, list) and len(types) == n:
                conf.layer_types = [types[i] for i in spec.keep_layers]
    return module, {"layers": path, "kept": list(spec.keep_layers), "of": n}


