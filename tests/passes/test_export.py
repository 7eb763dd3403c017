"""The export and quantize passes on toy models: numeric checks, fallbacks, opsets, exclusions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import toys
from toys import CNN_INPUT, assert_clean_error, cnn_model, leftovers, ref, run_cli, write_recipe

from compactor.errors import PassError
from compactor.exporting import ExportConfig
from compactor.model import load_model, onnx_input_specs
from compactor.passes import RunContext, get_pass, registry
from compactor.passes.quantize import QuantizeConfig
from compactor.pipeline import optimize
from compactor.progress import Progress, Task
from compactor.recipe import Recipe, load_recipe
from compactor.stage import Stage


def context(folder: Path, recipe_path: Path) -> tuple[RunContext, Recipe]:
    recipe = load_recipe(recipe_path)
    work = folder / "work"
    work.mkdir(exist_ok=True)
    return toys.run_context(recipe, work), recipe


def onnx_stage(path: Path) -> Stage:
    return Stage("baseline", "onnx", onnx_path=path, lineage=("baseline",))


def opset(path: Path) -> int:
    model = onnx.load(str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run_accuracy(path: Path) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hits = n = 0
    for x, y in toys.cnn_eval_batches():
        (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
        hits += int((logits.argmax(1) == y).sum())
        n += len(y)
    return hits / n


def test_registry_has_the_passes():
    assert {"export", "quantize"} <= set(registry())
    for name, cls in registry().items():
        assert cls.name == name and cls.input_kind in ("torch", "onnx"), cls


# --------------------------------------------------------------------------- export


@pytest.fixture
def cnn_ctx(tmp_path) -> tuple[RunContext, Stage]:
    torch.save(toys.cnn_state_dict(), tmp_path / "weights.pt")
    path = write_recipe(
        tmp_path, model=cnn_model(), data={"eval": ref("cnn_eval_batches")},
        passes=[{"export": {}}],
    )
    ctx, recipe = context(tmp_path, path)
    stage, _ = load_model(recipe.model, recipe.base_dir)
    return ctx, stage


def test_export_matches_torch(cnn_ctx):
    ctx, stage = cnn_ctx
    out = get_pass("export")(ExportConfig(opset=17, exporter="legacy")).run(stage, ctx)
    assert out.kind == "onnx" and out.lineage == ("baseline", "export")
    assert stage.kind == "torch" and stage.record == {}, "a pass must not touch its input"
    rec = out.record
    assert rec["exporter"] == "legacy" and rec["opset"] == opset(out.onnx_path) == 17, rec
    assert rec["max_abs_error"] < 1e-4, f"export max_abs_error {rec['max_abs_error']:.3g}"
    assert run_accuracy(out.onnx_path) == 1.0


def test_dynamo_failure_falls_back_to_legacy(cnn_ctx, monkeypatch):
    real_export = torch.onnx.export

    def export(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure: unsupported op aten::frobnicate")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    ctx, stage = cnn_ctx
    out = get_pass("export")(ExportConfig()).run(stage, ctx)
    rec = out.record
    assert rec["exporter"] == "legacy", rec
    assert "aten::frobnicate" in rec["fallback_reason"]["dynamo"], rec
    assert rec["max_abs_error"] < 1e-3, f"export max_abs_error {rec['max_abs_error']:.3g}"

    # Asked for dynamo alone, there is nothing to fall back to.
    with pytest.raises(PassError) as e:
        get_pass("export")(ExportConfig(exporter="dynamo")).run(stage, ctx)
    assert "aten::frobnicate" in e.value.message and "legacy" in e.value.hint


class _Bag(torch.nn.Module):
    """An embedding table, mean-pooled: the dynamo exporter names a value ``embedding``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, ids):
        return self.embed(ids).mean(1)


