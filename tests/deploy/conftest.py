"""Fixtures for the deploy tests: one real artifact from a fast run (a cloud target measured
at three batch sizes), copies of it to edit, and Triton's own ModelConfig parser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import toys
from toys.triton_config import parse_config

CLOUD_PROFILE = """\
name: toy-cloud
class: cloud
intra_op_threads: 1
inter_op_threads: 1
batch_sizes: [1, 4, 16]
limits: {latency_ms: 500}
timing: {warmup: 1, min_runs: 5, min_time_s: 0, max_time_s: 0.2}
"""


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    folder = tmp_path_factory.mktemp("deploy-artifact")
    cnn = toys.export_cnn_onnx(folder / "cnn.onnx")
    toys.write_cnn_npz(folder / "eval.npz", n=32)
    (folder / "cloud.yaml").write_text(CLOUD_PROFILE, encoding="utf-8")
    recipe = toys.write_recipe(
        folder, model={"onnx": str(cnn)}, data={"eval": "eval.npz", "batch_size": 32},
        passes=[], targets=[{"profile": "cloud.yaml",
                             "budgets": {"max_size_mb": 1, "max_latency_ms": {"p99": 1000}}}])
    result = optimize(load_recipe(recipe))
    assert result.passed, result.manifest["targets"]
    return result.artifact


@pytest.fixture(scope="session")
def unbatched_artifact(tmp_path_factory) -> Path:
    """A model whose input has no batch axis: x[1, 16] (batch_axis: null) → y[1, 4]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    folder = tmp_path_factory.mktemp("deploy-fixed")
    w = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "fixed.onnx"))
    np.savez(folder / "eval.npz", x=np.ones((1, 16), np.float32))
    (folder / "cloud.yaml").write_text(CLOUD_PROFILE, encoding="utf-8")
    recipe = toys.write_recipe(
        folder, model={"onnx": "fixed.onnx",
                       "inputs": [{"name": "x", "shape": [1, 16], "batch_axis": None}]},
        data={"eval": "eval.npz"}, metric="fidelity", passes=[],
        targets=[{"profile": "cloud.yaml"}])
    result = optimize(load_recipe(recipe))
    assert result.passed
    return result.artifact


@pytest.fixture
def edited(artifact, tmp_path) -> Callable[..., Path]:
    """A copy of the artifact whose manifest ``edit`` changed (in place, on the dict)."""

    def make(edit: Callable[[dict], object] | None = None, name: str = "copy") -> Path:
        return toys.edited_copy(artifact, tmp_path / name, edit)

    return make


@pytest.fixture
def triton_config() -> Callable[[Path], object]:
    return lambda path: parse_config(Path(path).read_text(encoding="utf-8"))
