"""``quantize``: ONNX → int8 ONNX that meets an accuracy budget and stays fast.

``mode``: ``static`` (calibrated QDQ/QOperator), ``dynamic`` (int8 weights, activations
quantized per input at run time) or ``auto`` (chosen from the model's op mix). The model is
upgraded to opset 13 if older and pre-processed with ORT's ``quant_pre_process``.

Settings left ``auto`` (format, activation type, op types, reduce_range) are chosen by
measurement: the candidates are timed against the float model on the first target's
profile and the fastest one within the accuracy budget wins; the CPU's int8 instructions
decide which are worth trying. When none is within budget, cheaper fixes come first (another
calibration method, SmoothQuant-style scale migration), then the most sensitive nodes go back
to float until the budget holds on held-out eval data. The search itself lives in
:mod:`compactor.quantization`; this module turns the recipe's settings into a search and its
outcome into the stage record.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from compactor.errors import PassError
from compactor.passes.base import Pass, PassConfig, register
from compactor.quantization.modes import IntType, QuantFormat, QuantMode
from compactor.verdict import Verdict

if TYPE_CHECKING:
    from compactor.budgets import SizeFloor
    from compactor.passes.base import RunContext
    from compactor.quantization.accuracy import Budget
    from compactor.quantization.search import Outcome
    from compactor.spec import DataSpec, ModelSpec
    from compactor.stage import Stage

log = logging.getLogger(__name__)

MIN_CALIBRATION_SAMPLES = 16  # fewer give ranges that depend on which samples were drawn
DEFAULT_CALIBRATION_SAMPLES = 256  # an upper bound: fewer available is no warning
Repair = Literal["calibration", "smoothquant", "fallback"]


class ExcludeConfig(PassConfig):
    nodes: tuple[str, ...] = Field(default=(), description="node-name globs kept in float")
    op_types: tuple[str, ...] = Field(default=(), description="op types kept in float")


class QuantizeConfig(PassConfig):
    mode: Literal["static", "dynamic", "auto"] = Field(
        default="static",
        description="auto: dynamic for MatMul-dominated (transformer) graphs, static for "
        "convolution networks; the stage record says why",
    )
    format: Literal["auto", "qdq", "qoperator"] = Field(
        default="auto", description="static: QDQ pairs or fused QLinear* operators; auto: "
        "both are timed")
    per_channel: bool = Field(default=True, description="one weight scale per output channel")
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        default="auto", description="static: auto times those this CPU runs well")
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool | Literal["auto"] = Field(
        default="auto", description="7-bit weights; auto: on x86 CPUs without VNNI, where "
        "u8s8 products saturate")
    activation_symmetric: bool = Field(default=False, description="static: symmetric ranges")
    weight_symmetric: bool = Field(default=True, description="symmetric weight ranges")
    op_types: Literal["auto", "all", "compute"] | tuple[str, ...] = Field(
        default="auto", description="which op types to quantize: all ORT can, compute "
        "(Conv/MatMul/Gemm), a list, or auto (time both)")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(default=99.999, gt=90, le=100)
    calibration_samples: int = Field(
        default=DEFAULT_CALIBRATION_SAMPLES, ge=1,
        description="calibrate on up to this many samples of data.calibration")
    preprocess: bool = Field(default=True, description="ORT quant_pre_process first")
    transformer_fusion: Literal["auto", "on", "off"] = Field(
        default="auto", description="dynamic int8 of transformer graphs: ONNX Runtime's "
        "fusions (Attention, SkipLayerNorm, BiasGelu) first; auto: fused and unfused "
        "candidates are timed; on: fused only")
    exclude: ExcludeConfig = Field(default_factory=ExcludeConfig,
                                   description="nodes and op types kept in float")
    exclude_nodes: tuple[str, ...] = Field(
        default=(), description="node-name globs kept in float (same as exclude.nodes)")
    exclude_op_types: tuple[str, ...] = Field(
        default=(), description="op types kept in float (same as exclude.op_types)")
    max_accuracy_drop: float | str | None = Field(
        default=None, description="allowed metric drop vs the float input: absolute (0.01) "
        "or relative ('1%'); default: the targets' max_accuracy_drop")
    time_budget_s: float = Field(default=300, gt=0, description="stop the search after this")
    holdout_fraction: float = Field(
        default=0.5, ge=0.1, le=0.9, description="share of eval data held out from the search")
    search_speed: bool = Field(default=True, description="time the candidates on the target")
    repairs: Literal["auto"] | tuple[Repair, ...] = Field(
        default="auto",
        description="fixes tried, in order, when no candidate meets the budget; auto: "
        "calibration, smoothquant, fallback (smoothquant first on MatMul/Gemm models)")
    smoothquant_alpha: float | Literal["auto"] = Field(
        default="auto", description="migration strength; auto: chosen per activation")
    mixed_scale: Literal["auto", "off"] = Field(
        default="auto", description="static: keep float the output-side tensors whose one "
        "int8 range would span values of very different scale (a detector's pixels and "
        "scores in one output); off (or false): quantize them like any tensor")
    keep_float: Literal["auto", "never"] = Field(
        default="auto", description="auto: ship the float input when int8 does not pay "
        "(not resolvably faster in the paired timing, over half the MACs left in float, "
        "or not smaller); never: always ship the best int8 candidate")

    @field_validator("max_accuracy_drop")
    @classmethod
    def _drop(cls, v: float | str | None) -> float | str | None:
        if v is None:
            return v
        from compactor.spec import Drop

        drop = Drop.model_validate(v)  # the recipe's syntax: 0.01 or "2%"
        return drop.model_dump()

    @field_validator("mixed_scale", mode="before")
    @classmethod
    def _mixed_scale(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("smoothquant_alpha")
    @classmethod
    def _alpha(cls, v: float | str) -> float | str:
        if v != "auto" and not 0 < float(v) < 1:
            raise ValueError("smoothquant_alpha is 'auto' or a number between 0 and 1")
        return v


@register
class QuantizePass(Pass):
    name = "quantize"
    Config = QuantizeConfig
    input_kind = "onnx"
    output_kind = "onnx"
    summary = "int8 with ONNX Runtime: fastest configuration within the accuracy budget"

    @classmethod
    def check_recipe(cls, config: QuantizeConfig, index: int, model: ModelSpec,
                     data: DataSpec) -> None:
        if data.calibration is None and config.mode == "static":
            raise ValueError(
                "static quantization needs calibration data: set data.calibration "
                "(or use quantize mode: dynamic)"
            )

    def size_floor(self, floor: SizeFloor) -> SizeFloor | None:
        from dataclasses import replace

        # int8/uint8 weights: one byte each at best (scales and zero points come on top)
        return replace(floor, bytes_per_weight=min(floor.bytes_per_weight, 1.0))

    def run(self, stage: Stage, ctx: RunContext) -> Stage:
        from compactor.quantization import prepare
        from compactor.quantization.search import BuildFailed

        cfg: QuantizeConfig = self.config
        t0 = time.monotonic()
        step = f"{len(stage.lineage):02d}-quantize"
        work = ctx.work_path(f"{step}-search")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        record: dict[str, Any] = {}
        prep = self._prepare(stage.onnx_path, ctx, work, record)
        t_prep = time.monotonic()
        search, judge, budget = self._search(prep, ctx, work, record)
        t_setup = time.monotonic()
        # time_budget_s bounds the whole pass, preparation included (the search keeps a
        # quarter of it whatever preparation took)
        search.limit_to(t0 + cfg.time_budget_s, 0.25 * cfg.time_budget_s)
        out = ctx.work_path(f"{step}.onnx")
        try:
            with ctx.progress.task("quantize: search") as task:
                search.env.on_step = _status(task)
                outcome = search.run()
                decision = self._pays(search, outcome, prep, stage.onnx_path)
            if decision.keep_float and cfg.keep_float == "auto":
                out = _copy_model(stage.onnx_path, out)
            else:
                shutil.copyfile(outcome.chosen.path, out)
        except BuildFailed as e:
            raise PassError(
                f"quantize ({prep.mode}) failed: none of the {e.tried} int8 candidate(s) "
                f"could be built; the first error: {prepare.first_line(e.first)}",
                "try mode: dynamic, or exclude the failing node with exclude.nodes",
            ) from e.first
        finally:  # every candidate is a full model: do not leave them in the run folder
            shutil.rmtree(work, ignore_errors=True)
        kept = decision.keep_float and cfg.keep_float == "auto"
        self._record(record, outcome, budget, judge, prep.model, prep.sample, cfg, kept)
        _outcome_record(record, decision, cfg, kept)
        record["search"]["seconds"] = round(outcome.seconds, 2)
        record["search"]["pass_seconds"] = round(time.monotonic() - t0, 2)
        record["search"]["phases"] = {
            "prepare": round(t_prep - t0, 2),  # opset, pre-processing, transformer fusion
            "calibration_and_reference": round(t_setup - t_prep, 2),
            **record["search"].get("phases", {})}
        record.update(_int8_summary(out))
        return stage.derive("quantize", kind="onnx", onnx_path=out, record=record,
                            warnings=tuple(record.pop("warnings", ())),
                            verdict=record.pop("verdict", None))

    def _pays(self, search, outcome: Outcome, prep: _Prepared, src: Path):
        """Whether the chosen int8 candidate is worth shipping (see
        :mod:`compactor.quantization.keep_float`). A chosen candidate the search never
        timed (one candidate only) is timed against float here, when timing is on."""
        from compactor.measure.size import size_bytes
        from compactor.quantization import keep_float

        cfg: QuantizeConfig = self.config
        chosen = outcome.chosen
        if chosen.speedup is None and cfg.search_speed and cfg.keep_float == "auto":
            search.time([chosen], "the chosen candidate vs float (keep_float)")
            outcome.float_p50_ms = search.float_p50
            outcome.log["timings"] = search.timings
        # The nodes the accuracy fallback put back (not those the recipe excluded: the
        # user chose those)
        share = keep_float.float_mac_share(
            prep.model, {k: v.shape for k, v in prep.sample.items()},
            tuple(s.node for _, s in outcome.fallback)) if outcome.fallback else None
        return keep_float.decide(chosen.speedup, chosen.speedup_low,
                                 size_bytes(chosen.path), size_bytes(src), share)

    # ------------------------------------------------------------------ setup

    def _prepare(self, src: Path, ctx: RunContext, work: Path, record: dict[str, Any]
                 ) -> _Prepared:
        """The float model as the search starts from it, the mode (``auto`` resolved here,
        once) and the int8 settings this CPU calls for."""
        import onnx

        from compactor.quantization import isa as isa_mod
        from compactor.quantization import prepare

        cfg: QuantizeConfig = self.config
        src = prepare.ensure_opset(src, work / "opset.onnx", record)
        if cfg.preprocess:
            src = prepare.preprocess(src, work / "pre.onnx", record)
        src = prepare.gemm_bias_as_vector(src, work / "gemm-bias.onnx", record)
        model = onnx.load(str(src), load_external_data=False)

        sample = ctx.latency_feeds(1)
        mix = prepare.op_mix(model, {k: v.shape for k, v in sample.items()})
        has_calibration = ctx.data.spec.calibration is not None
        mode, why = prepare.resolve_mode(cfg.mode, mix, has_calibration)
        record.update(mode=mode.value, mode_reason=why, op_mix=mix.to_dict())
        if mode == QuantMode.DYNAMIC:
            converted = prepare.gemm_to_matmul(src, work / "matmul.onnx", record)
            if converted != src:
                src = converted
                model = onnx.load(str(src), load_external_data=False)

        fused = self._fuse(src, model, mode, mix, ctx, work, record)

        isa = isa_mod.detect()
        choice = isa_mod.choose(isa, mode, cfg.activation_type, cfg.reduce_range,
                                cfg.weight_type)
        record["isa"] = {"int8_path": isa.path, "no_saturation": isa.no_saturation,
                         "flags": list(isa.flags), "machine": isa.machine}
        record["int8_choice"] = choice.to_dict()
        if choice.warning:
            record.setdefault("warnings", []).append(choice.warning)
        return _Prepared(src, model, sample, mix, mode, fused, choice)

    def _search(self, prep: _Prepared, ctx: RunContext, work: Path, record: dict[str, Any]):
        """The search over the recipe's settings, with its judge and budget."""
        from compactor.quantization.search import Search

        cfg: QuantizeConfig = self.config
        excluded = self._exclusions(prep.model, record)
        excluded_types = tuple(sorted({*cfg.exclude.op_types, *cfg.exclude_op_types}))
        calibration = None
        if prep.mode == QuantMode.STATIC:
            calibration = self._calibration(prep.model, ctx, work, record)
            if cfg.mixed_scale == "auto":
                excluded = _protect_mixed_scale(prep, calibration, work, excluded, record)
        judge, budget = self._judge(prep.src, ctx, record)
        space = self._space(cfg, prep.mode, prep.src, prep.choice, excluded, excluded_types)
        space.fused, space.fused_only = prep.fused, cfg.transformer_fusion == "on"
        if cfg.repairs == "auto":
            # Outlier channels, not ranges, are what hurts MatMul models: SmoothQuant first.
            space.repairs = (("smoothquant", "calibration", "fallback")
                             if prep.mix.share("MatMul", "Gemm") >= 0.5
                             else ("calibration", "smoothquant", "fallback"))
        env = self._env(ctx, judge, calibration, work, prep.model, cfg)
        return Search(prep.src, space, env), judge, budget

    def _fuse(self, src: Path, model, mode: QuantMode, mix, ctx: RunContext, work: Path,
              record: dict[str, Any]) -> Path | None:
        """The transformer-fused form of ``src``, when it applies (dynamic int8 of a graph
        with attention) and fuses something; timed against the unfused one in the search."""
        from compactor.quantization import prepare

        cfg: QuantizeConfig = self.config
        if cfg.transformer_fusion == "off" or (cfg.transformer_fusion == "auto"
                                               and not cfg.search_speed):
            return None
        if mode != QuantMode.DYNAMIC or not mix.softmax:
            if cfg.transformer_fusion == "on":
                record.setdefault("warnings", []).append(
                    "transformer_fusion: on applies to dynamic int8 of graphs with attention "
                    f"(Softmax); this is {mode} int8 with {mix.softmax} Softmax node(s): "
                    "not fused")
            return None
        feeds, _ = prepare.fit_batches(model, ctx.eval_batches[:2], "eval")
        with ctx.progress.task("quantize: transformer fusion"):
            fused = prepare.fuse_transformer(src, work / "fused.onnx", feeds[:2], record)
        if fused is None and cfg.transformer_fusion == "on":
            reason = record["transformer_fusion"].get("reason", "")
            record.setdefault("warnings", []).append(
                f"transformer_fusion: on, but the model was not fused ({reason})")
        return fused

    def _exclusions(self, model, record: dict[str, Any]) -> tuple[str, ...]:
        from compactor.quantization.prepare import match_nodes

        cfg: QuantizeConfig = self.config
        matched = match_nodes(model, cfg.exclude.nodes, "exclude.nodes", record)
        matched += match_nodes(model, cfg.exclude_nodes, "exclude_nodes", record)
        if cfg.exclude_nodes or cfg.exclude.nodes:
            record["excluded_nodes"] = sorted(set(matched))
        return tuple(sorted(set(matched)))

    def _calibration(self, model, ctx: RunContext, work: Path, record: dict[str, Any]):
        from compactor.quantization.candidates import Calibration
        from compactor.quantization.prepare import fit_batches

        cfg: QuantizeConfig = self.config
        batches = ctx.calibration_batches(cfg.calibration_samples)
        feeds, used = fit_batches(model, batches, "calibration")
        record["calibration_samples"] = used
        if used < cfg.calibration_samples and used < MIN_CALIBRATION_SAMPLES:
            record.setdefault("warnings", []).append(
                f"only {used} calibration samples (asked for {cfg.calibration_samples}); "
                f"activation ranges from so few are unreliable: give at least "
                f"{MIN_CALIBRATION_SAMPLES}, ideally 100 or more")
        elif used < cfg.calibration_samples and (
                cfg.calibration_samples != DEFAULT_CALIBRATION_SAMPLES):
            record.setdefault("warnings", []).append(
                f"asked for {cfg.calibration_samples} calibration samples, the data has "
                f"{used}; calibrated on {used}")
        elif used < MIN_CALIBRATION_SAMPLES:
            record.setdefault("warnings", []).append(
                f"only {used} calibration samples: activation ranges from so few are "
                f"unreliable; use at least {MIN_CALIBRATION_SAMPLES}, ideally 100 or more")
        return Calibration(feeds, used, work)

    def _judge(self, src: Path, ctx: RunContext, record: dict[str, Any]):
        from compactor.quantization.accuracy import AccuracyJudge

        cfg: QuantizeConfig = self.config
        metric = ctx.metric
        baseline = ctx.reference.outputs
        last = ctx.step.input_outputs
        budget_fn = _budget_resolver(cfg, ctx, metric)
        with ctx.progress.task("quantize: reference outputs"):
            judge = AccuracyJudge(metric, ctx.eval_batches, src, budget_fn, baseline,
                                  cfg.holdout_fraction, ctx.seed, input_outputs=last)
        return judge, judge.budget

    def _space(self, cfg: QuantizeConfig, mode: QuantMode, src: Path, choice, excluded,
               excluded_types):
        from compactor.quantization.candidates import Candidate
        from compactor.quantization.search import default_space

        base = Candidate(
            mode=mode, source=src, per_channel=cfg.per_channel,
            weight_type=IntType(cfg.weight_type), reduce_range=choice.reduce_range,
            activation_type=choice.activation_types[0],
            calibration_method=cfg.calibration_method, percentile=cfg.percentile,
            activation_symmetric=cfg.activation_symmetric,
            weight_symmetric=cfg.weight_symmetric, exclude=excluded,
            format=QuantFormat.QDQ if cfg.format == "auto" else QuantFormat(cfg.format),
        )
        formats = tuple(QuantFormat) if cfg.format == "auto" else (QuantFormat(cfg.format),)
        acts = choice.activation_types
        op_types = cfg.op_types
        if not cfg.search_speed:  # one candidate: the first choice of each setting
            formats, acts = formats[:1], acts[:1]
            op_types = "all" if op_types == "auto" else op_types
        weights = choice.weight_options if cfg.search_speed else choice.weight_options[:1]
        return default_space(
            base, formats, acts, op_types, excluded_types=excluded_types,
            weight_options=tuple(weights),
            repairs=() if cfg.repairs == "auto" else cfg.repairs,
            smoothquant_alpha=None if cfg.smoothquant_alpha == "auto"
            else float(cfg.smoothquant_alpha),
        )

    def _env(self, ctx: RunContext, judge, calibration, work: Path, model, cfg):
        from compactor.quantization.prepare import fit_batches
        from compactor.quantization.search import SearchEnv

        run_batch = ctx.eval_batches[0].size
        if calibration is not None:
            analysis = calibration.feeds
        elif ctx.data.spec.calibration is not None:
            analysis, _ = fit_batches(model, ctx.calibration_batches(64), "calibration")
        else:  # the search part only: held-out samples never steer the search
            analysis, _ = fit_batches(model, judge.search_batches(64), "eval")
        # One feed per run as served: a dynamic range spans one run's whole tensor.
        axes = {s.name: s.batch_axis for s in ctx.inputs}
        analysis = _per_run(_cap_samples(analysis, 64, axes), run_batch, axes)
        timer = _timer(ctx, cfg)
        in_processes = getattr(timer, "in_processes", None)  # a test's fake timer has none
        return SearchEnv(work=work, judge=judge, timer=timer, calibration=calibration,
                         analysis_feeds=analysis, run_batch=run_batch,
                         time_budget_s=cfg.time_budget_s,
                         process_timer=(functools.partial(in_processes, folder=work)
                                        if in_processes else None))

    # ------------------------------------------------------------------ the record

    def _record(self, record: dict[str, Any], outcome: Outcome, budget: Budget, judge,
                model, sample, cfg: QuantizeConfig, kept_float: bool = False) -> None:
        c = outcome.chosen.candidate
        record.update(c.settings())
        acc = _accuracy_record(outcome, budget, judge)
        record["accuracy_budget"] = acc
        record["search"] = _search_record(outcome, cfg)
        if outcome.smoothquant:
            record["smoothquant"] = outcome.smoothquant
        _fusion_record(record, outcome)
        record["float_nodes"] = _float_nodes(record, outcome, model, sample, cfg)
        record.setdefault("warnings", []).extend(outcome.warnings)
        if outcome.fallback_cost_ms is not None:
            record["search"]["repair_cost_ms"] = round(outcome.fallback_cost_ms, 4)
        _repairs_record(record, outcome)
        if kept_float:  # the float input ships: its drop against itself is nil
            if not outcome.met:
                acc["note"] = (_unmet_message(outcome, budget, judge)
                               + "; the float input is kept instead")
            if budget.source == "quantize.max_accuracy_drop":
                record["verdict"] = Verdict(
                    budget="quantize.max_accuracy_drop", limit=budget.allowed,
                    measured=0.0, unit=judge.metric.name, status="pass",
                    detail="the float input is kept (keep_float): no int8 drop")
            return
        if not outcome.met:
            msg = _unmet_message(outcome, budget, judge)
            if budget.enforced:
                record.setdefault("warnings", []).append(msg + "; it is kept, marked failing")
            else:  # no budget was set: the guard only steered the choice of candidate
                acc["note"] = (msg + "; no budget is set (quantize.max_accuracy_drop or a "
                               "target's max_accuracy_drop), so this fails nothing")
        if budget.source == "quantize.max_accuracy_drop":
            # The pass's own budget becomes a verdict; a budget taken from the targets is
            # judged there already, on the final stage and all the eval data.
            record["verdict"] = Verdict(
                budget="quantize.max_accuracy_drop",
                limit=budget.allowed,
                measured=_worst_drop(outcome),
                unit=judge.metric.name,
                status="pass" if outcome.met else "fail",
                detail=f"int8 search on eval data ({budget.source}), worst of the search "
                "and held-out parts",
            )


