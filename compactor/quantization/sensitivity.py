"""Which quantized nodes hurt accuracy most: the ranking the float fallback walks.

- dynamic, MatMul nodes: each node's int8 error is emulated in numpy on the float model's
  own activations (activations quantized per input as ``DynamicQuantizeLinear`` does, weights
  as the candidate says): the node's output noise relative to its signal. One float run.
- static: ORT's ``qdq_loss_debug`` tools on the QDQ model: the SQNR of every quantized
  activation (before vs after its QDQ pair) and every weight; a node's noise is the sum over
  its quantized inputs.
- anything else: quantize one node at a time and measure the model output's noise.

Errors are noise-to-signal ratios (lower is better); ``sqnr_db`` is the same in dB.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .modes import IntType, QuantMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op_type: str
    error: float  # noise power / signal power of what the node's int8 form changes
    method: str  # emulated | qdq_loss_debug | one-at-a-time

    @property
    def sqnr_db(self) -> float:
        return 10 * math.log10(1.0 / max(self.error, 1e-30))

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type,
                "sqnr_db": round(self.sqnr_db, 2), "method": self.method}


# --------------------------------------------------------------------------- helpers


def const_weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a 2-D initializer (what dynamic int8 quantizes)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
            and n.input[0] not in inits]


def capture(path: Path, tensors: Sequence[str], feeds: Sequence[dict]) -> dict[str, list]:
    """Values of intermediate ``tensors`` of the model at ``path`` on each feed."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # No fusions: a fused node would hide the tensors asked for.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out: dict[str, list] = {t: [] for t in tensors}
    for f in feeds:
        values = sess.run(list(tensors), {k: v for k, v in f.items() if k in names})
        for t, v in zip(tensors, values, strict=True):
            out[t].append(v)
    return out


def fake_quant_weight(w: np.ndarray, per_channel: bool, reduce_range: bool,
                      weight_type: IntType | str = IntType.INT8, axis: int = 1) -> np.ndarray:
    """``w`` after symmetric int8 (or asymmetric uint8) quantization, as ORT does it."""
    w = w.astype(np.float32)
    red = (lambda a: np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)) if per_channel else (
        lambda a: a.reshape(1, -1))
    flat = red(w)
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = w.shape[axis]
    if weight_type == IntType.INT8:
        qmax = 63.0 if reduce_range else 127.0
        scale = np.maximum(np.abs(flat).max(1), 1e-12) / qmax
        scale = scale.reshape(shape)
        return np.clip(np.round(w / scale), -qmax, qmax) * scale
    qmax = 127.0 if reduce_range else 255.0
    lo, hi = np.minimum(flat.min(1), 0).reshape(shape), np.maximum(flat.max(1), 0).reshape(shape)
    scale = np.maximum(hi - lo, 1e-12) / qmax
    zp = np.round(-lo / scale)
    return (np.clip(np.round(w / scale) + zp, 0, qmax) - zp) * scale


