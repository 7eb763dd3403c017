"""An MLP whose one big layer is the one int8 breaks: the accuracy fallback must put most
of the model's MACs back in float to hold a tight budget."""

from __future__ import annotations

from pathlib import Path

from toys.onnx_graphs import mlp_onnx

WIDE = 256


def lopsided_mlp_onnx(path: Path, outlier: float = 100.0, seed: int = 0) -> Path:
    """x[batch, 8, 64] → fc1 (64→256) → Relu → fc2 (256→256) → Relu → head (256→16).
    fc2 holds about three quarters of the MACs; channel 0 of its input is scaled up by
    ``outlier`` (and fc2's row 0 down by as much), so the float model is unchanged but a
    per-tensor int8 range of fc2's input is wrecked. Data: ``mlp_data``."""
    return mlp_onnx(path, outlier=outlier, seed=seed, hidden=WIDE)