def _protect_mixed_scale(prep: _Prepared, calibration, work: Path,
                         excluded: tuple[str, ...], record: dict[str, Any]) -> tuple[str, ...]:
    """Output-side tensors one int8 range would collapse (a detector's pixels next to its
    scores) are kept float, before any accuracy fallback: the node writing each is excluded,
    so its inputs keep their own ranges. In the record (``mixed_scale``) and a warning."""
    from compactor.quantization import mixed_scale
    from compactor.quantization.prepare import first_line

    try:
        found = mixed_scale.detect(prep.src, prep.model, calibration.feeds, work)
    except Exception as e:  # noqa: BLE001 - the check is a safeguard; its failure is recorded
        record["mixed_scale"] = {"checked": False, "error": first_line(e, 200)}
        record.setdefault("warnings", []).append(
            f"quantize: the mixed-scale check of the outputs failed ({first_line(e, 200)}); "
            "outputs are quantized with one range each")
        return excluded
    new = [m for m in found if m.node not in excluded]
    record["mixed_scale"] = {"checked": True, "tensors": [m.to_dict() for m in new]}
    for m in new:
        record.setdefault("warnings", []).append(
            f"quantize: {m.describe()}; {m.op_type} node '{m.node}' is kept float so that "
            "each of its inputs keeps its own int8 range")
    return tuple(sorted({*excluded, *(m.node for m in new)}))