@dataclass
class Runs:
    """One activation's captured runs, reduced to what the emulation needs: per run, the
    per-channel min and max (a run's dynamic range is over its whole tensor, and for
    ``x / s`` with ``s > 0`` it follows from those), and a strided subset of rows to
    multiply, stacked over the runs, with the run each row came from."""

    cmin: np.ndarray  # [runs, channels]
    cmax: np.ndarray  # [runs, channels]
    rows: np.ndarray  # [n, channels]
    run_of_row: np.ndarray  # [n]

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray], max_rows: int) -> Runs:
        xs = [a.reshape(-1, a.shape[-1]).astype(np.float32) for a in arrays]
        step = sum(len(x) for x in xs) // max_rows + 1
        picked = [x[::step] for x in xs]
        return cls(np.stack([x.min(0) for x in xs]), np.stack([x.max(0) for x in xs]),
                   np.concatenate(picked),
                   np.concatenate([np.full(len(p), i) for i, p in enumerate(picked)]))

    def quantized(self, s: np.ndarray | None, mode: QuantMode, signed: bool) -> np.ndarray:
        """The rows of ``x / s`` after int8 quantization: per run (``DynamicQuantizeLinear``,
        uint8) in dynamic mode, with one range over all runs (as calibrated) in static."""
        inv = 1.0 if s is None else 1.0 / s
        lo = np.minimum((self.cmin * inv).min(1), 0.0)  # per run; s > 0 keeps min/max
        hi = np.maximum((self.cmax * inv).max(1), 0.0)
        x = self.rows * inv
        static = mode == QuantMode.STATIC
        if static:
            lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
        if static and signed:
            scale = (np.maximum(np.maximum(-lo, hi), 1e-12) / 127.0)[self.run_of_row, None]
            return np.clip(np.round(x / scale), -127, 127) * scale
        scale = (np.maximum(hi - lo, 1e-12) / 255.0)[self.run_of_row, None]
        zp = np.clip(np.round(-lo[self.run_of_row, None] / scale), 0, 255)
        return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def dynamic_matmul_error(xs: Sequence[np.ndarray], w: np.ndarray, per_channel: bool,
                         reduce_range: bool, weight_type: IntType | str = IntType.INT8,
                         max_rows: int = 2048) -> float:
    """Noise-to-signal of ``x @ w`` under dynamic int8, over the captured runs ``xs``."""
    runs = Runs.of(xs, max_rows)
    y = runs.rows @ w
    got = runs.quantized(None, QuantMode.DYNAMIC, False) @ fake_quant_weight(
        w, per_channel, reduce_range, weight_type, axis=1)
    return float(((got - y) ** 2).sum()) / max(float((y**2).sum()), 1e-30)


# --------------------------------------------------------------------------- rankings


def rank_dynamic_matmuls(src: Path, feeds: Sequence[dict], per_channel: bool,
                         reduce_range: bool, weight_type: IntType | str = IntType.INT8,
                         nodes: Sequence[str] | None = None) -> list[NodeSensitivity]:
    """Emulated dynamic-int8 error of each constant-weight MatMul (all, or ``nodes``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    mms = [n for n in const_weight_matmuls(model) if nodes is None or n.name in nodes]
    acts = capture(src, sorted({n.input[0] for n in mms}), feeds)
    out = []
    for n in mms:
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        err = dynamic_matmul_error(acts[n.input[0]], w, per_channel, reduce_range,
                                   weight_type)
        out.append(NodeSensitivity(n.name, "MatMul", err, "emulated"))
    return sorted(out, key=lambda s: -s.error)


def rank_static(float_src: Path, qdq_model: Path, feeds: Sequence[dict], work: Path
                ) -> list[NodeSensitivity]:
    """Per-node error of a QDQ model from ORT's ``qdq_loss_debug`` tools."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg

    from compactor.exporting import quiet

    from .candidates import Calibration, ort_quiet

    aug = work / f"{qdq_model.stem}-debug.onnx"
    try:
        with quiet(), ort_quiet():
            dbg.modify_model_output_intermediate_tensors(str(qdq_model), str(aug))
            acts = dbg.collect_activations(str(aug), Calibration(feeds, 0, work).reader())
            matched = dbg.create_activation_matching(acts)
    finally:
        aug.unlink(missing_ok=True)
    # Each activation before vs after its QDQ pair: the error quantizing it adds. ORT's own
    # SQNR helper (and its weight matching) calls len() on what may be a 0-d value (a scalar
    # constant scaled by Mul/Add, as foreign detectors have), so the ratio is taken here.
    noise = {k: e for k, m in matched.items()
             if (e := noise_ratio(m.get("pre_qdq"), m.get("post_qdq"))) is not None}
    noise.update(weight_noise(float_src, qdq_model))
    quantized = _quantized_nodes(qdq_model)
    # A quantized tensor's error belongs to the nodes reading it and to the node writing it
    # in the QDQ graph: that node's output is quantized for it (with a Relu after it fused
    # away), so returning only the readers to float would leave the QDQ pair in place.
    qgraph = onnx.load(str(qdq_model), load_external_data=False).graph
    writer = {o: n.name for n in qgraph.node
              if n.op_type not in ("QuantizeLinear", "DequantizeLinear") for o in n.output}
    out_noise: dict[str, float] = {}
    for t, v in noise.items():
        w = writer.get(t) or writer.get(f"{t}_QuantizeLinear_Input")
        if w is not None:
            out_noise[w] = out_noise.get(w, 0.0) + v
    out = []
    for n in onnx.load(str(float_src), load_external_data=False).graph.node:
        if n.name not in quantized:
            continue
        err = sum(noise.get(i, 0.0) for i in n.input if i) + out_noise.get(n.name, 0.0)
        if err > 0:
            out.append(NodeSensitivity(n.name, n.op_type, err, "qdq_loss_debug"))
    return sorted(out, key=lambda s: -s.error)


