"""int8 on the wire, shared by the two-device planner and the chain planner: what
quantizing the tensors sent between parts does to the model's outputs.

Both planners run the float model and their int8 parts on batches not used for the scales
and report the same figures for an output: the largest absolute difference, the SQNR
(signal to quantization noise, dB) against the float model, the least cosine similarity of
a sample's output to the float one, and, for a 2-D output of several classes, top-1
agreement and, where labels are known, accuracy with and without int8 on the wire; and,
per tensor sent, whether it travels with one scale or one per channel
(:func:`compactor.partition.graph.quant_params` chooses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compactor.partition.graph import WireQuant, sqnr_db

MODE = "int8 (uint8 affine, per tensor or per channel) on the wire"
# both planners also plan with float32 on the wire, and say int8 does not pay when the
# float plan wins by more than this
FLOAT_BETTER = 0.05


def cosine_min(ref: np.ndarray, got: np.ndarray) -> float:
    """The least cosine similarity of a sample's output to the float model's (samples
    along axis 0): what an embedding's user compares by; 1.0 where both are zero."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (na > 0) & (nb > 0)
    cos = np.where(both, np.sum(a * b, axis=1) / np.where(both, na * nb, 1.0),
                   np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return float(np.min(cos))


def output_effect(ref: np.ndarray, got: np.ndarray, targets, target_offset: int
                  ) -> dict[str, Any]:
    """One output, float (``ref``) against int8 on the wire (``got``), samples along axis
    0; ``targets``: labels of the whole data (or None), this output's first sample being
    at ``target_offset``."""
    out: dict[str, Any] = {
        "max_abs_error": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
        "sqnr_db": sqnr_db(ref, got),
    }
    if ref.ndim >= 2 and ref.size:
        out["cosine_min"] = cosine_min(ref, got)
    if ref.ndim == 2 and ref.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
        if targets is not None:
            t = np.asarray(targets)[target_offset: target_offset + len(ref)]
            if len(t) == len(ref):
                out["accuracy_float"] = float(np.mean(ref.argmax(1) == t))
                out["accuracy_int8_transfer"] = float(np.mean(got.argmax(1) == t))
                out["accuracy_drop"] = out["accuracy_float"] - out["accuracy_int8_transfer"]
    return out


def quantization_of(tensors, scales: dict[str, WireQuant]) -> dict[str, dict[str, Any]]:
    """Each float tensor sent as uint8: one scale or one per channel (and along which
    axis), with the SQNR that choice and one scale had on calibration samples held out
    from the fit."""
    return {t.name: (scales.get(t.name) or WireQuant.unit()).to_dict()
            for t in tensors if t.compressible}


def per_channel_count(quantization: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(tensors sent per channel, tensors sent as uint8)."""
    return (sum(q["axis"] is not None for q in quantization.values()), len(quantization))