@dataclass(frozen=True)
class _Prepared:
    """The float model the search starts from, and what was decided about it."""

    src: Path
    model: Any  # onnx.ModelProto of ``src``
    sample: dict[str, Any]  # one sample per input, for MAC counts
    mix: Any  # prepare.OpMix
    mode: QuantMode
    fused: Path | None  # its transformer-fused form, when that applies
    choice: Any  # isa.Int8Choice


def _outcome_record(record: dict[str, Any], decision, cfg: QuantizeConfig,
                    kept: bool) -> None:
    """``outcome``: int8 or kept_float, with the checks' figures; a kept float model (or an
    int8 model kept against the checks by ``keep_float: never``) is a stage warning."""
    record["outcome"] = "kept_float" if kept else "int8"
    record["keep_float"] = {"setting": cfg.keep_float, "checks": decision.checks}
    if not decision.keep_float:
        return
    record["keep_float"]["reason"] = decision.reason
    if kept:
        record.setdefault("warnings", []).append(
            f"quantize kept the float model: {decision.reason}; the int8 candidate "
            f"'{record.get('search', {}).get('chosen', '?')}' is not shipped "
            "(quantize.keep_float: never ships it anyway)")
    else:
        record.setdefault("warnings", []).append(
            f"int8 shipped although it does not pay ({decision.reason}), because "
            "quantize.keep_float is never")


