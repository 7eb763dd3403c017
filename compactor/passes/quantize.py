"""``quantize``: ONNX → int8 ONNX with ONNX Runtime's quantization tool.

``static``: QDQ (or QOperator) with activation ranges from the recipe's calibration data,
per-channel int8 weights. ``dynamic``: int8 weights, activations quantized at run time
(suits MatMul-heavy transformer graphs). The model is pre-processed first (ORT's
``quant_pre_process``: shape inference and graph optimization); when ORT's symbolic shape
inference gives up, plain ONNX shape inference is used and the stage says so.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from compactor.errors import DataError, PassError
from compactor.passes import Pass, PassConfig, register

if TYPE_CHECKING:
    from compactor.pipeline import RunContext
    from compactor.stage import Stage

log = logging.getLogger(__name__)


class QuantizeConfig(PassConfig):
    mode: Literal["static", "dynamic"] = "static"
    format: Literal["qdq", "qoperator"] = Field(
        default="qdq", description="static only: QDQ pairs, or fused QLinear* operators"
    )
    per_channel: bool = Field(default=True, description="one scale per output channel")
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool = Field(
        default=False, description="7-bit weights: avoids u8s8 overflow on CPUs without VNNI"
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(default=99.999, gt=90, le=100)
    calibration_samples: int = Field(default=256, ge=1)
    preprocess: bool = Field(default=True, description="ORT quant_pre_process first")
    exclude_nodes: tuple[str, ...] = Field(default=(), description="node-name globs kept float")
    exclude_op_types: tuple[str, ...] = Field(default=(), description="op types kept float")


@register
class QuantizePass(Pass):
    name = "quantize"
    Config = QuantizeConfig
    input_kind = "onnx"
    output_kind = "onnx"
    summary = "int8 with ONNX Runtime: static (calibrated QDQ) or dynamic"

    def run(self, stage: Stage, ctx: RunContext) -> Stage:
        cfg: QuantizeConfig = self.config
        step = f"{len(stage.lineage):02d}-quantize"
        record: dict[str, Any] = {"mode": cfg.mode}
        src = _ensure_opset(stage.onnx_path, ctx.work_path(f"{step}-opset.onnx"), record)
        if cfg.preprocess:
            src = _preprocess(src, ctx.work_path(f"{step}-pre.onnx"), record)
        out = ctx.work_path(f"{step}.onnx")
        nodes_to_exclude = _match_nodes(src, cfg.exclude_nodes, record)
        op_types = _op_types(src, cfg.exclude_op_types)
        try:
            if cfg.mode == "static":
                self._static(src, out, cfg, ctx, nodes_to_exclude, op_types, record)
            else:
                self._dynamic(src, out, cfg, nodes_to_exclude, op_types, record)
        except (PassError, DataError):
            raise
        except Exception as e:  # noqa: BLE001 - ORT's quantizer raises many types
            raise PassError(
                f"quantize ({cfg.mode}) failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:300]}",
                "try mode: dynamic, or exclude the failing node with exclude_nodes",
            ) from e
        record.update(_int8_summary(out))
        return stage.derive("quantize", kind="onnx", onnx_path=out, record=record)

    def _static(self, src, out, cfg, ctx, nodes_to_exclude, op_types, record) -> None:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        batches = ctx.calibration_batches(cfg.calibration_samples)
        used = sum(b.size for b in batches)
        record["calibration_samples"] = used
        if used < cfg.calibration_samples:
            record.setdefault("warnings", []).append(
                f"asked for {cfg.calibration_samples} calibration samples, the data has {used}"
            )
        import onnx

        names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(batches)

            def get_next(self):
                b = next(self._it, None)
                return None if b is None else {k: v for k, v in b.inputs.items() if k in names}

            def rewind(self):
                self._it = iter(batches)

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.calibration_method]
        extra = {}
        if cfg.calibration_method == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        quantize_static(
            str(src),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=qtype[cfg.activation_type],
            weight_type=qtype[cfg.weight_type],
            calibrate_method=method,
            nodes_to_exclude=nodes_to_exclude,
            op_types_to_quantize=op_types,
            extra_options=extra,
        )
        record.update(
            format=cfg.format,
            per_channel=cfg.per_channel,
            activation_type=cfg.activation_type,
            weight_type=cfg.weight_type,
            reduce_range=cfg.reduce_range,
            calibration_method=cfg.calibration_method,
        )

    def _dynamic(self, src, out, cfg, nodes_to_exclude, op_types, record) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        quantize_dynamic(
            str(src),
            str(out),
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            weight_type=qtype[cfg.weight_type],
            nodes_to_exclude=nodes_to_exclude,
            op_types_to_quantize=op_types,
        )
        record.update(per_channel=cfg.per_channel, weight_type=cfg.weight_type,
                      reduce_range=cfg.reduce_range)


def _ensure_opset(src: Path, dst: Path, record: dict[str, Any]) -> Path:
    """Per-channel quantization needs opset >= 13; older models are upgraded first."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if got >= 13:
        return src
    try:
        converted = version_converter.convert_version(model, 13)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001
        raise PassError(
            f"quantize: the model is at opset {got}, and upgrading it to 13 failed: {e}",
            "re-export the model at opset 13 or later",
        ) from e
    onnx.save(converted, str(dst))
    record["opset_upgraded"] = {"from": got, "to": 13}
    return dst


def _preprocess(src: Path, dst: Path, record: dict[str, Any]) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compactor.passes.export import quiet

    try:
        with quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        record["preprocess"] = "symbolic shape inference + optimization"
        return dst
    except Exception as e:  # noqa: BLE001
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
        log.info("symbolic shape inference failed (%s); using ONNX shape inference", first)
    try:
        with quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        record["preprocess"] = "ONNX shape inference + optimization"
        record.setdefault("warnings", []).append(
            "ONNX Runtime's symbolic shape inference gave up on this model; used plain ONNX "
            "shape inference"
        )
        return dst
    except Exception as e:  # noqa: BLE001
        record["preprocess"] = "skipped"
        record.setdefault("warnings", []).append(f"pre-processing failed and was skipped: {e}")
        return src


def _match_nodes(src: Path, globs: tuple[str, ...], record: dict[str, Any]) -> list[str]:
    if not globs:
        return []
    import onnx

    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node]
    matched = sorted({n for n in names for g in globs if fnmatch.fnmatchcase(n, g)})
    unused = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unused:
        record.setdefault("warnings", []).append(
            f"exclude_nodes patterns matched no node: {', '.join(unused)}"
        )
    record["excluded_nodes"] = matched
    return matched


def _op_types(src: Path, excluded: tuple[str, ...]) -> list[str] | None:
    if not excluded:
        return None
    import onnx

    present = {n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node}
    return sorted(present - set(excluded))


def _int8_summary(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    int8 = sum(
        1 for t in model.graph.initializer
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 1
        and math.prod(t.dims) > 1
    )
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    quant_ops = {k: v for k, v in ops.items() if "Integer" in k or k.startswith("QLinear")
                 or k in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")}
    return {"int8_weight_tensors": int8, "quantization_ops": quant_ops}
