"""Runs a recipe: load, evaluate the baseline, run each pass, evaluate each stage, judge
the budgets and write the artifact.

Every stage is evaluated by one code path, on an ONNX file in ONNX Runtime: a torch stage
is exported to a temporary ONNX file first, so numbers across stages are comparable.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactor.budgets import Verdict, evaluate_budgets
from compactor.data import Batch, DataSource
from compactor.errors import CompactorError, DataError, ModelLoadError, PassError
from compactor.measure.latency import (
    Latency,
    measure_in_subprocess,
    providers_available,
    session,
)
from compactor.metrics import Metric, get_metric
from compactor.profiles import Profile, load_profile
from compactor.recipe import InputSpec, Recipe
from compactor.stage import Stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- progress


class Task:
    def advance(self, n: int = 1) -> None:  # noqa: B027 - a no-op by design
        pass


class Progress:
    """Where the pipeline reports what it is doing. This one ignores everything; the CLI
    passes one that draws progress bars. The library itself never prints."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield Task()

    def note(self, message: str) -> None:
        """Something the user should know (a fallback taken, a warning)."""


# --------------------------------------------------------------------------- results


@dataclass
class StageResult:
    name: str
    kind: str
    lineage: tuple[str, ...]
    record: dict[str, Any]
    metric: float
    delta: float  # value - baseline value
    drop: float  # how much worse than baseline (positive = worse)
    size_bytes: int
    params: int
    macs: int | None
    latency: dict[str, dict[int, Latency] | None]  # profile -> batch -> Latency
    runtime: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_notes: dict[str, str] = field(default_factory=dict)
    eval_export: dict[str, Any] | None = None
    seconds: float = 0.0
    onnx_path: Path | None = None

    def p(self, profile: str, q: str = "p50", batch: int = 1) -> float | None:
        lat = self.latency.get(profile)
        if not lat or batch not in lat:
            return None
        return getattr(lat[batch], q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "lineage": list(self.lineage),
            "record": self.record,
            "metric": self.metric,
            "delta": self.delta,
            "drop": self.drop,
            "size_bytes": self.size_bytes,
            "params": self.params,
            "macs": self.macs,
            "latency_ms": {
                prof: (None if lat is None else {str(b): v.to_dict() for b, v in lat.items()})
                for prof, lat in self.latency.items()
            },
            "runtime": {
                prof: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                for prof, r in self.runtime.items()
            },
            "latency_notes": self.latency_notes,
            "eval_export": self.eval_export,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class TargetResult:
    profile: Profile
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "settings": self.profile.model_dump(mode="json", by_alias=True),
            "passed": self.passed,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "notes": self.notes,
        }


@dataclass
class RunResult:
    recipe: Recipe
    metric: Metric
    stages: list[StageResult]
    targets: list[TargetResult]
    artifact: Path
    manifest: dict[str, Any]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.targets)


# --------------------------------------------------------------------------- context


class RunContext:
    """What a pass may use: the recipe, the data, a work folder, progress reporting."""

    def __init__(self, recipe: Recipe, inputs: Sequence[InputSpec], work_dir: Path,
                 progress: Progress):
        self.recipe = recipe
        self.inputs = tuple(inputs)
        self.output_names: tuple[str, ...] = recipe.model.outputs
        self.work_dir = work_dir
        self.progress = progress
        self.seed = recipe.seed
        self._eval: list[Batch] | None = None
        self._sources: dict[str, DataSource] = {}

    def work_path(self, name: str) -> Path:
        return self.work_dir / name

    def source(self, split: str) -> DataSource:
        if split not in self._sources:
            ref = getattr(self.recipe.data, split)
            if ref is None:
                raise DataError(
                    f"this recipe needs data.{split}, which is not set",
                    f"add 'data: {{{split}: data.py:fn}}' (or a .npz file) to the recipe",
                )
            self._sources[split] = DataSource(
                split, ref, self.inputs, self.recipe.base_dir, self.recipe.data.batch_size
            )
        return self._sources[split]

    @property
    def eval_batches(self) -> list[Batch]:
        if self._eval is None:
            self._eval = self.source("eval").take()
        return self._eval

    def calibration_batches(self, max_samples: int) -> list[Batch]:
        return self.source("calibration").take(max_samples)


# --------------------------------------------------------------------------- running