def _copy_model(src: Path, out: Path) -> Path:
    """The float input as the stage's model, the same file content; a model with external
    data files is used where it lies (they are found relative to it)."""
    from compactor.measure.size import model_files

    if len(model_files(src)) > 1:
        return src
    shutil.copyfile(src, out)
    return out


def _worst_drop(outcome: Outcome) -> float:
    chosen = outcome.chosen
    return max(chosen.search.drop, chosen.holdout.drop if chosen.holdout else 0.0)


def _repairs_record(record: dict[str, Any], outcome: Outcome) -> None:
    """Repairs that could not apply, in the record and as warnings: the CLI notes them and
    both reports list them, so a model left failing says which fix was not tried and why."""
    from compactor.quantization.search import repairs_not_applied

    skipped = repairs_not_applied(outcome.log.get("repairs", []))
    if skipped:
        record["repairs_not_applied"] = skipped
        record.setdefault("warnings", []).extend(
            f"repair '{r['repair']}' could not apply: {r['reason']}" for r in skipped)


def _accuracy_record(outcome: Outcome, budget: Budget, judge) -> dict[str, Any]:
    chosen = outcome.chosen
    acc: dict[str, Any] = {**budget.to_dict(), "metric": judge.metric.name,
                           "reference_value": round(judge.reference_value, 6),
                           "met": outcome.met}
    if chosen.search is not None:
        acc["search"] = chosen.search.to_dict()
    if chosen.holdout is not None:
        acc["held_out"] = chosen.holdout.to_dict()
    return acc


