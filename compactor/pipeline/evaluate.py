"""Every stage evaluated the same way: metric, size, params, MACs and latency, all on the
stage's ONNX form in ONNX Runtime (a torch stage is exported first, with the recipe's export
settings), so numbers across stages compare like for like."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compactor.data import Batch, LatencyShape, PerBatch, feeds_for_batch, latency_shape
from compactor.errors import DataError, ModelLoadError, PassError
from compactor.exporting import ExportConfig
from compactor.measure.latency import Latency, session
from compactor.metrics import Metric
from compactor.passes import RunContext
from compactor.profiles import Profile
from compactor.results import StageResult
from compactor.stage import Stage


class Evaluator:
    """Evaluates every stage the same way: metric, size, params, MACs and latency, all on
    the stage's ONNX form in ONNX Runtime."""

    def __init__(self, ctx: RunContext, metric: Metric, profiles: Sequence[Profile],
                 export: ExportConfig | None = None, dims: dict[str, int] | None = None):
        self.ctx = ctx
        # the recipe's measure.dims; the axes it leaves out take the eval data's median
        self.dims = dict(dims or {})
        self._shape: LatencyShape | None = None
        self.metric = metric
        self.profiles = list(profiles)
        # torch stages are exported as the recipe's export pass does (exporter, opset), so
        # their figures compare with the exported ones like for like
        self.export = export or ExportConfig()
        self.baseline_outputs: PerBatch | None = None
        self.baseline_value: float | None = None
        # The latest evaluated stage's eval outputs: the next pass's input, which a pass
        # judging its own accuracy (quantize) can compare to without running it again.
        self.last_outputs: PerBatch | None = None

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
        value = self._score(path, stage.name)
        model = onnx.load(str(path), load_external_data=False)
        shape = self.shape
        sample = feeds_for_batch(self.ctx.inputs, self.ctx.eval_batches, 1, shape.dims)
        macs_nodes = macs_by_node(model, {k: v.shape for k, v in sample.items()})
        macs = None if macs_nodes is None else int(sum(macs_nodes.values()))
        precision = precision_summary(model, macs_nodes)
        nbytes = size_bytes(path)
        per_profile = self._profiles(path, stage.name, macs, precision, nbytes, sample)
        warnings = stage.warnings + self._metric_warnings(model, stage)
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
        )

    def _metric_warnings(self, model, stage: Stage) -> tuple[str, ...]:
        """Said on every stage scored against the baseline: where the metric is fidelity
        and the baseline's output makes it untrustworthy (see ``fidelity_caveat``)."""
        from compactor.metrics import fidelity_caveat

        if (self.metric.name != "fidelity" or self.baseline_outputs is None
                or len(stage.lineage) <= 1):
            return ()
        why = fidelity_caveat(self.baseline_outputs)
        if why is None:
            return ()
        name = model.graph.output[0].name if model.graph.output else "?"
        shape = list(self.baseline_outputs.parts[0].shape)
        return (f"fidelity cannot be trusted on output '{name}' (shape {shape}): {why}; "
                "use a task metric (metric: module:fn, e.g. agreement of thresholded "
                "decisions, or mse with targets)",)

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

    def _score(self, path: Path, name: str) -> float:
        """The metric on the eval data; the first stage scored is the baseline."""
        outputs, targets = self._run_eval(path, name, self.ctx.eval_batches)
        if self.baseline_outputs is None:
            self.baseline_outputs = outputs
        elif outputs.shapes != self.baseline_outputs.shapes:
            got, want = outputs.shapes, self.baseline_outputs.shapes
            i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 0)
            raise PassError(
                f"stage '{name}' outputs shape {list(got[i][1:])} per sample on eval batch "
                f"{i}; the baseline gives {list(want[i][1:])}",
                "a compressed model must keep the baseline's output shape",
            )
        value = self.metric.score(outputs, targets, self.baseline_outputs)
        self.last_outputs = outputs
        if self.baseline_value is None:
            self.baseline_value = value
        return value

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
                outs.append(res[0])
                if b.target is not None:
                    tgts.append(b.target)
                task.advance()
        if tgts and len(tgts) != len(batches):
            raise DataError("some eval batches have targets and some do not",
                            "yield (inputs, target) for every batch, or for none")
        # kept per batch: batches padded to their own length give outputs that cannot be
        # concatenated (Metric.score joins them when they can be)
        return PerBatch.of(outs), (PerBatch.of(tgts) if tgts else None)

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