def test_output_name_that_an_inner_value_has_keeps_the_dynamo_export(tmp_path):
    from compactor.data import Batch
    from compactor.exporting import export_module
    from compactor.recipe import InputSpec

    specs = [InputSpec(name="ids", shape=("batch", 5), dtype="int64")]
    batch = Batch({"ids": np.arange(10, dtype=np.int64).reshape(2, 5)})
    path = tmp_path / "bag.onnx"
    module = _Bag().eval()
    rec = export_module(module, specs, batch, path, ExportConfig(exporter="dynamo"),
                        output_names=["embedding"])
    assert rec["exporter"] == "dynamo" and "fallback_reason" not in rec, rec
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["embedding"]
    import onnxruntime as ort

    (got,) = ort.InferenceSession(str(path)).run(None, batch.inputs)
    with torch.no_grad():
        want = module(torch.from_numpy(batch.inputs["ids"])).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("error", [AssertionError(), RuntimeError("\x1b[96mcolored\x1b[0m")],
                         ids=["empty message", "ansi codes"])
def test_fallback_reason_is_one_clean_line(cnn_ctx, monkeypatch, error):
    real_export = torch.onnx.export

    def export(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise error
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    ctx, stage = cnn_ctx
    rec = get_pass("export")(ExportConfig()).run(stage, ctx).record
    reason = rec["fallback_reason"]["dynamo"]
    assert reason.startswith(type(error).__name__), reason
    assert "\x1b" not in reason and "\n" not in reason, repr(reason)


def test_quantizer_error_without_a_message(tmp_path, opset11, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", fail)
    with pytest.raises(PassError) as e:
        quantize(tmp_path, opset11, mode="static")
    assert "AssertionError" in e.value.message and "dynamic" in e.value.hint, e.value


def test_export_that_differs_from_torch_exits_4(tmp_path):
    path = write_recipe(
        tmp_path,
        model={"factory": ref("build_noisy_cnn"), "inputs": [CNN_INPUT]},
        data={"eval": ref("cnn_eval_batches")},
        passes=[{"export": {"exporter": "legacy"}}],
    )
    result = run_cli("optimize", path)
    error, hint = assert_clean_error(result, 4)
    assert "export" in error and "differ from torch" in error, error
    assert "tolerance" in hint, hint
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- quantize


@pytest.fixture(scope="module")
def opset11(tmp_path_factory) -> Path:
    return toys.export_cnn_onnx(tmp_path_factory.mktemp("opset11") / "cnn11.onnx", opset=11)


def quantize(tmp_path: Path, model: Path, **config) -> Stage:
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


def test_old_opset_is_upgraded_before_quantizing(tmp_path, opset11):
    assert opset(opset11) == 11
    out = quantize(tmp_path, opset11, mode="static")
    assert out.record["opset_upgraded"] == {"from": 11, "to": 13}, out.record
    assert opset(out.onnx_path) >= 13
    assert opset(opset11) == 11, "the input model must be left as it was"
    assert out.record["int8_weight_tensors"] >= 4, out.record
    acc = run_accuracy(out.onnx_path)
    assert acc >= 0.9, f"int8 accuracy {acc:.3f} on the teacher's own labels"


def test_dynamic_quantize_of_the_cnn(tmp_path, opset11):
    out = quantize(tmp_path, opset11, mode="dynamic")
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


def test_exclude_op_types_keeps_convs_in_float(tmp_path, opset11):
    out = quantize(tmp_path, opset11, mode="static", exclude_op_types=["Conv"])
    float_convs, convs = _float_weight_convs(out.onnx_path)
    assert convs == 2 and float_convs == 2, (float_convs, convs)
    assert out.record["int8_weight_tensors"] >= 2, out.record  # the linear layers still are

    (tmp_path / "all").mkdir()
    everything = quantize(tmp_path / "all", opset11, mode="static")
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


def test_quantized_outputs_stay_close_to_float(tmp_path, opset11):
    import onnxruntime as ort

    out = quantize(tmp_path, opset11, mode="static", calibration_samples=32)
    assert out.record["calibration_samples"] == 32
    assert not out.warnings, out.warnings
    x = toys.cnn_images(64, seed=9)
    (want,) = ort.InferenceSession(str(opset11)).run(None, {"image": x})
    (got,) = ort.InferenceSession(str(out.onnx_path)).run(None, {"image": x})
    sqnr = 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2))
    assert sqnr > 20, f"int8 SQNR {sqnr:.1f} dB"