def _search_record(outcome: Outcome, cfg: QuantizeConfig) -> dict[str, Any]:
    chosen = outcome.chosen
    speed: dict[str, Any] = {}
    if outcome.float_p50_ms is not None and chosen.p50_ms is not None:
        speed = {"float_p50_ms": round(outcome.float_p50_ms, 4),
                 "int8_p50_ms": round(chosen.p50_ms, 4),
                 "speedup_vs_input": round(chosen.speedup or
                                           outcome.float_p50_ms / chosen.p50_ms, 3)}
    return {
        "chosen": chosen.candidate.label,
        "time_budget_s": cfg.time_budget_s,
        "timed_out": outcome.timed_out,
        **speed,
        **outcome.log,
    }


def _fusion_record(record: dict[str, Any], outcome: Outcome) -> None:
    """Whether the chosen candidate is the fused one, and what fusion alone gives."""
    from compactor.quantization.search import FUSED_FLOAT

    fusion = record.get("transformer_fusion")
    if not (fusion and fusion.get("applied")):
        return
    fusion["chosen"] = outcome.chosen.candidate.fused
    fused_float = next((t[FUSED_FLOAT] for t in outcome.log.get("timings", [])
                        if FUSED_FLOAT in t), None)
    if fused_float:  # how much of the speed-up the fusion alone gives, in float
        fusion["float_speedup_vs_input"] = fused_float["speedup_vs_float"]


