"""``export``: torch → ONNX, simplified, and checked against torch on real inputs.

The current exporter (``torch.onnx.export(dynamo=True)``, built on onnxscript) is tried
first; when it fails, the legacy TorchScript exporter is used, and the stage records which
one produced the model and why. onnxsim's simplification is kept only if the simplified
model's outputs match the unsimplified one on real inputs. The machinery lives in
:mod:`compactor.exporting`; this module is only the pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compactor.errors import PassError
from compactor.exporting import ExportConfig, export_module, max_abs_error, simplify_checked
from compactor.passes.base import Pass, register

if TYPE_CHECKING:
    from compactor.budgets import SizeFloor
    from compactor.passes.base import RunContext
    from compactor.stage import Stage

__all__ = ["ExportConfig", "ExportPass"]


@register
class ExportPass(Pass):
    name = "export"
    Config = ExportConfig
    input_kind = "torch"
    output_kind = "onnx"
    summary = "torch → ONNX (dynamo exporter, legacy fallback), onnxsim, numeric check"

    def size_floor(self, floor: SizeFloor) -> SizeFloor:
        return floor  # the same weights, written to ONNX

    def run(self, stage: Stage, ctx: RunContext) -> Stage:
        cfg: ExportConfig = self.config
        path = ctx.work_path(f"{len(stage.lineage):02d}-export.onnx")
        batches = ctx.eval_batches[: cfg.check_batches]
        record = export_module(stage.module, ctx.inputs, batches[0], path, cfg, ctx.output_names)
        if cfg.simplify:
            record["simplify"] = simplify_checked(path, batches)
        warnings = ()
        if record.get("fallback_reason"):
            warnings = ("the dynamo exporter failed, the legacy exporter was used (reason in "
                        "the manifest)",)
        err = max_abs_error(stage.module, path, ctx.inputs, batches)
        record.update(err)
        if err["relative_error"] > cfg.tolerance:
            raise PassError(
                f"export: ONNX outputs differ from torch by {err['max_abs_error']:.3g} "
                f"(relative {err['relative_error']:.3g} > tolerance {cfg.tolerance:g})",
                "the model may depend on training-mode behaviour or random ops; raise "
                "export.tolerance only if this difference is acceptable",
            )
        return stage.derive("export", kind="onnx", onnx_path=path, record=record,
                            warnings=warnings)
