"""Graph rewrites before int8 keep every initializer something still reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compactor.quantization.prepare import gemm_bias_as_vector, gemm_to_matmul


def _gemm_and_a_constant_output(path, bias_shape):
    """x @ W + B by Gemm, plus an initializer C that is itself a graph output."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(bias_shape).astype(np.float32)
    c = np.arange(3, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("C", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
         numpy_helper.from_array(c, "C")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(path):
    x = np.ones((2, 4), dtype=np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


def test_gemm_to_matmul_keeps_an_initializer_that_is_a_graph_output(tmp_path):
    src = _gemm_and_a_constant_output(tmp_path / "src.onnx", (3,))
    record: dict = {}
    dst = gemm_to_matmul(src, tmp_path / "dst.onnx", record)
    assert dst != src and record["gemm_as_matmul"] == 1
    assert [n.op_type for n in onnx.load(str(dst)).graph.node] == ["MatMul", "Add"]
    for a, b in zip(_run(src), _run(dst), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_gemm_bias_as_vector_keeps_an_initializer_that_is_a_graph_output(tmp_path):
    src = _gemm_and_a_constant_output(tmp_path / "src.onnx", (1, 3))
    record: dict = {}
    dst = gemm_bias_as_vector(src, tmp_path / "dst.onnx", record)
    assert dst != src and record["gemm_bias_as_vector"] == 1
    inits = {t.name: list(t.dims) for t in onnx.load(str(dst)).graph.initializer}
    assert inits["B_as_vector"] == [3] and "B" not in inits and "C" in inits
    for a, b in zip(_run(src), _run(dst), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