def _unmet_message(outcome: Outcome, budget: Budget, judge) -> str:
    chosen = outcome.chosen
    where = "held-out" if chosen.search.ok else "search"
    return (f"no int8 configuration meets the accuracy budget ({budget.source}: "
            f"{judge.metric.name} drop <= {budget.allowed:.4g}); the best found, "
            f"'{chosen.candidate.label}', drops {_worst_drop(outcome):.4g} on the {where} "
            "part of the eval data"
            + (" (the search hit time_budget_s)" if outcome.timed_out else ""))


def _budget_resolver(cfg: QuantizeConfig, ctx: RunContext, metric):
    """The accuracy budget: quantize's own (vs its float input), else the tightest target
    budget (vs the baseline), else a default guard that fails nothing."""
    from compactor.quantization.accuracy import Budget
    from compactor.spec import Drop

    if cfg.max_accuracy_drop is not None:
        drop = Drop.model_validate(cfg.max_accuracy_drop)

        def own(ref: float) -> Budget:
            return Budget(drop.allowed(ref), "quantize.max_accuracy_drop",
                          str(cfg.max_accuracy_drop), "input")
        return own
    targets = [(i, t) for i, t in enumerate(ctx.targets)
               if t.budgets.max_accuracy_drop is not None]
    baseline_value = ctx.reference.value
    if targets:
        def from_targets(ref: float) -> Budget:
            base = ref if baseline_value is None else baseline_value
            i, t = min(targets, key=lambda it: it[1].budgets.max_accuracy_drop.allowed(base))
            d = t.budgets.max_accuracy_drop
            against = "input" if baseline_value is None else "baseline"
            return Budget(d.allowed(base), f"targets[{i}] ({t.profile}) max_accuracy_drop",
                          str(d.model_dump()), against)
        return from_targets
    default = Drop.model_validate("1%")

    def guard(ref: float) -> Budget:
        return Budget(default.allowed(ref), "default", "1%", "input", enforced=False)
    return guard


