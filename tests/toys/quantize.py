"""The quantize pass alone on an ONNX toy: a recipe for it, a fake timer, a bare run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from compactor.model import onnx_input_specs
from compactor.passes import get_pass
from compactor.passes.quantize import QuantizeConfig
from compactor.quantization.timing import Timing
from compactor.recipe import load_recipe
from compactor.stage import Stage
from toys.recipes import run_context, write_recipe


def toy_recipe(folder: Path, model: Path, data, quantize: dict | None = None,
               calibration: bool = True, budgets: dict | None = None, n_eval: int = 64,
               n_calib: int = 64, batch_size: int = 16, metric: str = "fidelity") -> Path:
    """A recipe quantizing an ONNX toy, data as .npz files (no labels: fidelity)."""
    np.savez(folder / "eval.npz", **data(n_eval, seed=1))
    files = {"eval": "eval.npz", "batch_size": batch_size}
    if calibration:
        np.savez(folder / "calib.npz", **data(n_calib, seed=2))
        files["calibration"] = "calib.npz"
    return write_recipe(folder, budgets=budgets, model={"onnx": str(model)}, data=files,
                        metric=metric, passes=[{"quantize": quantize or {}}])


def fake_timer(latency=None):
    """A deterministic timer: ``latency(path) -> ms`` (default: float 2 ms, int8 1 ms)."""
    def default(path: Path) -> float:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        quantized = bool(ops & {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                                "MatMulInteger", "ConvInteger", "QLinearMatMul"})
        return 1.0 if quantized else 2.0

    fn = latency or default

    def make(ctx, cfg):
        def timer(models):
            return Timing({k: fn(Path(p)) for k, p in models.items()}, 10, "fake", 1, 1, 0.0)
        return timer
    return make


def run_pass(folder: Path, recipe: Path, model: Path, **config) -> Stage:
    """The quantize pass alone, on a bare context (no pipeline around it)."""
    r = load_recipe(recipe)
    work = folder / "work"
    work.mkdir(exist_ok=True)
    ctx = run_context(r, work, inputs=onnx_input_specs(model))
    stage = Stage("baseline", "onnx", onnx_path=model, lineage=("baseline",))
    return get_pass("quantize")(QuantizeConfig(**config)).run(stage, ctx)
