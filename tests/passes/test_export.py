"""The export pass on toy models: numeric checks, exporter fallbacks, opsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import toys
from toys import (
    CNN_INPUT,
    assert_clean_error,
    cnn_accuracy,
    cnn_model,
    leftovers,
    onnx_opset,
    ref,
    run_cli,
    write_recipe,
)

from compactor.errors import PassError
from compactor.exporting import ExportConfig
from compactor.model import load_model
from compactor.passes import RunContext, get_pass, registry
from compactor.recipe import Recipe, load_recipe
from compactor.stage import Stage


def context(folder: Path, recipe_path: Path) -> tuple[RunContext, Recipe]:
    recipe = load_recipe(recipe_path)
    work = folder / "work"
    work.mkdir(exist_ok=True)
    return toys.run_context(recipe, work), recipe


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
    assert rec["exporter"] == "legacy" and rec["opset"] == onnx_opset(out.onnx_path) == 17, rec
    assert rec["max_abs_error"] < 1e-4, f"export max_abs_error {rec['max_abs_error']:.3g}"
    assert cnn_accuracy(out.onnx_path) == 1.0


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
