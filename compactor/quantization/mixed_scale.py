"""Tensors whose one int8 range would span values of very different scale.

Static int8 gives each activation tensor one range (scale and zero point). A detector head
that concatenates box coordinates in pixels (0..640) with class scores (0..1) into one
output, as YOLOv8's export does, gets one range for both: a step of ~2.5 px, coarser than
the whole score range, so every score becomes one or two values (a real YOLOv8-style model:
output scale 1.268, detection F1 against fp32 0.52, while a cosine fidelity read 0.9993).
ONNX Runtime's static quantizer has no per-channel ranges for activations, so such a
tensor is kept float instead: the node that writes it is excluded from int8 and each of
its inputs keeps the range of its own branch.

Which tensors are checked: every graph output, and, walking back from the outputs through
nodes that do no multiply-accumulates (Concat, Reshape, Transpose, Mul, Sigmoid, ...), the
tensors they read, up to and including the outputs of the compute nodes (Conv, MatMul,
Gemm) that feed them. Hidden layers are not checked: their ranges are the calibration's
business, and the accuracy search handles what it misses.

A tensor is *mixed* along an axis when one of its slices along that axis is not constant
but would get fewer than :data:`MIN_LEVELS` of the 256 int8 levels under the whole tensor's
range, while the widest slice is at least :data:`MIN_RATIO` times wider: values of
different units or orders of magnitude, not a range that calibration merely estimated
badly. The axes: every axis but the batch axis 0 of a tensor of rank 2 or 3 (``[B, C]``,
``[B, C, N]``, ``[B, N, C]``), the channel axis 1 of a higher-rank one (an ``[N, C, H, W]``
map's rows and columns are places, not units: a text detector's probability map is near 0
in rows without text). Softmax outputs are not checked: probabilities share one unit by
construction, and a rare class's are small, not of another kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_LEVELS = 16.0  # a slice with fewer int8 levels than this is collapsed
MIN_RATIO = 30.0  # widest slice / narrow slice: orders of magnitude, not noise
MAX_DEPTH = 8  # nodes walked back from an output
MAX_SLICES = 4096  # axes longer than this are not checked (they are not channel axes)
MAX_SAMPLES = 64  # calibration samples run for the check (orders of magnitude show early)
NOT_CHECKED = ("Softmax", "LogSoftmax")  # their outputs share one unit by construction
COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention")


@dataclass(frozen=True)
class MixedTensor:
    """A tensor one int8 range would collapse: along ``axis``, ``narrow`` slices (indices)
    would get ``levels`` int8 levels (the fewest), next to slices ``ratio`` times wider."""

    tensor: str
    node: str  # the node that writes it (kept float)
    op_type: str
    axis: int
    narrow: tuple[int, ...]
    wide_range: tuple[float, float]  # (min, max) of the widest slice
    narrow_range: tuple[float, float]  # (min, max) over the narrow slices
    levels: float
    ratio: float

    def describe(self) -> str:
        idx = _spans(self.narrow)
        return (f"{self.tensor} mixes scales along axis {self.axis}: slices {idx} span "
                f"{_fmt(self.narrow_range)}, next to slices spanning {_fmt(self.wide_range)} "
                f"({self.ratio:.0f}x wider); one int8 range would leave them "
                f"{self.levels:.1f} of 256 levels")

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "node": self.node, "op_type": self.op_type,
                "axis": self.axis, "narrow_slices": _spans(self.narrow),
                "narrow_range": [float(f"{v:.4g}") for v in self.narrow_range],
                "wide_range": [float(f"{v:.4g}") for v in self.wide_range],
                "int8_levels": round(self.levels, 2), "ratio": round(self.ratio, 1),
                "action": f"{self.op_type} node {self.node!r} kept float: its inputs keep "
                          "their own int8 ranges"}


def checked_tensors(model) -> list[str]:
    """Graph outputs and the tensors behind them through MAC-free nodes (see above)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    out: list[str] = []
    frontier = [(o.name, 0) for o in model.graph.output]
    while frontier:
        name, depth = frontier.pop(0)
        if name in out or name in inits or name not in producers:
            continue
        out.append(name)
        node = producers[name]
        if node.op_type in COMPUTE or depth >= MAX_DEPTH:
            continue
        frontier += [(i, depth + 1) for i in node.input if i]
    return out


