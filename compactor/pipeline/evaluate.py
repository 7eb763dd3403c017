"""Every stage evaluated the same way: metric, size, params, MACs and latency, all on the
stage's ONNX form in ONNX Runtime (a torch stage is exported first, with the recipe's export
settings), so numbers across stages compare like for like."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compactor.data import Batch, LatencyShape, Outputs, PerBatch, feeds_for_batch, latency_shape
from compactor.errors import DataError, ModelLoadError, PassError
from compactor.exporting import ExportConfig
from compactor.measure.latency import Latency, session
from compactor.metrics import Metric
from compactor.passes import RunContext
from compactor.profiles import Profile
from compactor.results import OutputResult, StageResult
from compactor.stage import Stage
from compactor.verdict import Verdict


class Evaluator:
    """Evaluates every stage the same way: metric, size, params, MACs and latency, all on
    the stage's ONNX form in ONNX Runtime."""

    def __init__(self, ctx: RunContext, metric: Metric, profiles: Sequence[Profile],
                 export: ExportConfig | None = None, dims: dict[str, int] | None = None,
                 passes: int | None = None):
        self.ctx = ctx
        # how many passes the run has (None: unknown), so a stage knows whether it ships
        self.passes = passes
        # the recipe's measure.dims; the axes it leaves out take the eval data's median
        self.dims = dict(dims or {})
        self._shape: LatencyShape | None = None
        self.metric = metric
        self.profiles = list(profiles)
        # torch stages are exported as the recipe's export pass does (exporter, opset), so
        # their figures compare with the exported ones like for like
        self.export = export or ExportConfig()
        # every output of the baseline, by name (the reference metrics compare to)
        self.baseline_outputs: Outputs | None = None
        self.baseline_value: float | None = None
        # The latest evaluated stage's eval outputs: the next pass's input, which a pass
        # judging its own accuracy (quantize) can compare to without running it again.
        self.last_outputs: Outputs | None = None
        self._other_teacher: str | None = None

    @property
    def shape(self) -> LatencyShape:
        """The shape latency is measured at (the same for every stage of the run)."""
        if self._shape is None:
            from compactor.errors import RecipeError
            from compactor.spec import check_measure_dims

            problem = check_measure_dims(self.dims, self.ctx.inputs)
            if problem:
                raise RecipeError(problem, "name the model's symbolic axes in measure.dims "
                                  "(`compactor inspect MODEL` lists them)")
            self._shape = latency_shape(self.ctx.inputs, self.ctx.eval_batches, self.dims)
        return self._shape
    def evaluate(self, stage: Stage) -> StageResult:
        import onnx

        from compactor.measure.macs import macs_by_node
        from compactor.measure.precision import precision_summary
        from compactor.measure.size import param_count, size_bytes

        t0 = time.perf_counter()
        path, eval_export = self._onnx_form(stage)
        teacher = stage.record.get("teacher")
        if isinstance(teacher, str) and teacher != "baseline":
            # distilled from another model: from here on the stage is meant to differ from
            # the baseline, which is no longer the reference a constant is judged against
            self._other_teacher = teacher
        value, outputs = self._score(path, stage.name)
        model = onnx.load(str(path), load_external_data=False)
        shape = self.shape
        sample = feeds_for_batch(self.ctx.inputs, self.ctx.eval_batches, 1, shape.dims)
        macs_nodes = macs_by_node(model, {k: v.shape for k, v in sample.items()})
        macs = None if macs_nodes is None else int(sum(macs_nodes.values()))
        precision = precision_summary(model, macs_nodes)
        nbytes = size_bytes(path)
        per_profile = self._profiles(path, stage.name, macs, precision, nbytes, sample)
        checks, check_warnings = self._output_checks(outputs, stage)
        warnings = stage.warnings + self._metric_warnings(stage) + check_warnings
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
            macs=macs,
            **per_profile,
            precision=precision,
            eval_export=eval_export,
            seconds=time.perf_counter() - t0,
            onnx_path=path,
            warnings=warnings,
            verdict=stage.verdict,
            pass_seconds=stage.seconds,
            latency_shape=shape.to_dict(),
            outputs=outputs,
            checks=checks,
        )

    def _metric_warnings(self, stage: Stage) -> tuple[str, ...]:
        """Said on every stage scored against the baseline: each output scored with
        fidelity whose baseline makes it untrustworthy (see ``fidelity_caveat``)."""
        from compactor.metrics import fidelity_caveat

        if self.baseline_outputs is None or len(stage.lineage) <= 1:
            return ()
        out = []
        for name, m in self.metric.plan(self.baseline_outputs.names):
            if m.name != "fidelity":
                continue
            why = fidelity_caveat(self.baseline_outputs[name])
            if why is None:
                continue
            shape = list(self.baseline_outputs[name].parts[0].shape)
            task = "agreement" if "one value" in why else "a task metric"
            out.append(
                f"fidelity cannot be trusted on output '{name}' (shape {shape}): {why}; "
                f"use a task metric for it (metric: {{name: fidelity, outputs: {{{name}: "
                f"{task}}}}}, see docs/metrics.md), or module:fn, or mse with targets")
        return tuple(out)

    def _output_checks(self, outputs: tuple[OutputResult, ...], stage: Stage
                       ) -> tuple[tuple[Verdict, ...], tuple[str, ...]]:
        """Every output against predicting the baseline's per-element mean for every
        sample: worse beyond the eval data's noise is a failed check (the run exits 1 when
        the shipped stage has one), within noise an inconclusive one; both warn."""
        checks, warnings = [], []
        later = (self.passes is not None and len(stage.lineage) - 1 < self.passes
                 and len(stage.lineage) > 1)
        repair = ("; a later pass (e.g. distill) may repair it: only the shipped model's "
                  "heads fail the run" if later else "")
        for o in outputs:
            if o.mse is None or o.constant_mse is None or o.check is None:
                continue
            ratio = o.mse / o.constant_mse
            where = f" ({o.check_part}, the worst unit group)" if o.check_part else ""
            detail = (f"output '{o.name}'{where} error vs the baseline (MSE {o.mse:.4g}) is "
                      f"{ratio:.2f}x [{o.ratio_low:.2f}, {o.ratio_high:.2f}] that of "
                      "predicting the baseline's mean for every sample "
                      f"(MSE {o.constant_mse:.4g})")
            checks.append(Verdict(
                f"outputs.{o.name}.constant_predictor", o.constant_mse, o.mse, "mse",
                o.check, detail, low=o.ratio_low * o.constant_mse,
                high=o.ratio_high * o.constant_mse))
            if o.check == "fail":
                warnings.append(f"{detail}: the head is WORSE THAN A CONSTANT predictor"
                                + repair)
            elif o.check == "inconclusive":
                warnings.append(f"{detail}: the head is NO BETTER THAN A CONSTANT "
                                "predictor within the eval data's noise" + repair)
            else:
                continue
            self.ctx.progress.note(f"{stage.name}: {warnings[-1]}")
        return tuple(checks), tuple(warnings)

    def _onnx_form(self, stage: Stage) -> tuple[Path, dict[str, Any] | None]:
        """The stage as an ONNX file: its own, or a torch stage exported for measurement."""
        if stage.kind != "torch":
            return stage.onnx_path, None
        from compactor.exporting import export_module

        path = self.ctx.work_path(f"{len(stage.lineage):02d}-eval-{stage.name}.onnx")
        with self.ctx.progress.task(f"{stage.name}: export for measurement"):
            record = export_module(stage.module, self.ctx.inputs, self.ctx.eval_batches[0],
                                   path, self.export, self.ctx.output_names)
        return path, record

    def _score(self, path: Path, name: str) -> tuple[float, tuple[OutputResult, ...]]:
        """The metric on the eval data (the worst scored output), and every output's
        figures; the first stage scored is the baseline."""
        outputs, targets = self._run_eval(path, name, self.ctx.eval_batches)
        if self.baseline_outputs is None:
            # a name that does not exist or a task metric on the wrong shape: exit 2 now
            self.metric.plan(outputs.names, outputs.shapes)
            self.baseline_outputs = outputs
        else:
            outputs = self._same_shapes(outputs, name)
        base = self.baseline_outputs
        scores = {s.output: s for s in self.metric.score_outputs(outputs, targets, base)}
        value = self.metric.aggregate(list(scores.values()))
        self.last_outputs = outputs
        is_baseline = self.baseline_value is None
        if is_baseline:
            self.baseline_value = value
        return value, tuple(self._output_result(n, outputs, scores.get(n), is_baseline)
                            for n in outputs.names)

    def _output_result(self, name: str, outputs: Outputs, score, is_baseline: bool
                       ) -> OutputResult:
        from compactor.metrics import constant_predictor_check, mixed_units_note

        base = self.baseline_outputs[name]
        check = None if is_baseline or self._other_teacher else \
            constant_predictor_check(outputs[name], base)
        note = mixed_units_note(base) if score is not None and score.metric == "fidelity" \
            else None
        return OutputResult(
            name, tuple(outputs[name].parts[0].shape),
            None if score is None else score.metric, None if score is None else score.value,
            None if check is None else check.mse,
            None if check is None else check.constant_mse, note,
            None if check is None else check.low, None if check is None else check.high,
            None if check is None else check.status, "" if check is None else check.part)

    def _same_shapes(self, outputs: Outputs, name: str) -> Outputs:
        """``outputs`` under the baseline's names, after checking their shapes."""
        base = self.baseline_outputs
        if len(outputs.names) != len(base.names):
            raise PassError(
                f"stage '{name}' has outputs {', '.join(outputs.names)}; the baseline has "
                f"{', '.join(base.names)}",
                "a compressed model must keep the baseline's outputs")
        if outputs.names != base.names:  # renamed by an exporter: same order, same meaning
            outputs = Outputs(base.names, outputs.values)
        for out, got in outputs.items():
            want = base[out]
            if got.shapes != want.shapes:
                i = next((i for i, (a, b) in enumerate(zip(got.shapes, want.shapes))
                          if a != b), 0)
                raise PassError(
                    f"stage '{name}' output '{out}' has shape {list(got.shapes[i][1:])} per "
                    f"sample on eval batch {i}; the baseline gives {list(want.shapes[i][1:])}",
                    "a compressed model must keep the baseline's output shape",
                )
        return outputs

    def _profiles(self, path: Path, name: str, macs: int | None, precision: dict[str, Any],
                  nbytes: int, sample: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Latency measured on each target profile, and the estimates labelled as such."""
        from compactor.measure.estimate import estimates_for

        latency: dict[str, dict[int, Latency] | None] = {}
        runtime: dict[str, dict[str, Any]] = {}
        notes: dict[str, str] = {}
        estimates: dict[str, dict[str, Any]] = {}
        for prof in self.profiles:
            latency[prof.name], runtime[prof.name], note = self._latency(
                path, name, prof, self.ctx.eval_batches
            )
            if note:
                notes[prof.name] = note
            l1 = (latency[prof.name] or {}).get(1)
            estimates[prof.name] = estimates_for(
                prof, macs=macs,
                int8_share=precision["int8_macs_share"]
                if precision.get("int8_macs_share") is not None
                else float(precision["quantized"]),
                weight_bytes=nbytes, io_bytes=sum(a.nbytes for a in sample.values()),
                measured_p50_ms=None if l1 is None else l1.p50,
                quantized=precision["quantized"],
            )
        return {"latency": latency, "runtime": runtime, "latency_notes": notes,
                "estimates": estimates}

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
        out_names = [o.name for o in sess.get_outputs()]
        outs, tgts = [], []
        with self.ctx.progress.task(f"{name}: evaluate", total=len(batches)) as task:
            for b in batches:
                try:
                    res = sess.run(None, {k: v for k, v in b.inputs.items() if k in feed_names})
                except Exception as e:  # noqa: BLE001 - ORT raises many types for a failed run
                    raise (ModelLoadError if name == "baseline" else PassError)(
                        f"stage '{name}' fails on the eval data in ONNX Runtime: "
                        f"{str(e).splitlines()[0][:300]}",
                        "check model.inputs' shapes and dtypes against the data",
                    ) from e
                outs.append(res)
                if b.target is not None:
                    tgts.append(b.target)
                task.advance()
        if tgts and len(tgts) != len(batches):
            raise DataError("some eval batches have targets and some do not",
                            "yield (inputs, target) for every batch, or for none")
        # kept per batch: batches padded to their own length give outputs that cannot be
        # concatenated (Metric.score joins them when they can be)
        return Outputs.of(out_names, outs), (PerBatch.of(tgts) if tgts else None)

    def _latency(self, path: Path, name: str, prof: Profile, batches: list[Batch]):
        from compactor.data import batch_sizes_for
        from compactor.measure.bench import measure_profile
        from compactor.measure.latency import providers_available

        if not providers_available(prof)[0]:
            m = measure_profile(path, prof, {})
            return None, {}, "\n".join(m.notes)
        sizes = batch_sizes_for(self.ctx.inputs, prof.batch_sizes)  # a fixed batch axis: its size
        dims = self.shape.dims
        feeds = {bs: feeds_for_batch(self.ctx.inputs, batches, bs, dims) for bs in sizes}
        with self.ctx.progress.task(
            f"{name}: latency on {prof.name}", total=len(sizes)
        ) as task:
            m = measure_profile(path, prof, feeds, self.ctx.work_dir,
                                on_batch=lambda _l: task.advance())
        return m.latency, m.runtime, "\n".join(m.notes) or None  # one note a line