def _timer(ctx: RunContext, cfg: QuantizeConfig):
    """Interleaved timing on the first target's profile, at batch 1 when it measures it;
    its ``in_processes`` attribute times each model alone in a fresh process instead (the
    final choice between passing candidates; the worker's job files go in ``folder``)."""
    from compactor.profiles import load_profile
    from compactor.quantization.timing import compare_in_processes, compare_latency

    profile = ctx.profiles[0] if ctx.profiles else load_profile("host-cpu", ctx.base_dir)
    bs = 1 if 1 in profile.batch_sizes else profile.batch_sizes[0]
    # Long enough that a noisy shared host does not decide between close candidates.
    seconds = min(max(0.04 * cfg.time_budget_s, 4.0), 10.0)

    def timer(models):
        feeds = ctx.latency_feeds(bs)
        return compare_latency(models, profile, feeds, bs, max_seconds=seconds)

    def in_processes(models, folder: Path):
        return compare_in_processes(models, profile, ctx.latency_feeds(bs), bs, folder)
    timer.in_processes = in_processes
    return timer


def _status(task):
    def on_step(msg: str) -> None:
        status = getattr(task, "status", None)
        if status is not None:
            status(msg)
    return on_step


def _per_run(feeds: list[dict], batch: int, axes: dict[str, int | None]) -> list[dict]:
    from compactor.data import Batch

    out = []
    for f in feeds:
        b = Batch(f, axes={k: axes.get(k, 0) for k in f})
        out += [b.rows(slice(i, i + batch)).inputs for i in range(0, b.size, batch)]
    return out