def find_mixed(tensor: str, values: dict[int, tuple[np.ndarray, np.ndarray]]
               ) -> tuple[int, np.ndarray, float, float] | None:
    """From per-axis (slice minima, slice maxima): the axis where the tensor is mixed, its
    narrow slices, their fewest levels and the wide/narrow ratio (None: not mixed)."""
    best = None
    for axis, (lo, hi) in values.items():
        if lo.size < 2:
            continue
        full = max(float(hi.max()), 0.0) - min(float(lo.min()), 0.0)  # ORT's range has 0
        if not np.isfinite(full) or full <= 0:
            continue
        width = (hi - lo).astype(np.float64)
        levels = 255.0 * width / full
        live = width > full * 1e-7  # constant slices lose nothing
        narrow = np.flatnonzero(live & (levels < MIN_LEVELS))
        if not narrow.size:
            continue
        ratio = float(width.max() / width[narrow].min())
        if ratio < MIN_RATIO:
            continue
        fewest = float(levels[narrow].min())
        if best is None or fewest < best[2]:
            best = (axis, narrow, fewest, ratio)
    return best


def detect(src: Path, model, feeds: Sequence[dict], work: Path) -> list[MixedTensor]:
    """The checked tensors of ``model`` (the float model at ``src``) that one int8 range
    would collapse, from their ranges on the calibration ``feeds``."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = [n for n in _float_tensors(model, checked_tensors(model))
             if producers[n].op_type not in NOT_CHECKED]
    if not names or not feeds:
        return []
    stats = _slice_ranges(src, model, names, _first_samples(feeds, MAX_SAMPLES), work)
    found: list[MixedTensor] = []
    for name in names:
        hit = find_mixed(name, stats.get(name, {}))
        if hit is None:
            continue
        axis, narrow, levels, ratio = hit
        lo, hi = stats[name][axis]
        wide = int(np.argmax(hi - lo))
        node = producers[name]
        found.append(MixedTensor(
            name, node.name, node.op_type, axis, tuple(int(i) for i in narrow),
            (float(lo[wide]), float(hi[wide])),
            (float(lo[narrow].min()), float(hi[narrow].max())), levels, ratio))
    return found


def _first_samples(feeds: Sequence[dict], n: int) -> list[dict]:
    """The first feeds holding ``n`` samples (a feed's size: its first input's axis 0)."""
    out, seen = [], 0
    for f in feeds:
        if seen >= n:
            break
        out.append(f)
        first = next(iter(f.values()), None)
        seen += int(first.shape[0]) if getattr(first, "ndim", 0) else 1
    return out


def _float_tensors(model, names: list[str]) -> list[str]:
    """Those of ``names`` that are float tensors (by ONNX shape inference)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an unknown type only skips the check
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output)}
    return [n for n in names if types.get(n) == onnx.TensorProto.FLOAT]


def _slice_ranges(src: Path, model, names: list[str], feeds: Sequence[dict], work: Path
                  ) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per tensor and axis (not 0): each slice's min and max over all ``feeds``. An axis
    whose length differs between feeds (images of their own width) is dropped."""
    import onnx
    from onnx import helper

    from compactor.measure.latency import session

    probe = onnx.load(str(src))
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)
    path = work / "mixed-scale-probe.onnx"
    onnx.save(probe, str(path))
    sess = session(path)
    inputs = {i.name for i in sess.get_inputs()}
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    dropped: set[tuple[str, int]] = set()
    for feed in feeds:
        values = sess.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, v in zip(names, values, strict=True):
            _merge(out.setdefault(name, {}), name, np.asarray(v, np.float32), dropped)
    path.unlink(missing_ok=True)
    return out


def _merge(acc: dict[int, tuple[np.ndarray, np.ndarray]], name: str, v: np.ndarray,
           dropped: set[tuple[str, int]]) -> None:
    if not v.size:
        return
    for axis in range(1, v.ndim) if v.ndim <= 3 else (1,):
        if (name, axis) in dropped or not 2 <= v.shape[axis] <= MAX_SLICES:
            continue
        other = tuple(a for a in range(v.ndim) if a != axis)
        lo, hi = v.min(axis=other), v.max(axis=other)
        if axis in acc:
            if acc[axis][0].shape != lo.shape:
                dropped.add((name, axis))
                del acc[axis]
                continue
            lo, hi = np.minimum(acc[axis][0], lo), np.maximum(acc[axis][1], hi)
        acc[axis] = (lo, hi)


def _spans(idx: Sequence[int]) -> str:
    """[4, 5, 6, 9] → '4-6, 9'."""
    parts, start = [], None
    for i, k in enumerate(idx):
        if start is None:
            start = k
        if i + 1 == len(idx) or idx[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def _fmt(r: tuple[float, float]) -> str:
    return f"{r[0]:.3g}..{r[1]:.3g}"