def rank_one_at_a_time(nodes: Sequence[tuple[str, str]],
                       build_one: Callable[[str], Path], reference: np.ndarray,
                       run: Callable[[Path], np.ndarray], deadline: float
                       ) -> list[NodeSensitivity]:
    """Quantize each node alone (``build_one(name)``) and measure the output's noise; nodes
    not reached before ``deadline`` rank last, in their graph order."""
    ref = reference.astype(np.float64)
    signal = max(float((ref**2).sum()), 1e-30)
    ranked, rest = [], []
    for name, op in nodes:
        if time.monotonic() > deadline:
            rest.append(NodeSensitivity(name, op, 0.0, "not ranked (time budget)"))
            continue
        got = run(build_one(name)).astype(np.float64)
        ranked.append(NodeSensitivity(name, op, float(((got - ref) ** 2).sum()) / signal,
                                      "one-at-a-time"))
    return sorted(ranked, key=lambda s: -s.error) + rest


def noise_ratio(x: Any, y: Any) -> float | None:
    """Noise power over signal power of ``y`` against ``x``: arrays, 0-d values or lists of
    them (one per run). None when the two do not pair up (different counts or sizes)."""
    xs = x if isinstance(x, (list, tuple)) else [x]
    ys = y if isinstance(y, (list, tuple)) else [y]
    if x is None or y is None or len(xs) != len(ys) or not xs:
        return None
    noise = signal = 0.0
    for a, b in zip(xs, ys, strict=True):
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        if a.shape != b.shape:
            return None
        noise += float(((a - b) ** 2).sum())
        signal += float((a**2).sum())
    if not math.isfinite(noise) or not math.isfinite(signal):
        return None
    return noise / max(signal, 1e-30)


QUANT_SUFFIX = "_quantized"  # ORT's name for a quantized copy of an initializer


def weight_noise(float_src: Path, qdq_model: Path) -> dict[str, float]:
    """Each quantized weight's noise ratio (float vs dequantized), keyed by the float
    weight's name. Handles what ORT's ``create_weight_matching`` does not: 0-d weights and
    scales, per-axis scales on any axis; a weight that cannot be paired is left out."""
    import onnx
    from onnx import numpy_helper

    floats = {t.name: t for t in onnx.load(str(float_src)).graph.initializer}
    qgraph = onnx.load(str(qdq_model)).graph
    inits = {t.name: t for t in qgraph.initializer}
    out: dict[str, float] = {}
    for n in qgraph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        name = n.input[0]
        base = name[: -len(QUANT_SUFFIX)] if name.endswith(QUANT_SUFFIX) else None
        if base not in floats or n.input[1] not in inits:
            continue
        try:
            deq = _dequantize(n, inits)
            err = noise_ratio(numpy_helper.to_array(floats[base]), deq)
        except (ValueError, TypeError, IndexError) as e:  # an unusual layout: leave it out
            log.debug("weight %s not compared: %s", base, e)
            continue
        if err is not None:
            out[base] = err
    return out


def _dequantize(node, inits) -> np.ndarray:
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = (numpy_helper.to_array(inits[zp_name]).astype(np.float64) if zp_name in inits
          else np.zeros_like(scale))
    if scale.size > 1:  # per axis: broadcast along the node's axis
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    return (q - zp) * scale


def _quantized_nodes(qdq_model: Path) -> set[str]:
    """Names of the nodes of a QDQ model fed by a DequantizeLinear (the int8 ones)."""
    import onnx

    graph = onnx.load(str(qdq_model), load_external_data=False).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dq_out for i in n.input)}
