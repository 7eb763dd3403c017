"""Runs a recipe: load, evaluate the baseline, run each pass, evaluate each stage, judge
the budgets and write the artifact."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactor.budgets import DEFAULT_SETTLE_S
from compactor.errors import CompactorError, PassError
from compactor.exporting import ExportConfig
from compactor.metrics import Metric, get_metric
from compactor.passes import Pass, Reference, RunContext, get_pass
from compactor.pipeline.context import build_context
from compactor.pipeline.evaluate import Evaluator
from compactor.pipeline.judge import Timer, judge, make_timer, warn_if_slower
from compactor.pipeline.resume import ResumableRun, RunInterrupted
from compactor.profiles import Profile, load_profile
from compactor.progress import Progress
from compactor.recipe import Recipe
from compactor.results import StageResult, TargetResult
from compactor.stage import Stage
from compactor.verdict import Interval, Verdict

# How long the "int8 is SLOWER" check times the quantized model against its float input.
PAIR_CHECK_S = 2.0


@dataclass
class RunResult:
    recipe: Recipe
    metric: Metric
    stages: list[StageResult]
    targets: list[TargetResult]
    artifact: Path
    manifest: dict[str, Any]
    seconds: float
    worker: bool = False  # a torchrun rank other than 0: it trained, rank 0 reports

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.targets)

    @property
    def inconclusive(self) -> list[Verdict]:
        """Verdicts the run could not decide (``--inconclusive`` says what they mean)."""
        return [v for t in self.targets for v in t.verdicts if v.status == "inconclusive"]


def optimize(recipe: Recipe, progress: Progress | None = None,
             output: Path | None = None, resume: bool = False,
             settle_s: float = DEFAULT_SETTLE_S) -> RunResult:
    """Run ``recipe`` end to end and write its artifact. Budget failures do not raise: the
    result's ``passed`` says whether every budget holds.

    Work happens in ``.<artifact>.compactor-work/``, kept when a run fails or is
    interrupted: with ``resume``, finished stages there are reused and a training pass
    continues from its checkpoint (refused, with the reason, when the recipe changed in a
    way that invalidates them). Without it, a fresh run replaces that folder.

    ``settle_s`` caps the time spent re-measuring each target's undecided latency and
    speed-up verdicts (``compactor optimize --settle-time``)."""
    from compactor import artifact
    from compactor.budgets import MIN_SETTLE_S, check_time_cap
    from compactor.model import load_model, onnx_input_specs

    check_time_cap(settle_s, MIN_SETTLE_S, "--settle-time")

    t_start = time.perf_counter()
    progress = progress or Progress()
    # absolute: passes and ORT tools get paths inside the work folder beside it
    out_dir = artifact.output_path(Path(output) if output else recipe.output_dir)
    artifact.check_writable(out_dir)
    profiles = tuple(load_profile(t.profile, recipe.base_dir) for t in recipe.targets)
    metric = get_metric(recipe.metric, recipe.base_dir)
    with progress.task("load model"):
        baseline, source_files = load_model(recipe.model, recipe.base_dir)
    _judge_before_passes(recipe, profiles, baseline)
    inputs = tuple(recipe.model.inputs or onnx_input_specs(baseline.onnx_path))

    run = ResumableRun(recipe, out_dir, resume, progress)
    ok = False
    try:
        ctx = build_context(recipe, inputs, run.work_dir, progress, profiles, metric,
                            baseline=baseline, writes=run.writes)
        runner = _Runner(recipe, ctx, run, t_start, settle_s)
        result = runner.execute(baseline, source_files)
        ok = True
        return result
    except KeyboardInterrupt as e:
        raise RunInterrupted(run.path, run.resumable()) from e
    finally:
        run.close(ok)


def _judge_before_passes(recipe: Recipe, profiles: Sequence[Profile], baseline: Stage) -> None:
    """A size or memory limit no run of these passes can meet fails now, not after them."""
    from compactor.budgets import judge_before_passes, reachable_floor, weight_floor

    floor = weight_floor(baseline)
    judge_before_passes(recipe.targets, profiles, floor, reachable_floor(
        floor, [get_pass(name)(cfg) for name, cfg in recipe.pass_list]))


class _Runner:
    """One run's steps, in order: the baseline, each pass, then the verdicts and artifact."""

    def __init__(self, recipe: Recipe, ctx: RunContext, run: ResumableRun, t_start: float,
                 settle_s: float = DEFAULT_SETTLE_S):
        self.recipe = recipe
        self.settle_s = settle_s
        self.ctx = ctx
        self.run = run
        self.t_start = t_start
        self.progress = ctx.progress
        export = next((c for _, c in recipe.pass_list if isinstance(c, ExportConfig)),
                      ExportConfig())
        self.evaluator = Evaluator(ctx, ctx.metric, ctx.profiles, export,
                                   dims=recipe.measure.dims, passes=len(recipe.pass_list))
        self.stages: list[StageResult] = []

    def execute(self, baseline: Stage, source_files: Sequence[Path]) -> RunResult:
        self.run.begin([*source_files, *self.ctx.data.source_files()])
        with self.progress.task("load eval data"):
            self.ctx.eval_batches  # noqa: B018 - loaded here, under its own progress line
        if self.run.writes:
            self.stages.append(self.evaluator.evaluate(baseline))
        elif self.run.last_distributed < 0:  # nothing for this rank to train
            return self._worker_result()
        self.ctx = self.ctx.replace(reference=Reference(self.evaluator.baseline_outputs,
                                                        self.evaluator.baseline_value))
        current = baseline
        for i, (name, cfg) in enumerate(self.recipe.pass_list):
            current = self._pass(i, get_pass(name)(cfg), current)
            if not self.run.writes:  # a torchrun rank other than 0: done once training is
                if i >= self.run.last_distributed:
                    return self._worker_result()
                continue
            self.stages.append(self.evaluator.evaluate(current))
            if get_pass(name).must_be_faster:
                warn_if_slower(self.stages[-2], self.stages[-1], self.progress, self._paired)
        return self._finish(source_files)

    def _pass(self, i: int, p: Pass, current: Stage) -> Stage:
        t0 = time.perf_counter()
        reused = self.run.finished_stage(i, current)
        total = len(self.recipe.pass_list)
        with self.progress.task(f"pass {i + 1}/{total}: {p.name}"
                                + (" (reused from the interrupted run)" if reused else "")):
            if reused is None:
                step = self.run.enter(i, self.evaluator.last_outputs)
                current = _run_pass(p, current, self.ctx.for_step(step))
            else:
                current = reused
                self.run.notes.append(f"passes[{i}] ({p.name}): the stage finished by the "
                                      "interrupted run was reused (--resume)")
        if not reused:
            current = dataclasses.replace(current, seconds=round(time.perf_counter() - t0, 3))
            self.run.save_stage(i, current)
        for w in current.warnings:
            self.progress.note(f"{p.name}: {w}")
        return current

    def _finish(self, source_files: Sequence[Path]) -> RunResult:
        from compactor import artifact

        ctx, recipe, final = self.ctx, self.recipe, self.stages[-1]
        with self.progress.task("judge budgets (paired timings, re-measuring undecided ones)"):
            targets = judge(recipe.targets, ctx.profiles, self.stages, ctx.metric,
                            self._timer())
        extra_files, deployable_records = _deployables(final, ctx.profiles, ctx, self.progress)
        partition = None
        if recipe.partition is not None:
            from compactor.partition.planner import plan_for_artifact

            files, partition = plan_for_artifact(
                recipe.partition, final.onnx_path, ctx.eval_batches, recipe.base_dir,
                ctx.work_path("partition"), self.progress)
            extra_files = {**extra_files, **files}
        manifest = artifact.build_manifest(
            recipe, ctx.inputs, ctx.eval_batches, ctx.metric, self.stages, targets,
            source_files, time.perf_counter() - self.t_start,
            deployables=deployable_records, partition=partition, notes=self.run.notes,
        )
        with self.progress.task("write artifact"):
            artifact.write_artifact(self.run.out_dir, recipe, final.onnx_path, manifest,
                                    extra_files=extra_files)
        return RunResult(recipe, ctx.metric, self.stages, targets, self.run.out_dir,
                         manifest.to_dict(), time.perf_counter() - self.t_start)

    def _timer(self) -> Timer:
        return make_timer(self.ctx.latency_feeds(1), self.ctx.work_dir, self.settle_s)

    def _paired(self, before: Path, after: Path, profile: str) -> Interval | None:
        """``after``'s speed-up over ``before`` on ``profile``, timed paired now."""
        prof = next((p for p in self.ctx.profiles if p.name == profile), None)
        if prof is None:
            return None
        return self._timer().paired(before, after, prof, PAIR_CHECK_S)

    def _worker_result(self) -> RunResult:
        return RunResult(self.recipe, self.ctx.metric, [], [], self.run.out_dir, {},
                         time.perf_counter() - self.t_start, worker=True)


def _run_pass(p: Pass, stage: Stage, ctx: RunContext) -> Stage:
    """A pass's own errors pass through; anything else is a bug that must still exit 4."""
    try:
        return p.run(stage, ctx)
    except CompactorError:
        raise
    except Exception as e:  # noqa: BLE001 - a pass bug must still exit 4, clearly
        raise PassError(
            f"pass '{p.name}' failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if str(e) else f"pass '{p.name}' failed: {type(e).__name__}",
            "run with --debug for the traceback",
        ) from e


def _deployables(final: StageResult, profiles: Sequence[Profile], ctx: RunContext,
                 progress: Progress) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Files beyond model.onnx that the targets' profiles ask for (``format: ort``)."""
    from compactor.exporting.ort_format import deployables

    if not any(p.format != "onnx" for p in profiles):
        return {}, []
    from compactor.data import feeds_for_batch

    dims = (final.latency_shape or {}).get("dims")
    sample = feeds_for_batch(ctx.inputs, ctx.eval_batches, 1, dims)
    with progress.task("convert to ORT format (ONNX Runtime Mobile)"):
        return deployables(final.onnx_path, profiles, ctx.work_dir, sample)
