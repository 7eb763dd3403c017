"""One int8 configuration (:class:`Candidate`), and how to build it with ORT's quantizer.

Calibration runs once per (model, method, op set): the activation ranges are cached in the
work folder and reused by every candidate that differs only in format, types or exclusions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from compactor.quantization.modes import IntType, QuantFormat, QuantMode

log = logging.getLogger(__name__)

# Op types quantized under "compute" (the heavy ones); "all" is every op ORT can quantize.
COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# On a transformer-fused graph, ORT's Attention op holds the QKV projection: a compute op
# (without it, "compute ops fused" left every attention block float: 1.52x fp32 on MiniLM
# where "all ops fused" ran 1.93x)
FUSED_COMPUTE_OP_TYPES = (*COMPUTE_OP_TYPES, "Attention")
SMOOTH_MUL_SUFFIX = "/SmoothQuantMul"  # the scale Muls smoothing inserts: float by design


@dataclass(frozen=True)
class Candidate:
    """An int8 configuration. ``source`` is the float model it quantizes (the prepared
    input, its transformer-fused form, or a smoothed copy of either); ``exclude`` are node
    names kept in float."""

    mode: QuantMode
    source: Path
    format: QuantFormat = QuantFormat.QDQ  # static only
    activation_type: IntType = IntType.UINT8
    weight_type: IntType = IntType.INT8
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None  # None: every op type ORT can quantize
    calibration_method: str = "minmax"
    percentile: float = 99.999
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    exclude: tuple[str, ...] = ()
    smoothquant: str | None = None  # a description, when ``source`` is a smoothed model
    fused: bool = False  # ``source`` has ORT's transformer fusions (Attention, ...)

    def __post_init__(self) -> None:
        # Callers may give the recipe's words; from here on they are members.
        for name, kind in (("mode", QuantMode), ("format", QuantFormat),
                           ("activation_type", IntType), ("weight_type", IntType)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    def replace(self, **changes: Any) -> Candidate:
        return dataclasses.replace(self, **changes)

    @property
    def types(self) -> str:
        """``U8S8`` style: activation then weight type."""
        return self.activation_type.short + self.weight_type.short

    @property
    def ops_label(self) -> str:
        if self.op_types is None:
            return "all ops"
        if set(self.op_types) <= set(FUSED_COMPUTE_OP_TYPES):
            return "compute ops"
        return "ops " + "/".join(self.op_types)

    @property
    def label(self) -> str:
        parts = [self.mode.value]
        if self.mode == QuantMode.STATIC:
            parts += [self.format.label, self.types]
        else:
            parts.append(f"{self.types[2:]} weights")
        parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.reduce_range:
            parts.append("7-bit weights")
        parts.append(self.ops_label)
        if self.fused:
            parts.append("fused")
        if self.mode == QuantMode.STATIC and self.calibration_method != "minmax":
            parts.append(self.calibration_method + (
                f" {self.percentile:g}" if self.calibration_method == "percentile" else ""))
        if self.smoothquant:
            parts.append("smoothed")
        floats = [n for n in self.exclude if not n.endswith(SMOOTH_MUL_SUFFIX)]
        if floats:
            parts.append(f"{len(floats)} node(s) float")
        return " ".join(parts)

    @property
    def key(self) -> str:
        """A short stable id, for file names."""
        text = repr(tuple(str(v) if isinstance(v, Enum) else v
                          for v in dataclasses.astuple(self)))
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode.value}
        if self.mode == QuantMode.STATIC:
            out.update(format=self.format.value, activation_type=self.activation_type.value,
                       calibration_method=self.calibration_method,
                       activation_symmetric=self.activation_symmetric)
            if self.calibration_method == "percentile":
                out["percentile"] = self.percentile
        out.update(weight_type=self.weight_type.value, per_channel=self.per_channel,
                   reduce_range=self.reduce_range, weight_symmetric=self.weight_symmetric,
                   op_types="all" if self.op_types is None else list(self.op_types))
        if self.smoothquant:
            out["smoothed"] = self.smoothquant
        if self.fused:
            out["fused"] = True  # ORT transformer fusions: see record.transformer_fusion
        return out


class Calibration:
    """The calibration feeds, and a cache of activation ranges in ``work``."""

    def __init__(self, feeds: Sequence[dict], samples: int, work: Path):
        self.feeds = list(feeds)
        self.samples = samples
        self.work = work

    @property
    def uniform(self) -> bool:
        """Whether every feed has the same shapes (batches padded to their own length, or
        images of their own width, do not)."""
        shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in self.feeds}
        return len(shapes) <= 1

    def reader(self):
        from onnxruntime.quantization import CalibrationDataReader

        feeds = self.feeds

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._range = (0, len(feeds))
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)

            def rewind(self):
                self._it = iter(feeds[self._range[0]:self._range[1]])

            def set_range(self, start_index: int, end_index: int):
                # ORT's strided calibration collects one range at a time
                self._range = (start_index, end_index)
                self.rewind()

            def __len__(self):
                return len(feeds)

        return Reader()

    def cache_path(self, c: Candidate, op_types: Sequence[str] | None) -> Path:
        text = repr((str(c.source), c.calibration_method, c.percentile, op_types))
        return self.work / f"calib-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"


@contextlib.contextmanager
def ort_quiet() -> Iterator[None]:
    """ORT's quantizer logs advice on the root logger; the library never prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def op_types_for(c: Candidate, present: set[str], excluded_types: Sequence[str]
                 ) -> list[str] | None:
    """The op types to pass to ORT: the candidate's set minus the excluded types."""
    if c.op_types is None and not excluded_types:
        return None
    if c.op_types is None:
        from onnxruntime.quantization.registry import (
            IntegerOpsRegistry,
            QDQRegistry,
            QLinearOpsRegistry,
        )

        reg = (set(IntegerOpsRegistry) if c.mode == QuantMode.DYNAMIC
               else set(QLinearOpsRegistry) | set(QDQRegistry))
        base = present & reg
    else:
        base = set(c.op_types)
    return sorted(base - set(excluded_types))