def _cap_samples(feeds: list[dict], n: int, axes: dict[str, int | None]) -> list[dict]:
    from compactor.data import Batch

    out, seen = [], 0
    for f in feeds:
        if seen >= n:
            break
        out.append(f)
        seen += Batch(f, axes={k: axes.get(k, 0) for k in f}).size
    return out


def _float_nodes(record: dict[str, Any], outcome: Outcome, model, sample,
                 cfg: QuantizeConfig) -> list[dict[str, Any]]:
    """Nodes kept in float and why, with the fallback's speed cost (measured in total,
    split by MACs as an estimate)."""
    import fnmatch

    from compactor.measure.macs import macs_by_node

    ops = {n.name: n.op_type for n in model.graph.node}
    out: list[dict[str, Any]] = []
    globs = (*cfg.exclude.nodes, *cfg.exclude_nodes)
    for name in record.get("excluded_nodes", []):
        g = next((g for g in globs if fnmatch.fnmatchcase(name, g)), "?")
        out.append({"node": name, "op_type": ops.get(name, "?"),
                    "reason": f"exclude pattern {g!r}"})
    for m in (record.get("mixed_scale") or {}).get("tensors", []):
        out.append({"node": m["node"], "op_type": m["op_type"],
                    "reason": f"mixed scales in {m['tensor']} (axis {m['axis']}: "
                    f"{m['int8_levels']} int8 levels for slices {m['narrow_slices']})"})
    types = {*cfg.exclude.op_types, *cfg.exclude_op_types}
    for name, op in ops.items():
        if op in types:
            out.append({"node": name, "op_type": op, "reason": f"op type {op} excluded"})
    if not outcome.fallback:
        return out
    macs = macs_by_node(model, {k: v.shape for k, v in sample.items()}) or {}
    total = sum(macs.get(s.node, 0) for _, s in outcome.fallback)
    cost = outcome.fallback_cost_ms
    for rank, s in outcome.fallback:
        entry = {"node": s.node, "op_type": s.op_type,
                 "reason": f"accuracy fallback: sensitivity rank {rank} "
                 f"({s.method}, int8 SQNR {s.sqnr_db:.1f} dB)"}
        if cost is not None and total:
            entry["speed_cost_ms_estimate"] = round(cost * macs.get(s.node, 0) / total, 4)
        out.append(entry)
    return out


def _int8_summary(path: Path) -> dict[str, Any]:
    """int8 weight tensors and quantization ops, counted in the main graph and in every
    subgraph (``If`` branches, ``Loop``/``Scan`` bodies), where foreign models keep
    weights too."""
    import onnx
    from onnx import TensorProto

    from compactor.measure.macs import all_graphs

    model = onnx.load(str(path), load_external_data=False)
    graphs = all_graphs(model.graph)
    int8 = sum(
        1 for g in graphs for t in g.initializer
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 1
        and math.prod(t.dims) > 1
    )
    ops: dict[str, int] = {}
    for g in graphs:
        for n in g.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    quant_ops = {k: v for k, v in ops.items() if "Integer" in k or k.startswith("QLinear")
                 or k in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                          "DynamicQuantizeLSTM")}
    return {"int8_weight_tensors": int8, "quantization_ops": quant_ops}
