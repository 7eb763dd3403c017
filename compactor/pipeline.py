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
from compactor.measure.latency import Latency, session
from compactor.metrics import Metric, get_metric
from compactor.profiles import Profile, load_profile
from compactor.recipe import Budgets, InputSpec, Recipe
from compactor.stage import Stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- progress


class Task:
    def advance(self, n: int = 1) -> None:  # noqa: B027 - a no-op by design
        pass

    def status(self, text: str) -> None:  # noqa: B027 - a no-op by design
        """A short live line next to the bar (a training pass: loss, metric, speed, ETA)."""


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
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # labelled estimates
    precision: dict[str, Any] = field(default_factory=dict)  # int8 vs float ops
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
            "estimates": self.estimates,
            "precision": self.precision,
            "eval_export": self.eval_export,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class TargetResult:
    profile: Profile
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)
    batching: dict[str, Any] | None = None  # best-throughput batch size within the limit
    budgets: Budgets | None = None  # what the verdicts judged, kept so `check` can re-judge

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
            "batching": self.batching,
            "budgets": None if self.budgets is None
            else self.budgets.model_dump(mode="json", exclude_none=True),
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
    worker: bool = False  # a torchrun rank other than 0: it trained, rank 0 reports

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
        # Set by optimize(): the stage before any pass (distill's default teacher), and for
        # the pass being run, its key, whether it resumes, and where its checkpoints go.
        self.baseline: Stage | None = None
        self.run: ResumableRun | None = None
        self.pass_index = 0
        self.pass_key = ""
        self.resume = False
        self.writes = True  # False on torchrun ranks other than 0
        # Set by optimize() for passes that judge speed and accuracy themselves (quantize's
        # search): the targets' profiles (the first is the one to be fast on), the recipe's
        # metric, and the Evaluator (the baseline's eval outputs and metric value).
        self.profiles: tuple[Profile, ...] = ()
        self.metric: Metric | None = None
        self.evaluator: Evaluator | None = None

    def work_path(self, name: str) -> Path:
        return self.work_dir / name

    def checkpoint_dir(self) -> Path:
        """The current pass's checkpoint folder in the run folder (kept for --resume)."""
        if self.run is None:
            return self.work_dir / f"checkpoints-{self.pass_index + 1:02d}"
        name = self.recipe.pass_list[self.pass_index][0]
        return self.run.folder.checkpoint_dir(self.pass_index, name)

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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run; ``resumable`` says whether its work folder holds
    finished stages or a checkpoint that ``--resume`` can continue from."""

    def __init__(self, work_dir: Path, resumable: bool):
        super().__init__(f"interrupted; work folder {work_dir}")
        self.work_dir = work_dir
        self.resumable = resumable


class ResumableRun:
    """A run's persistent work folder, ``.<artifact>.compactor-work/`` beside the artifact:
    scratch files, every finished stage and training checkpoints, so ``--resume`` can
    continue an interrupted run.

    The folder carries compactor's marker and is locked for the run (a second run on the
    same output is refused); a path there that compactor did not make (a user's folder, a
    file, a symlink) is refused, never followed or deleted. Under the lock, a swap that an
    interrupted run left half done is finished, and the output is checked again.

    It is removed when the run succeeds, and kept when a failed or interrupted run leaves
    work to resume (a finished stage, a training checkpoint). Under torchrun, ranks other
    than 0 read it (to resume) but work in a private temporary folder and write nothing
    there."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool, progress: Progress):
        from compactor import artifact
        from compactor.passes import get_pass
        from compactor.training import ddp
        from compactor.training.checkpoint import RunFolder, WorkLock, work_folder_for

        self.recipe = recipe
        self.path = work_folder_for(out_dir)
        self.writes = ddp.is_main()
        self.launched = ddp.launched()
        self.lock: WorkLock | None = None
        if self.writes:
            self.lock = WorkLock.claim(self.path, out_dir)
            try:
                for note in artifact.recover(out_dir):
                    progress.note(note)
                artifact.check_replaceable(out_dir)
                folder = RunFolder.open(self.path, self.writes) if resume else None
            except BaseException:
                self._drop_lock()
                raise
        else:
            folder = RunFolder.open(self.path, self.writes) if resume else None
        if resume and folder is None:
            progress.note(f"nothing to resume in {self.path}: starting a fresh run")
        elif not resume and self.writes and RunFolder.holds_work(self.path):
            progress.note(f"replacing the interrupted run in {self.path} (--resume continues "
                          "an interrupted run)")
        if folder is None and self.lock is not None:
            self.lock.clear()
        self.folder = folder or RunFolder.fresh(self.path, self.writes)
        self.work_dir = self.path if self.writes else Path(
            tempfile.mkdtemp(prefix=f"compactor-{recipe.name}-rank{ddp.rank()}-")
        )
        self.progress = progress
        self.keys: list[str] = []
        self.parts: list[dict[str, Any]] = []
        self.last_distributed = max(
            (i for i, (n, _) in enumerate(recipe.pass_list)
             if getattr(get_pass(n), "distributed", False)),
            default=-1,
        )

    def _drop_lock(self) -> None:
        """Release the work folder; remove it when it holds no work worth keeping."""
        from compactor.training.checkpoint import RunFolder

        if self.lock is None:
            return
        if RunFolder.holds_work(self.path):
            self.lock.release()
        else:
            self.lock.remove()
        self.lock = None

    def begin(self, ctx: RunContext, baseline: Stage, source_files: Sequence[Path]) -> None:
        """Key every pass by what produces it; on resume, refuse a recipe that changed in a
        way that invalidates saved work (RecipeError, with the reason)."""
        from compactor.measure.size import sha256

        ctx.baseline = baseline
        ctx.run = self
        ctx.writes = self.writes
        files = {str(p): p for p in source_files}
        for split in ("train", "calibration", "eval"):
            if getattr(self.recipe.data, split) is not None:
                src = ctx.source(split).source_file
                if src is not None:
                    files[str(src)] = src
        base = self.recipe.base_dir
        root = {
            "model": self.recipe.model.model_dump(mode="json"),
            "data": self.recipe.data.model_dump(mode="json"),
            "metric": self.recipe.metric,
            "seed": self.recipe.seed,
            "files": {_short(Path(k), base): sha256(p) for k, p in sorted(files.items())
                      if p.is_file()},
        }
        self.parts = [{"pass": n, "config": c.model_dump(mode="json")}
                      for n, c in self.recipe.pass_list]
        self.keys = self.folder.begin(self.recipe.name, root, self.parts)

    def finished_stage(self, index: int, previous: Stage) -> Stage | None:
        """The saved stage of pass ``index`` when it can be reused: its file matches the
        signed record written with it, and it loads without running code (a torch stage
        is rebuilt on ``previous``). Otherwise a note says why, and the pass runs again."""
        from compactor.training.checkpoint import Refused

        if not self.folder.resumed or not self.folder.finished(index, self.keys[index]):
            return None
        try:
            return self.folder.load_stage(index, previous)
        except Refused as e:
            self.progress.note(f"the saved stage of passes[{index}] is not reused: {e}; "
                               "making it again")
        except Exception as e:  # noqa: BLE001 - an unreadable saved stage is made again
            self.progress.note(f"the saved stage of passes[{index}] cannot be read "
                               f"({type(e).__name__}: {str(e)[:120]}); making it again")
        return None

    def enter(self, index: int, ctx: RunContext) -> RunContext:
        """Point ``ctx`` at pass ``index`` (its key, checkpoints, whether it resumes)."""
        name = self.parts[index]["pass"]
        ctx.pass_index = index
        ctx.pass_key = self.keys[index]
        ctx.resume = self.folder.resumed and self.folder.has_checkpoint(index, name)
        if self.writes:
            self.folder.start(index, name, self.keys[index], self.parts[index])
        return ctx

    def save_stage(self, index: int, stage: Stage) -> None:
        note = self.folder.save_stage(index, stage) if self.writes else None
        if note:
            self.progress.note(note)

    def resumable(self) -> bool:
        return self.writes and self.folder.saved_work()

    def close(self, ok: bool) -> None:
        """Remove the work folder unless it holds work that --resume can continue."""
        if self.launched:
            from compactor.training import ddp

            ddp.shutdown()
        if not self.writes:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif self.lock is not None:
            if ok or not self.resumable():
                self.lock.remove()
            else:
                self.lock.release()
            self.lock = None


