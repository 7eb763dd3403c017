"""SmoothQuant-style scale migration for the inputs of MatMul/Gemm (and ORT's fused
Attention) with constant weights.

An activation with a few outlier channels wastes a per-tensor int8 range: every other
channel gets few levels. Dividing channel k of the activation by ``s_k`` and multiplying row
k of the weight by ``s_k`` leaves the float product unchanged and moves the difficulty into
the weight, which is quantized per output channel. ``s_k = max|x_k|^a / max|w_k|^(1-a)``;
``a`` is chosen per activation (shared by all MatMuls reading it) from a small grid, by the
int8 error of its MatMuls emulated on calibration activations, and a group is left alone
when no ``a`` helps. The division is a ``Mul`` inserted before the group (cheap next to the
MatMul); for static int8 those Muls stay in float.

After Xiao et al., "SmoothQuant" (2023).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .candidates import SMOOTH_MUL_SUFFIX
from .modes import QuantMode
from .sensitivity import Runs, capture, fake_quant_weight

log = logging.getLogger(__name__)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_GAIN = 0.8  # apply only when the emulated error falls below 80% of the unsmoothed one


@dataclass
class SmoothResult:
    path: Path
    mul_nodes: list[str] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def applied(self) -> bool:
        return bool(self.mul_nodes)

    def describe(self) -> str:
        alphas = sorted({g["alpha"] for g in self.groups})
        return (f"{len(self.groups)} activation(s) smoothed, alpha "
                + "/".join(f"{a:g}" for a in alphas))


def _groups(model) -> dict[str, list[tuple[Any, int]]]:
    """Activation tensor -> [(MatMul/Gemm node, axis of the weight's input channels)]."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[tuple[Any, int]]] = {}
    for n in model.graph.node:
        if len(n.input) < 2 or n.input[0] in inits or n.input[1] not in inits:
            continue
        if len(inits[n.input[1]].dims) != 2:
            continue
        if n.op_type == "MatMul" or (n.op_type == "Attention" and n.domain == "com.microsoft"):
            # ORT's fused Attention: input 0 times the [hidden, 3 × hidden] QKV weight
            out.setdefault(n.input[0], []).append((n, 0))
        elif n.op_type == "Gemm":
            attrs = {a.name: a.i for a in n.attribute}
            if attrs.get("transA", 0):
                continue
            out.setdefault(n.input[0], []).append((n, 1 if attrs.get("transB", 0) else 0))
    return out


def _group_error(runs: Runs, ws: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                 s: np.ndarray | None, mode: QuantMode, per_channel: bool, reduce_range: bool,
                 signed: bool) -> float:
    """Emulated int8 noise-to-signal of the group's MatMuls with smoothing ``s``;
    ``refs[j]`` is the float product of the sampled rows with weight j."""
    xq = runs.quantized(s, mode, signed)
    noise = signal = 0.0
    for w, y in zip(ws, refs, strict=True):
        q = fake_quant_weight(w if s is None else w * s[:, None], per_channel, reduce_range)
        noise += float(((xq @ q - y) ** 2).sum())
        signal += float((y**2).sum())
    return noise / max(signal, 1e-30)


@dataclass
class GroupScale:
    """The smoothing chosen for one activation and the MatMuls reading it."""

    activation: str
    nodes: list[str]
    alpha: float
    scale: np.ndarray  # s: the activation is divided by it, the weights' rows multiplied
    sqnr_db: tuple[float, float]  # emulated int8 SQNR of the group without / with it

    @property
    def gain_db(self) -> float:
        return self.sqnr_db[1] - self.sqnr_db[0]

    def to_dict(self) -> dict[str, Any]:
        return {"activation": self.activation, "alpha": self.alpha, "nodes": self.nodes,
                "emulated_sqnr_db": [round(v, 2) for v in self.sqnr_db]}


def choose_scales(src: Path, feeds: Sequence[dict], mode: QuantMode, per_channel: bool,
                  reduce_range: bool, signed_activations: bool = False,
                  alpha: float | None = None, max_rows: int = 1024,
                  deadline: float | None = None) -> list[GroupScale]:
    """The smoothing worth doing, largest emulated gain first (``alpha`` None: chosen per
    activation). ``feeds`` are one per run, as the model is served: a dynamic range spans
    one run's whole tensor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    groups = _groups(model)
    if not groups:
        return []
    acts = capture(src, sorted(groups), feeds)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for x_name, members in groups.items():
        if deadline is not None and time.monotonic() > deadline:
            log.info("smoothing stopped at the search's time budget")
            break
        runs = Runs.of(acts.pop(x_name), max_rows)
        ws = []
        for n, axis in members:
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            ws.append(w if axis == 0 else w.T)  # as [in, out]
        amax = np.maximum(np.abs(runs.cmin), np.abs(runs.cmax)).max(0)
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
        if amax.shape != wmax.shape:
            continue
        refs = [runs.rows @ w for w in ws]
        base = _group_error(runs, ws, refs, None, mode, per_channel, reduce_range,
                            signed_activations)
        best = (base, None, None)
        for a in (ALPHAS if alpha is None else (alpha,)):
            s = (np.maximum(amax, 1e-5) ** a / np.maximum(wmax, 1e-5) ** (1 - a))
            s = np.clip(s, 1e-3, 1e3).astype(np.float32)
            err = _group_error(runs, ws, refs, s, mode, per_channel, reduce_range,
                               signed_activations)
            if err < best[0]:
                best = (err, a, s)
        err, a, s = best
        if s is None or (alpha is None and err > MIN_GAIN * base):
            continue
        out.append(GroupScale(x_name, [n.name for n, _ in members], float(a), s,
                              (_db(base), _db(err))))
    return sorted(out, key=lambda g: -g.gain_db)


def apply_scales(src: Path, dst: Path, scales: Sequence[GroupScale]) -> SmoothResult:
    """Write ``src`` with ``scales`` applied to ``dst``: weights' rows multiplied, and a
    ``Mul`` by ``1/s`` inserted before each group's MatMuls."""
    import onnx
    from onnx import helper, numpy_helper

    if not scales:
        return SmoothResult(src)
    model = onnx.load(str(src))
    groups = _groups(model)
    inits = {t.name: t for t in model.graph.initializer}
    result = SmoothResult(dst)
    inserted: list[tuple[list, Any]] = []
    for g in scales:
        members = groups[g.activation]
        s = g.scale
        for n, axis in members:
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            w = (w if axis == 0 else w.T) * s[:, None]
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(w if axis == 0 else w.T), n.input[1]))
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32),
                                      f"{g.activation}_smooth_scale")
        model.graph.initializer.append(inv)
        y = f"{g.activation}_smoothed"
        mul = helper.make_node("Mul", [g.activation, inv.name], [y],
                               name=f"{members[0][0].name}{SMOOTH_MUL_SUFFIX}")
        for n, _ in members:
            n.input[0] = y
        inserted.append(([n for n, _ in members], mul))
        result.mul_nodes.append(mul.name)
        result.groups.append(g.to_dict())
    nodes = list(model.graph.node)
    for members, mul in inserted:  # each Mul just before the first MatMul that reads it
        nodes.insert(min(nodes.index(n) for n in members), mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return result


def smooth(src: Path, dst: Path, feeds: Sequence[dict], mode: QuantMode, per_channel: bool,
           reduce_range: bool, signed_activations: bool = False,
           alpha: float | None = None, max_rows: int = 1024,
           deadline: float | None = None) -> SmoothResult:
    """Choose the scales and write the smoothed model (every worthwhile group)."""
    scales = choose_scales(src, feeds, mode, per_channel, reduce_range, signed_activations,
                           alpha, max_rows, deadline)
    return apply_scales(src, dst, scales)


def _db(err: float) -> float:
    return float(10 * np.log10(1.0 / max(err, 1e-30)))