def optimize(recipe: Recipe, progress: Progress | None = None,
             output: Path | None = None) -> RunResult:
    """Run ``recipe`` end to end and write its artifact. Budget failures do not raise: the
    result's ``passed`` says whether every budget holds."""
    from compactor import artifact
    from compactor.model import load_model, onnx_input_specs
    from compactor.passes import get_pass

    t_start = time.perf_counter()
    progress = progress or Progress()
    out_dir = Path(output) if output else recipe.output_dir
    artifact.check_writable(out_dir)
    profiles = [load_profile(t.profile, recipe.base_dir) for t in recipe.targets]
    metric = get_metric(recipe.metric, recipe.base_dir)

    with progress.task("load model"):
        baseline, source_files = load_model(recipe.model, recipe.base_dir)
    inputs = recipe.model.inputs or onnx_input_specs(baseline.onnx_path)

    work = Path(tempfile.mkdtemp(prefix=f"compactor-{recipe.name}-"))
    try:
        ctx = RunContext(recipe, inputs, work, progress)
        with progress.task("load eval data"):
            eval_batches = ctx.eval_batches
        evaluator = Evaluator(ctx, metric, profiles)
        stages = [evaluator.evaluate(baseline)]
        current = baseline
        for i, (name, cfg) in enumerate(recipe.pass_list):
            p = get_pass(name)(cfg)
            t0 = time.perf_counter()
            with progress.task(f"pass {i + 1}/{len(recipe.pass_list)}: {name}"):
                try:
                    current = p.run(current, ctx)
                except CompactorError:
                    raise
                except Exception as e:  # noqa: BLE001 - a pass bug must still exit 4, clearly
                    raise PassError(
                        f"pass '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        if str(e) else f"pass '{name}' failed: {type(e).__name__}",
                        "run with --debug for the traceback",
                    ) from e
            current.record["seconds"] = round(time.perf_counter() - t0, 3)
            for w in current.record.get("warnings", []):
                progress.note(f"{name}: {w}")
            stages.append(evaluator.evaluate(current))
        targets = judge(recipe, profiles, stages, metric)
        final = stages[-1]
        manifest = artifact.build_manifest(
            recipe, inputs, eval_batches, metric, stages, targets, source_files,
            time.perf_counter() - t_start,
        )
        with progress.task("write artifact"):
            artifact.write_artifact(out_dir, recipe, final.onnx_path, manifest)
        return RunResult(recipe, metric, stages, targets, out_dir, manifest,
                         time.perf_counter() - t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Evaluator:
    """Evaluates every stage the same way: metric, size, params, MACs and latency, all on
    the stage's ONNX form in ONNX Runtime."""

    def __init__(self, ctx: RunContext, metric: Metric, profiles: Sequence[Profile]):
        self.ctx = ctx
        self.metric = metric
        self.profiles = list(profiles)
        self.baseline_outputs: np.ndarray | None = None
        self.baseline_value: float | None = None

    def evaluate(self, stage: Stage) -> StageResult:
        import onnx

        from compactor.measure.macs import count_macs
        from compactor.measure.size import param_count, size_bytes

        t0 = time.perf_counter()
        eval_export = None
        path = stage.onnx_path
        if stage.kind == "torch":
            from compactor.passes.export import ExportConfig, export_module

            path = self.ctx.work_path(f"{len(stage.lineage):02d}-eval-{stage.name}.onnx")
            with self.ctx.progress.task(f"{stage.name}: export for measurement"):
                eval_export = export_module(
                    stage.module, self.ctx.inputs, self.ctx.eval_batches[0], path,
                    ExportConfig(), self.ctx.output_names,
                )
        batches = self.ctx.eval_batches
        outputs, targets = self._run_eval(path, stage.name, batches)
        if self.baseline_outputs is None:
            self.baseline_outputs = outputs
        elif outputs.shape != self.baseline_outputs.shape:
            raise PassError(
                f"stage '{stage.name}' outputs shape {list(outputs.shape[1:])} per sample; "
                f"the baseline gives {list(self.baseline_outputs.shape[1:])}",
                "a compressed model must keep the baseline's output shape",
            )
        value = self.metric.compute(outputs, targets, self.baseline_outputs)
        if self.baseline_value is None:
            self.baseline_value = value
        model = onnx.load(str(path), load_external_data=False)
        sample = {s.name: batches[0].inputs[s.name][:1] for s in self.ctx.inputs}
        latency: dict[str, dict[int, Latency] | None] = {}
        runtime: dict[str, dict[str, Any]] = {}
        notes: dict[str, str] = {}
        for prof in self.profiles:
            latency[prof.name], runtime[prof.name], note = self._latency(
                path, stage.name, prof, batches
            )
            if note:
                notes[prof.name] = note
        return StageResult(
            name=stage.name,
            kind=stage.kind,
            lineage=stage.lineage,
            record=dict(stage.record),
            metric=value,
            delta=value - self.baseline_value,
            drop=self.metric.drop(self.baseline_value, value),
            size_bytes=size_bytes(path),
            params=param_count(model),
            macs=count_macs(model, {k: v.shape for k, v in sample.items()}),
            latency=latency,
            runtime=runtime,
            latency_notes=notes,
            eval_export=eval_export,
            seconds=time.perf_counter() - t0,
            onnx_path=path,
        )

    def _run_eval(self, path: Path, name: str, batches: list[Batch]):
        sess = session(path)
        feed_names = {i.name for i in sess.get_inputs()}
        missing = [s.name for s in self.ctx.inputs if s.name not in feed_names]
        if missing and name == "baseline":
            raise ModelLoadError(
                f"the model has no input named {', '.join(missing)} (it has "
                f"{', '.join(sorted(feed_names))})",
                "model.inputs names must match the ONNX model's input names",
            )
        outs, tgts = [], []
        with self.ctx.progress.task(f"{name}: evaluate", total=len(batches)) as task:
            for b in batches:
                try:
                    res = sess.run(None, {k: v for k, v in b.inputs.items() if k in feed_names})
                except Exception as e:  # noqa: BLE001
                    raise (ModelLoadError if name == "baseline" else PassError)(
                        f"stage '{name}' fails on the eval data in ONNX Runtime: "
                        f"{str(e).splitlines()[0][:300]}",
                        "check model.inputs' shapes and dtypes against the data",
                    ) from e
                outs.append(res[0])
                if b.target is not None:
                    tgts.append(b.target)
                task.advance()
        if tgts and len(tgts) != len(batches):
            raise DataError("some eval batches have targets and some do not",
                            "yield (inputs, target) for every batch, or for none")
        return np.concatenate(outs), (np.concatenate(tgts) if tgts else None)

    def _latency(self, path: Path, name: str, prof: Profile, batches: list[Batch]):
        ok, missing = providers_available(prof)
        if not ok:
            return None, {}, f"not measured: {', '.join(missing)} not available on this host"
        _, thread_note = prof.threads_on_host()
        feeds = {bs: feeds_for_batch(self.ctx.inputs, batches, bs) for bs in prof.batch_sizes}
        with self.ctx.progress.task(
            f"{name}: latency on {prof.name}", total=len(prof.batch_sizes)
        ) as task:
            lat, runtime = measure_in_subprocess(
                path, prof, feeds, self.ctx.work_dir, on_batch=lambda _l: task.advance(),
                timing=prof.timing.model_dump(),
            )
        return lat, runtime, thread_note


def feeds_for_batch(specs: Sequence[InputSpec], batches: list[Batch], bs: int):
    """Real eval samples at batch size ``bs`` (repeating samples if the data is smaller)."""
    feeds = {}
    for s in specs:
        parts, n = [], 0
        for b in batches:
            a = b.inputs[s.name]
            parts.append(a)
            n += a.shape[0]
            if n >= bs:
                break
        a = np.concatenate(parts)
        if a.shape[0] < bs:
            a = np.concatenate([a] * (bs // a.shape[0] + 1))
        feeds[s.name] = np.ascontiguousarray(a[:bs])
    return feeds


def judge(recipe: Recipe, profiles: Sequence[Profile], stages: Sequence[StageResult],
          metric: Metric) -> list[TargetResult]:
    base, final = stages[0], stages[-1]
    out = []
    for target, prof in zip(recipe.targets, profiles):
        lat = None
        if final.latency.get(prof.name) and 1 in final.latency[prof.name]:
            l1 = final.latency[prof.name][1]
            lat = {"p50": l1.p50, "p90": l1.p90, "p99": l1.p99}
        verdicts = evaluate_budgets(
            target.budgets,
            size_mb=final.size_bytes / 1e6,
            latency_ms=lat,
            baseline_latency_ms=base.p(prof.name),
            metric_name=metric.name,
            metric_value=final.metric,
            metric_drop=final.drop,
            baseline_metric=base.metric,
        )
        notes = [final.latency_notes[prof.name]] if prof.name in final.latency_notes else []
        if 1 not in prof.batch_sizes and target.budgets.max_latency_ms is not None:
            notes.append("latency budgets are judged at batch 1, which this profile does not "
                         "measure; add 1 to its batch_sizes")
        out.append(TargetResult(prof, verdicts, notes))
    return out