def _short(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


# --------------------------------------------------------------------------- running


def optimize(recipe: Recipe, progress: Progress | None = None,
             output: Path | None = None, resume: bool = False) -> RunResult:
    """Run ``recipe`` end to end and write its artifact. Budget failures do not raise: the
    result's ``passed`` says whether every budget holds.

    Work happens in ``.<artifact>.compactor-work/``, kept when a run fails or is
    interrupted: with
    ``resume``, finished stages there are reused and a training pass continues from its
    checkpoint (refused, with the reason, when the recipe changed in a way that invalidates
    them). Without it, a fresh run replaces that folder."""
    from compactor import artifact
    from compactor.budgets import judge_before_passes, reachable_floor, weight_floor
    from compactor.model import load_model, onnx_input_specs
    from compactor.passes import get_pass

    t_start = time.perf_counter()
    progress = progress or Progress()
    # absolute: passes and ORT tools get paths inside the work folder beside it
    out_dir = artifact.output_path(Path(output) if output else recipe.output_dir)
    artifact.check_writable(out_dir)
    profiles = [load_profile(t.profile, recipe.base_dir) for t in recipe.targets]
    metric = get_metric(recipe.metric, recipe.base_dir)

    with progress.task("load model"):
        baseline, source_files = load_model(recipe.model, recipe.base_dir)
    # a size or memory limit no run of these passes can meet fails now, not after every pass
    floor = weight_floor(baseline)
    judge_before_passes(recipe.targets, profiles, floor, reachable_floor(
        floor, [get_pass(name)(cfg) for name, cfg in recipe.pass_list]))
    inputs = recipe.model.inputs or onnx_input_specs(baseline.onnx_path)

    run = ResumableRun(recipe, out_dir, resume, progress)
    ok = False
    try:
        ctx = RunContext(recipe, inputs, run.work_dir, progress)
        run.begin(ctx, baseline, source_files)
        with progress.task("load eval data"):
            eval_batches = ctx.eval_batches
        evaluator = Evaluator(ctx, metric, profiles)
        ctx.profiles, ctx.metric, ctx.evaluator = tuple(profiles), metric, evaluator
        stages = [evaluator.evaluate(baseline)] if run.writes else []
        if not run.writes and run.last_distributed < 0:  # nothing for this rank to train
            return RunResult(recipe, metric, [], [], out_dir, {}, 0.0, worker=True)
        current = baseline
        for i, (name, cfg) in enumerate(recipe.pass_list):
            p = get_pass(name)(cfg)
            t0 = time.perf_counter()
            reused = run.finished_stage(i, current)
            with progress.task(f"pass {i + 1}/{len(recipe.pass_list)}: {name}"
                               + (" (reused from the interrupted run)" if reused else "")):
                try:
                    current = reused or p.run(current, run.enter(i, ctx))
                except CompactorError:
                    raise
                except Exception as e:  # noqa: BLE001 - a pass bug must still exit 4, clearly
                    raise PassError(
                        f"pass '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        if str(e) else f"pass '{name}' failed: {type(e).__name__}",
                        "run with --debug for the traceback",
                    ) from e
            if not reused:
                current.record["seconds"] = round(time.perf_counter() - t0, 3)
                run.save_stage(i, current)
            for w in current.record.get("warnings", []):
                progress.note(f"{name}: {w}")
            if current.record.get("fallback_reason") and not reused:
                progress.note(f"{name}: the dynamo exporter failed, the legacy exporter was "
                              "used (reason in the manifest)")
            if not run.writes:  # a torchrun rank other than 0: done once training is
                if i >= run.last_distributed:
                    return RunResult(recipe, metric, [], [], out_dir, {},
                                     time.perf_counter() - t_start, worker=True)
                continue
            stages.append(evaluator.evaluate(current))
            if name == "quantize":
                warn_if_slower(stages[-2], stages[-1], progress)
        targets = judge(recipe, profiles, stages, metric)
        final = stages[-1]
        extra_files, deployable_records = _deployables(final, profiles, ctx, progress)
        partition = None
        if recipe.partition is not None:
            from compactor.partition.planner import plan_for_artifact

            files, partition = plan_for_artifact(
                recipe.partition, final.onnx_path, eval_batches, recipe.base_dir,
                ctx.work_path("partition"), progress)
            extra_files = {**extra_files, **files}
        manifest = artifact.build_manifest(
            recipe, inputs, eval_batches, metric, stages, targets, source_files,
            time.perf_counter() - t_start, deployables=deployable_records, partition=partition,
        )
        with progress.task("write artifact"):
            artifact.write_artifact(out_dir, recipe, final.onnx_path, manifest,
                                    extra_files=extra_files)
        ok = True
        return RunResult(recipe, metric, stages, targets, out_dir, manifest.to_dict(),
                         time.perf_counter() - t_start)
    except KeyboardInterrupt as e:
        raise RunInterrupted(run.path, run.resumable()) from e
    finally:
        run.close(ok)


def _deployables(final: StageResult, profiles: Sequence[Profile], ctx: RunContext,
                 progress: Progress) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Files beyond model.onnx that the targets' profiles ask for (``format: ort``)."""
    from compactor.profiles.formats import deployables

    if not any(p.format != "onnx" for p in profiles):
        return {}, []
    sample = {s.name: ctx.eval_batches[0].inputs[s.name][:1] for s in ctx.inputs}
    with progress.task("convert to ORT format (ONNX Runtime Mobile)"):
        return deployables(final.onnx_path, profiles, ctx.work_dir, sample)


class Evaluator:
    """Evaluates every stage the same way: metric, size, params, MACs and latency, all on
    the stage's ONNX form in ONNX Runtime."""

    def __init__(self, ctx: RunContext, metric: Metric, profiles: Sequence[Profile]):
        self.ctx = ctx
        self.metric = metric
        self.profiles = list(profiles)
        self.baseline_outputs: np.ndarray | None = None
        self.baseline_value: float | None = None
        # The latest evaluated stage's eval outputs: the next pass's input, which a pass
        # judging its own accuracy (quantize) can compare to without running it again.
        self.last_outputs: np.ndarray | None = None

    def evaluate(self, stage: Stage) -> StageResult:
        import onnx

        from compactor.measure.estimate import estimates_for
        from compactor.measure.macs import macs_by_node
        from compactor.measure.precision import precision_summary
        from compactor.measure.size import param_count, size_bytes

        t0 = time.perf_counter()
        eval_export = None
        path = stage.onnx_path
        if stage.kind == "torch":
            from compactor.exporting import ExportConfig, export_module

            path = self.ctx.work_path(f"{len(stage.lineage):02d}-eval-{stage.name}.onnx")
            # Exported as the recipe's export pass does (exporter, opset), so the torch
            # stages' figures compare with the exported ones like for like.
            config = next((c for name, c in self.ctx.recipe.pass_list if name == "export"),
                          ExportConfig())
            with self.ctx.progress.task(f"{stage.name}: export for measurement"):
                eval_export = export_module(
                    stage.module, self.ctx.inputs, self.ctx.eval_batches[0], path,
                    config, self.ctx.output_names,
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
        self.last_outputs = outputs
        if self.baseline_value is None:
            self.baseline_value = value
        model = onnx.load(str(path), load_external_data=False)
        sample = {s.name: batches[0].inputs[s.name][:1] for s in self.ctx.inputs}
        macs_nodes = macs_by_node(model, {k: v.shape for k, v in sample.items()})
        precision = precision_summary(model, macs_nodes)
        nbytes = size_bytes(path)
        latency: dict[str, dict[int, Latency] | None] = {}
        runtime: dict[str, dict[str, Any]] = {}
        notes: dict[str, str] = {}
        estimates: dict[str, dict[str, Any]] = {}
        for prof in self.profiles:
            latency[prof.name], runtime[prof.name], note = self._latency(
                path, stage.name, prof, batches
            )
            if note:
                notes[prof.name] = note
            l1 = (latency[prof.name] or {}).get(1)
            estimates[prof.name] = estimates_for(
                prof, macs=None if macs_nodes is None else sum(macs_nodes.values()),
                int8_share=precision["int8_macs_share"]
                if macs_nodes else float(precision["quantized"]),
                weight_bytes=nbytes, io_bytes=sum(a.nbytes for a in sample.values()),
                measured_p50_ms=None if l1 is None else l1.p50,
                quantized=precision["quantized"],
            )
        return StageResult(
            name=stage.name,
            kind=stage.kind,
            lineage=stage.lineage,
            record=dict(stage.record),
            metric=value,
            delta=value - self.baseline_value,
            drop=self.metric.drop(self.baseline_value, value),
            size_bytes=nbytes,
            params=param_count(model),
            macs=None if macs_nodes is None else int(sum(macs_nodes.values())),
            latency=latency,
            runtime=runtime,
            latency_notes=notes,
            estimates=estimates,
            precision=precision,
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
        from compactor.data import batch_sizes_for
        from compactor.measure.bench import measure_profile
        from compactor.measure.latency import providers_available

        if not providers_available(prof)[0]:
            m = measure_profile(path, prof, {})
            return None, {}, "\n".join(m.notes)
        sizes = batch_sizes_for(self.ctx.inputs, prof.batch_sizes)  # a fixed batch axis: its size
        feeds = {bs: feeds_for_batch(self.ctx.inputs, batches, bs) for bs in sizes}
        with self.ctx.progress.task(
            f"{name}: latency on {prof.name}", total=len(sizes)
        ) as task:
            m = measure_profile(path, prof, feeds, self.ctx.work_dir,
                                on_batch=lambda _l: task.advance())
        return m.latency, m.runtime, "\n".join(m.notes) or None  # one note a line


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
    from compactor.budgets import batching_hint

    base, final = stages[0], stages[-1]
    out = []
    for target, prof in zip(recipe.targets, profiles, strict=True):
        lat = None
        if final.latency.get(prof.name) and 1 in final.latency[prof.name]:
            l1 = final.latency[prof.name][1]
            lat = {"p50": l1.p50, "p90": l1.p90, "p99": l1.p99}
        est = final.estimates.get(prof.name, {}).get("latency")
        verdicts = evaluate_budgets(
            target.budgets,
            size_mb=final.size_bytes / 1e6,
            latency_ms=lat,
            baseline_latency_ms=base.p(prof.name),
            metric_name=metric.name,
            metric_value=final.metric,
            metric_drop=final.drop,
            baseline_metric=base.metric,
            memory_mb=final.runtime.get(prof.name, {}).get("peak_rss_mb"),
            profile=prof,
            latency_estimate_ms=None if est is None else est["latency_ms"],
        )
        if prof is profiles[0]:
            verdicts += pass_verdicts(stages)
        notes = final.latency_notes.get(prof.name, "").splitlines()
        if 1 not in prof.batch_sizes and target.budgets.max_latency_ms is not None:
            notes.append("latency budgets are judged at batch 1, which this profile does not "
                         "measure; add 1 to its batch_sizes")
        notes += precision_advice(prof, final.precision)
        hint = batching_hint(final.latency.get(prof.name) or {}, target.budgets, prof)
        out.append(TargetResult(prof, verdicts, notes, hint, target.budgets))
    return out


def pass_verdicts(stages: Sequence[StageResult]) -> list[Verdict]:
    """Budgets a pass judged on its own stage (quantize's accuracy budget, on eval data it
    held out from its search). They are listed with the first target, so a pass that kept
    its best candidate but missed its budget fails the run (exit 1)."""
    return [Verdict(**s.record["verdict"]) for s in stages[1:]
            if isinstance(s.record.get("verdict"), dict)]


def warn_if_slower(before: StageResult, after: StageResult, progress: Progress,
                   margin: float = 1.02) -> None:
    """Never ship an int8 model slower than its float input without saying so loudly."""
    for prof in after.latency:
        a, b = after.p(prof), before.p(prof)
        if a is not None and b is not None and a > b * margin:
            msg = (f"the int8 model is SLOWER than its float input on {prof}: p50 {a:.3f} ms "
                   f"vs {b:.3f} ms at batch 1 ({b / a:.2f}x); consider dropping the pass or "
                   "another format/op_types")
            after.record.setdefault("warnings", []).append(msg)
            progress.note(f"quantize: {msg}")


def precision_advice(prof: Profile, precision: dict[str, Any]) -> list[str]:
    """A note when the final model's precision is not the one the target runs fastest."""
    from compactor.report.format import fmt_share

    want = prof.preferred_precision
    quantized = bool(precision.get("quantized"))
    if want == "fp16":
        return [f"{prof.name} runs fp16 fastest (tensor cores): " + (
            "int8 QDQ runs as int8 only under TensorRT; with CUDA alone, an fp16 conversion "
            "of the float model may serve better" if quantized else
            "convert the float model to fp16 (e.g. onnxconverter-common's float16) for it")]
    if want == "int8" and not quantized:
        return [f"{prof.name} runs int8 fastest: add a quantize pass"]
    heavy = precision.get("float_heavy_nodes") or []
    if want == "int8" and heavy:
        share = sum(n.get("macs_share", 0.0) for n in heavy)
        return [f"{len(heavy)} compute-heavy node(s) stayed float"
                + (f" ({fmt_share(share)} of MACs)" if share else "")]
    return []
