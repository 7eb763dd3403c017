"""The quantize pass: mode and ISA choices, preparing foreign models, exclusions, and the
bad inputs a user can give it (each a clear error or warning). The toy graphs are
``toys.onnx_graphs``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import toys
from toys import (
    MLP_TOKENS,
    MLP_WIDTH,
    assert_clean_error,
    cnn_accuracy,
    cnn_data,
    cnn_model,
    cnn_onnx,
    fake_timer,
    mlp_data,
    mlp_onnx,
    onnx_opset,
    ref,
    run_cli,
    run_pass,
    toy_recipe,
    two_input_onnx,
    write_recipe,
)

from compactor.errors import PassError
from compactor.model import onnx_input_specs
from compactor.passes import get_pass
from compactor.passes.quantize import QuantizeConfig
from compactor.pipeline import optimize
from compactor.progress import Progress, Task
from compactor.quantization import isa
from compactor.recipe import load_recipe
from compactor.stage import Stage


@pytest.fixture
def no_timing(monkeypatch):
    """Candidates are 'timed' by a fake: tests that are not about speed stay fast."""
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())


# --------------------------------------------------------------------------- mode: auto


def test_auto_mode_is_static_for_a_conv_net_and_dynamic_for_a_matmul_net(tmp_path, no_timing):
    (tmp_path / "cnn").mkdir()
    (tmp_path / "mlp").mkdir()
    cnn = cnn_onnx(tmp_path / "cnn" / "cnn.onnx")
    mlp = mlp_onnx(tmp_path / "mlp" / "mlp.onnx")
    out = run_pass(tmp_path / "cnn", toy_recipe(tmp_path / "cnn", cnn, cnn_data), cnn,
                   mode="auto")
    rec = out.record
    assert rec["mode"] == "static", rec["mode_reason"]
    assert "Conv" in rec["mode_reason"] and "convolution" in rec["mode_reason"], rec
    assert rec["op_mix"]["shares"]["Conv"] > 0.9, rec["op_mix"]

    out = run_pass(tmp_path / "mlp", toy_recipe(tmp_path / "mlp", mlp, mlp_data), mlp,
                   mode="auto")
    rec = out.record
    assert rec["mode"] == "dynamic", rec["mode_reason"]
    assert "MatMul 100%" in rec["mode_reason"], rec["mode_reason"]
    assert rec["quantization_ops"].get("DynamicQuantizeLinear"), rec["quantization_ops"]


def test_auto_mode_without_calibration_data_is_dynamic_and_says_why(tmp_path, no_timing):
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    recipe = toy_recipe(tmp_path, cnn, cnn_data, calibration=False, quantize={"mode": "auto"})
    rec = run_pass(tmp_path, recipe, cnn, mode="auto").record
    assert rec["mode"] == "dynamic"
    assert "no data.calibration" in rec["mode_reason"], rec["mode_reason"]


# --------------------------------------------------------------------------- ISA


@pytest.mark.parametrize(
    ("flags", "machine", "path", "acts", "reduce_range"),
    [
        (["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"], "x86_64", "amx",
         ("uint8", "int8"), False),
        (["avx2", "avx512f", "avx512bw", "avx512_vnni"], "x86_64", "avx512_vnni",
         ("uint8", "int8"), False),
        (["avx2", "avx_vnni"], "x86_64", "avx_vnni", ("uint8", "int8"), False),
        (["avx2", "avx512f", "avx512bw"], "x86_64", "avx512", ("uint8",), True),
        (["avx", "avx2", "fma"], "x86_64", "avx2", ("uint8",), True),
        (["asimddp"], "aarch64", "arm_dotprod", ("int8", "uint8"), False),
        ([], "aarch64", "arm", ("uint8",), False),
    ],
)
def test_int8_settings_follow_the_cpu(flags, machine, path, acts, reduce_range):
    found = isa.detect(flags, machine)
    choice = isa.choose(found, "static")
    assert (found.path, choice.activation_types, choice.reduce_range) == (
        path, acts, reduce_range), choice
    assert choice.warning is None
    if not found.no_saturation and not found.arm:
        assert "saturate" in choice.reason and "reduce_range" in choice.reason, choice.reason
    assert isa.choose(found, "dynamic").activation_types == ("uint8",)


def test_uint8_weights_avoid_saturation_without_reduce_range():
    choice = isa.choose(isa.detect(["avx2"], "x86_64"), "static", weight_type="uint8")
    assert choice.reduce_range is False and "u8u8" in choice.reason, choice


def test_isa_choice_is_recorded_and_a_risky_pin_warns(tmp_path, monkeypatch, no_timing):
    monkeypatch.setattr("compactor.measure.host.isa_flags", lambda: ["avx", "avx2", "fma"])
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    out = run_pass(tmp_path, recipe, mlp, mode="static", search_speed=False)
    rec = out.record
    assert rec["isa"]["int8_path"] == "avx2" and rec["isa"]["no_saturation"] is False
    assert rec["int8_choice"]["reduce_range"] is True, rec["int8_choice"]
    assert rec["reduce_range"] is True and rec["activation_type"] == "uint8", rec
    assert not out.warnings, out.warnings

    (tmp_path / "pinned").mkdir()
    recipe = toy_recipe(tmp_path / "pinned", mlp, mlp_data)
    out = run_pass(tmp_path / "pinned", recipe, mlp, mode="static", reduce_range=False,
                   search_speed=False)
    assert out.record["reduce_range"] is False
    assert any("saturation" in w for w in out.warnings), out.warnings


# --------------------------------------------------------------------------- foreign models


def test_old_opset_is_upgraded_and_per_channel_output_is_valid(tmp_path, no_timing):
    mlp = mlp_onnx(tmp_path / "mlp11.onnx", opset=11)
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    out = run_pass(tmp_path, recipe, mlp, mode="static", per_channel=True, format="qdq")
    assert out.record["opset_upgraded"] == {"from": 11, "to": 13}, out.record
    model = onnx.load(str(out.onnx_path))
    onnx.checker.check_model(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    scales = {t.name: list(t.dims) for t in model.graph.initializer}
    weight_scales = [scales[n.input[1]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert weight_scales and all(d == [MLP_WIDTH] or d == [16] for d in weight_scales), (
        f"per-channel weights have one scale per output channel: {weight_scales}")
    import onnxruntime as ort

    x = mlp_data(4, seed=5)["x"]
    (got,) = ort.InferenceSession(str(out.onnx_path)).run(None, {"x": x})
    assert got.shape == (4, MLP_TOKENS, 16)


def test_symbolic_shape_inference_fallback_is_recorded(tmp_path, no_timing, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = two_input_onnx(tmp_path / "two.onnx")

    def data(n, seed):
        r = np.random.default_rng(seed)
        return {"x": r.standard_normal((n, 16)).astype(np.float32),
                "z": r.standard_normal((n, 16)).astype(np.float32)}

    recipe = toy_recipe(tmp_path, model, data, calibration=False,
                        quantize={"mode": "dynamic"})
    # keep_float: never: int8 of this 1 kB toy is larger than its float input
    out = run_pass(tmp_path, recipe, model, mode="dynamic", keep_float="never")
    rec = out.record
    assert rec["preprocess"] == "ONNX shape inference + optimization", rec
    assert "gave up" in rec["symbolic_shape_inference"], rec
    assert any("symbolic shape inference gave up" in w for w in out.warnings), out.warnings
    assert rec["quantization_ops"], rec
    litter = [p.name for p in tmp_path.iterdir() if "sym_shape" in p.name or p.suffix == ".data"]
    assert litter == [], f"ORT's partial model must stay in the work folder: {litter}"


# --------------------------------------------------------------------------- exclusions


def test_exclude_block_keeps_nodes_and_op_types_in_float_and_says_why(tmp_path, no_timing):
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    out = run_pass(tmp_path, recipe, mlp, mode="static", search_speed=False,
                   exclude={"nodes": ["fc*"], "op_types": ["Relu"]})
    rec = out.record
    reasons = {f["node"]: f["reason"] for f in rec["float_nodes"]}
    assert reasons["fc1"] == reasons["fc2"] == "exclude pattern 'fc*'", reasons
    assert reasons["act1"] == "op type Relu excluded", reasons
    assert rec["excluded_nodes"] == ["fc1", "fc2"]
    model = onnx.load(str(out.onnx_path))
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fed = {n.name: any(i in dq_out for i in n.input) for n in model.graph.node}
    assert not fed["fc1"] and not fed["fc2"] and fed["head"], fed


# --------------------------------------------------------------------------- bad input


def test_quantize_on_a_torch_model_without_export_is_a_recipe_error(tmp_path):
    path = write_recipe(tmp_path, model=cnn_model(weights=None),
                        data={"calibration": ref("cnn_calibration_batches"),
                              "eval": ref("cnn_eval_batches")},
                        passes=[{"quantize": {"mode": "static"}}])
    result = run_cli("optimize", path)
    assert_clean_error(result, 2, "passes[0] 'quantize' needs an onnx model",
                       "- export: {}")
    assert not (tmp_path / "out").exists()


def test_calibration_data_that_does_not_fit_the_model_exits_3(tmp_path, no_timing):
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "eval.npz", **mlp_data(32, seed=1))
    np.savez(tmp_path / "calib.npz",
             x=np.zeros((32, MLP_TOKENS + 4, MLP_WIDTH), dtype=np.float32))  # 12 tokens, not 8
    path = write_recipe(
        tmp_path, model={"onnx": str(mlp),
                         "inputs": [{"name": "x", "shape": ["batch", "tokens", MLP_WIDTH]}]},
        data={"eval": "eval.npz", "calibration": "calib.npz"}, metric="fidelity",
        passes=[{"quantize": {"mode": "static"}}])
    result = run_cli("optimize", path)
    error, _ = assert_clean_error(result, 3, "data.calibration", "model expects")
    assert "[32, 12, 64]" in error and "[?, 8, 64]" in error, error
    assert not (tmp_path / "out").exists()


def test_too_few_calibration_samples_warn_with_the_number_used(tmp_path, no_timing):
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    recipe = toy_recipe(tmp_path, mlp, mlp_data, n_calib=5)
    out = run_pass(tmp_path, recipe, mlp, mode="static", search_speed=False)
    assert out.record["calibration_samples"] == 5
    (warning,) = [w for w in out.warnings if "calibration samples" in w]
    assert "only 5 calibration samples" in warning and "asked for 256" in warning, warning


def test_max_accuracy_drop_takes_the_recipe_syntax(tmp_path):
    assert QuantizeConfig(max_accuracy_drop="2%").max_accuracy_drop == "2%"
    assert QuantizeConfig(max_accuracy_drop=0.01).max_accuracy_drop == 0.01
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    path = toy_recipe(tmp_path, mlp, mlp_data, quantize={"max_accuracy_drop": "lots"})
    result = run_cli("recipe", "validate", path)
    assert_clean_error(result, 2, "max_accuracy_drop", "'lots' is not a drop")


# --------------------------------------------------------------------------- the teacher CNN


@pytest.fixture(scope="module")
def opset11(tmp_path_factory) -> Path:
    return toys.export_cnn_onnx(tmp_path_factory.mktemp("opset11") / "cnn11.onnx", opset=11)


def onnx_stage(path: Path) -> Stage:
    return Stage("baseline", "onnx", onnx_path=path, lineage=("baseline",))


def quantize_cnn(tmp_path: Path, model: Path, **config) -> Stage:
    path = write_recipe(
        tmp_path,
        model={"onnx": str(model)},
        data={"calibration": ref("cnn_calibration_batches"), "eval": ref("cnn_eval_batches")},
    )
    recipe = load_recipe(path)
    work = tmp_path / "work"
    work.mkdir()
    ctx = toys.run_context(recipe, work, inputs=onnx_input_specs(model))
    return get_pass("quantize")(QuantizeConfig(**config)).run(onnx_stage(model), ctx)


def test_quantizer_error_without_a_message(tmp_path, opset11, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", fail)
    with pytest.raises(PassError) as e:
        quantize_cnn(tmp_path, opset11, mode="static")
    assert "AssertionError" in e.value.message and "dynamic" in e.value.hint, e.value


def test_old_opset_is_upgraded_before_quantizing(tmp_path, no_timing, opset11):
    assert onnx_opset(opset11) == 11
    out = quantize_cnn(tmp_path, opset11, mode="static")
    assert out.record["opset_upgraded"] == {"from": 11, "to": 13}, out.record
    assert onnx_opset(out.onnx_path) >= 13
    assert onnx_opset(opset11) == 11, "the input model must be left as it was"
    assert out.record["int8_weight_tensors"] >= 4, out.record
    acc = cnn_accuracy(out.onnx_path)
    assert acc >= 0.9, f"int8 accuracy {acc:.3f} on the teacher's own labels"


def test_dynamic_quantize_of_the_cnn(tmp_path, no_timing, opset11):
    out = quantize_cnn(tmp_path, opset11, mode="dynamic")
    assert out.record["mode"] == "dynamic"
    assert "calibration_samples" not in out.record
    ops = out.record["quantization_ops"]
    assert ops.get("MatMulInteger", 0) + ops.get("ConvInteger", 0) >= 1, ops


def _float_weight_convs(path: Path) -> tuple[int, int]:
    """(Convs whose weight is a float initializer, Convs in all)."""
    graph = onnx.load(str(path)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return sum(1 for n in convs if n.input[1] in floats), len(convs)


def test_exclude_op_types_keeps_convs_in_float(tmp_path, no_timing, opset11):
    out = quantize_cnn(tmp_path, opset11, mode="static", exclude_op_types=["Conv"])
    float_convs, convs = _float_weight_convs(out.onnx_path)
    assert convs == 2 and float_convs == 2, (float_convs, convs)
    assert out.record["int8_weight_tensors"] >= 2, out.record  # the linear layers still are

    (tmp_path / "all").mkdir()
    everything = quantize_cnn(tmp_path / "all", opset11, mode="static")
    assert _float_weight_convs(everything.onnx_path) == (0, 2)


class Notes(Progress):
    def __init__(self):
        self.notes: list[str] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield Task()

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_exclude_nodes_that_match_nothing_warn(tmp_path, opset11):
    path = write_recipe(
        tmp_path,
        model={"onnx": str(opset11)},
        data={"calibration": ref("cnn_calibration_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"quantize": {"exclude_nodes": ["/head/*Gemm*", "no_such_node*"]}}],
    )
    progress = Notes()
    result = optimize(load_recipe(path), progress=progress)
    final = result.stages[-1]
    rec = final.record
    warnings = [w for w in final.warnings if "exclude_nodes" in w]
    assert len(warnings) == 1 and "no_such_node*" in warnings[0], rec
    assert "/head/*Gemm*" not in warnings[0], warnings
    assert rec["excluded_nodes"], rec
    assert any("no_such_node*" in n for n in progress.notes), progress.notes
    assert result.manifest["stages"][-1]["warnings"] == list(final.warnings)


def test_calibration_data_error_is_exit_3(tmp_path, opset11):
    path = write_recipe(
        tmp_path,
        model={"onnx": str(opset11)},
        data={"calibration": ref("cnn_nan_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"quantize": {}}],
    )
    result = run_cli("optimize", path)
    assert_clean_error(result, 3, "data.calibration", "nan")
    assert not (tmp_path / "out").exists()


def test_quantized_outputs_stay_close_to_float(tmp_path, no_timing, opset11):
    import onnxruntime as ort

    out = quantize_cnn(tmp_path, opset11, mode="static", calibration_samples=32)
    assert out.record["calibration_samples"] == 32
    assert not out.warnings, out.warnings
    x = toys.cnn_images(64, seed=9)
    (want,) = ort.InferenceSession(str(opset11)).run(None, {"image": x})
    (got,) = ort.InferenceSession(str(out.onnx_path)).run(None, {"image": x})
    sqnr = 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2))
    assert sqnr > 20, f"int8 SQNR {sqnr:.1f} dB"