def build(c: Candidate, dst: Path, calibration: Calibration | None,
          excluded_types: Sequence[str] = ()) -> Path:
    """Quantize ``c.source`` into ``dst`` as ``c`` says. ORT's errors propagate."""
    import onnx

    from compactor.exporting import quiet

    present = {n.op_type for n in onnx.load(str(c.source), load_external_data=False).graph.node}
    op_types = op_types_for(c, present, excluded_types)
    with quiet(), ort_quiet():
        if c.mode == QuantMode.DYNAMIC:
            _quantize_dynamic(c, dst, op_types)
        else:
            if calibration is None:  # the recipe check makes this a bug, not a user error
                raise ValueError("static quantization without calibration data")
            _quantize_static(c, dst, op_types, calibration)
    return dst


def _qtype(t: IntType):
    import onnxruntime.quantization as oq

    return oq.QuantType.QUInt8 if t == IntType.UINT8 else oq.QuantType.QInt8


def _quantize_dynamic(c: Candidate, dst: Path, op_types: list[str] | None) -> None:
    import onnx
    import onnxruntime.quantization as oq

    oq.quantize_dynamic(
        str(c.source), str(dst),
        per_channel=c.per_channel,
        reduce_range=c.reduce_range,
        weight_type=_qtype(c.weight_type),
        nodes_to_exclude=sorted(c.exclude),
        op_types_to_quantize=op_types,
        extra_options={"WeightSymmetric": c.weight_symmetric,
                       # contrib ops (fused graphs) have no type ORT can infer
                       "DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _quantize_static(c: Candidate, dst: Path, op_types: list[str] | None,
                     calibration: Calibration) -> None:
    import onnx
    import onnxruntime.quantization as oq

    extra: dict[str, Any] = {
        "ActivationSymmetric": c.activation_symmetric,
        "WeightSymmetric": c.weight_symmetric,
        "DefaultTensorType": onnx.TensorProto.FLOAT,
    }
    if c.calibration_method == "percentile":
        extra["CalibPercentile"] = c.percentile
    if c.calibration_method != "minmax" and not calibration.uniform:
        # The histogram calibrators stack every feed's activations into one array, which
        # fails when feeds differ in shape (text images of their own width, sequences
        # padded per batch). Collected one feed at a time, the histograms merge instead.
        extra["CalibStridedMinMax"] = 1
    method = {
        "minmax": oq.CalibrationMethod.MinMax,
        "entropy": oq.CalibrationMethod.Entropy,
        "percentile": oq.CalibrationMethod.Percentile,
    }[c.calibration_method]
    oq.quantize_static(
        str(c.source), str(dst), calibration.reader(),
        quant_format=(oq.QuantFormat.QDQ if c.format == QuantFormat.QDQ
                      else oq.QuantFormat.QOperator),
        per_channel=c.per_channel,
        reduce_range=c.reduce_range,
        activation_type=_qtype(c.activation_type),
        weight_type=_qtype(c.weight_type),
        calibrate_method=method,
        nodes_to_exclude=sorted(c.exclude),
        op_types_to_quantize=op_types,
        extra_options=extra,
        calibration_cache_path=calibration.cache_path(c, op_types),
    )
