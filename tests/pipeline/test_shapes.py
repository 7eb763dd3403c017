"""Inputs as real models have them: batches padded to their own length, scalar inputs, a
state whose batch is axis 1, and the shape latency is measured at."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from toys import TEXT_INPUTS, assert_clean_error, build_text, ref, run_cli, write_recipe
from toys.shapes import PADDED_LENGTHS, SHAPES, padded_text_batch

from compactor.data import Batch, PerBatch, conform, feeds_for_batch, join, latency_shape
from compactor.exporting import ExportConfig, export_module
from compactor.metrics import BUILTIN
from compactor.model import onnx_input_specs
from compactor.pipeline import optimize
from compactor.recipe import load_recipe
from compactor.spec import InputSpec

VAD_INPUTS = [
    {"name": "input", "shape": ["batch", 64]},
    {"name": "state", "shape": [2, "batch", 16], "batch_axis": 1},
    {"name": "sr", "shape": [], "dtype": "int64"},
]


def shapes_ref(fn: str) -> str:
    return f"{SHAPES}:{fn}"


def text_specs() -> tuple[InputSpec, ...]:
    return tuple(InputSpec.model_validate(i) for i in TEXT_INPUTS)


def text_batch(n: int, seq: int, fill: int = 1) -> Batch:
    ids = np.full((n, seq), fill, dtype=np.int64)
    return Batch({"input_ids": ids, "attention_mask": np.ones_like(ids)},
                 np.arange(n), {"input_ids": 0, "attention_mask": 0})


# --------------------------------------------------------------------------- units


def test_input_spec_batch_axis_defaults():
    assert InputSpec(name="x", shape=["batch", 3]).batch_axis == 0
    assert InputSpec(name="sr", shape=[]).batch_axis is None
    state = InputSpec(name="state", shape=[2, "batch", 16], batch_axis=1)
    assert state.batch_dim == "batch" and state.symbolic_axes == {}
    ids = InputSpec(name="ids", shape=["batch", "seq"])
    assert ids.symbolic_axes == {1: "seq"}


def test_latency_feeds_never_join_batches_of_different_lengths():
    # the crash: eval batches of 41 and 46 tokens concatenated for batch-N feeds
    specs = text_specs()
    batches = [text_batch(8, 41, fill=1), text_batch(8, 46, fill=2), text_batch(8, 43, fill=3)]
    feeds = feeds_for_batch(specs, batches, 16)
    assert feeds["input_ids"].shape == (16, 43)  # the median length of the three
    # real samples, padded with 0 (ids and mask) or cropped at the end
    assert (feeds["input_ids"][:8, :41] == 1).all() and (feeds["input_ids"][:8, 41:] == 0).all()
    assert (feeds["input_ids"][8:] == 2).all()
    feeds = feeds_for_batch(specs, batches, 4, {"seq": 50})
    assert feeds["input_ids"].shape == (4, 50)
    assert (feeds["input_ids"][:, 41:] == 0).all() and (feeds["attention_mask"][:, 41:] == 0).all()
    # more than the data holds: samples repeat, at one shape
    assert feeds_for_batch(specs, batches[:1], 20)["attention_mask"].shape == (20, 41)


def test_latency_shape_median_and_recipe():
    specs = text_specs()
    batches = [text_batch(2, n) for n in (9, 14, 11, 20)]
    shape = latency_shape(specs, batches)
    assert shape.dims == {"seq": 11} and shape.source == {"seq": "median"}
    assert shape.inputs == {"input_ids": [1, 11], "attention_mask": [1, 11]}
    assert "seq=11 (median" in shape.describe()
    fixed = latency_shape(specs, batches, {"seq": 128})
    assert fixed.dims == {"seq": 128} and fixed.source == {"seq": "recipe"}


def test_batch_rows_follow_each_inputs_batch_axis():
    b = Batch({"x": np.arange(12.0).reshape(3, 4), "state": np.zeros((2, 3, 5)),
               "sr": np.array(16000)}, np.arange(3), {"x": 0, "state": 1, "sr": None})
    assert b.size == 3
    head = b.head(2)
    assert head.inputs["x"].shape == (2, 4) and head.inputs["state"].shape == (2, 2, 5)
    assert head.inputs["sr"].shape == () and list(head.target) == [0, 1]
    both = join([b, head])
    assert both.inputs["state"].shape == (2, 5, 5) and both.inputs["sr"].shape == ()
    assert both.size == 5 and len(both.target) == 5
    # a scalar-only batch still counts one sample, and is never cut
    assert Batch({"sr": np.array(8000)}).size == 1


def test_scalar_inputs_stay_scalar_in_feeds_and_tensors():
    # np.ascontiguousarray makes a 0-d array 1-d: the export then took sr as [1]
    from compactor.exporting import to_torch

    specs = [InputSpec(name="x", shape=["batch", 2]), InputSpec(name="sr", shape=[])]
    b = Batch({"x": np.ones((3, 2), np.float32), "sr": np.array(16000)})
    feeds = feeds_for_batch(specs, [b, b], 4)
    assert feeds["x"].shape == (4, 2) and feeds["sr"].shape == ()
    assert tuple(to_torch(specs, b.inputs)[1].shape) == ()


def test_conform_pads_and_crops_only_symbolic_axes():
    specs = text_specs()
    b = text_batch(2, 5)
    assert conform(specs, b, {"seq": 3}).inputs["input_ids"].shape == (2, 3)
    assert conform(specs, b, {"seq": 7}).inputs["attention_mask"][:, 5:].sum() == 0


def test_metric_on_per_batch_outputs():
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((n, 5)) for n in (8, 8, 3)]
    labels = [rng.integers(0, 5, n) for n in (8, 8, 3)]
    outs, tgts = PerBatch.of(logits), PerBatch.of(labels)
    for name in ("accuracy", "top5", "mse", "fidelity"):
        metric = BUILTIN[name]
        t = PerBatch.of(rng.standard_normal((n, 5)) for n in (8, 8, 3)) if name == "mse" \
            else tgts
        same = metric.compute(outs.joined(), t.joined(), outs.joined())
        # fixed-shape data: exactly the number the joined arrays give
        assert metric.score(outs, t, outs) == same, name
    # outputs of different trailing shapes (a per-token output of padded batches):
    # batch by batch, weighted by samples
    ragged = PerBatch.of([rng.standard_normal((4, 9, 3)), rng.standard_normal((2, 14, 3))])
    fid = BUILTIN["fidelity"].score(ragged, None, ragged)
    assert fid == pytest.approx(1.0)
    noisy = PerBatch.of([ragged.parts[0], -ragged.parts[1]])
    assert BUILTIN["fidelity"].score(noisy, None, ragged) == pytest.approx((4 - 2) / 6)
    # samples picked by global index stay grouped by their batch
    picked = ragged.take(np.array([1, 3, 4]))
    assert picked.shapes == ((2, 9, 3), (1, 14, 3))


def test_onnx_input_specs_find_batch_axis_and_name_unnamed_axes(tmp_path):
    def vi(name, dims, t=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, t, dims)

    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ("input", "state", "sr")],
        "g",
        [vi("input", ["batch", None]), vi("state", [2, "batch", 16]),
         vi("sr", [], TensorProto.INT64)],
        [vi("input_out", ["batch", None]), vi("state_out", [2, "batch", 16]),
         vi("sr_out", [], TensorProto.INT64)],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    specs = {s.name: s for s in onnx_input_specs(path)}
    assert specs["input"].shape == ("batch", "input_dim1") and specs["input"].batch_axis == 0
    assert specs["state"].batch_axis == 1
    assert specs["sr"].shape == () and specs["sr"].batch_axis is None


# --------------------------------------------------------------------------- bad input


def test_batch_axis_beyond_rank_is_a_recipe_error(tmp_path):
    path = write_recipe(
        tmp_path, model={"factory": shapes_ref("build_vad"), "inputs": [
            VAD_INPUTS[0], {"name": "state", "shape": [2, "batch", 16], "batch_axis": 3},
            VAD_INPUTS[2]]},
        data={"eval": shapes_ref("vad_eval")})
    assert_clean_error(run_cli("recipe", "validate", path), 2, "batch_axis 3", "rank 3")


def test_latency_dims_naming_no_axis_is_a_recipe_error(tmp_path):
    path = write_recipe(tmp_path, model={"factory": ref("build_text"), "inputs": TEXT_INPUTS},
                        data={"eval": shapes_ref("padded_text_eval")},
                        measure={"dims": {"sequ": 32}})
    assert_clean_error(run_cli("recipe", "validate", path), 2, "no axis 'sequ'",
                       "did you mean 'seq'")
    path = write_recipe(tmp_path, model={"factory": ref("build_text"), "inputs": TEXT_INPUTS},
                        data={"eval": shapes_ref("padded_text_eval")},
                        measure={"dims": {"batch": 4}})
    assert_clean_error(run_cli("recipe", "validate", path), 2, "'batch' is the batch axis")


def test_latency_dims_checked_against_an_onnx_models_own_inputs(tmp_path):
    onnx_path = tmp_path / "text.onnx"
    batch = Batch(padded_text_batch(4, 9, seed=0))
    export_module(build_text(), text_specs(), batch, onnx_path, ExportConfig(simplify=False))
    path = write_recipe(tmp_path, model={"onnx": str(onnx_path)},
                        data={"eval": shapes_ref("padded_text_eval")},
                        measure={"dims": {"sq": 32}})
    assert_clean_error(run_cli("optimize", path), 2, "no axis 'sq'", "did you mean 'seq'")


@pytest.mark.parametrize("data,what", [
    ("vad_state_on_axis0", "batch_axis"),
])
def test_state_without_its_batch_axis_is_named(tmp_path, data, what):
    inputs = [VAD_INPUTS[0], {"name": "state", "shape": [2, "batch", 16]}, VAD_INPUTS[2]]
    path = write_recipe(tmp_path, model={"factory": shapes_ref("build_vad"), "inputs": inputs},
                        data={"eval": shapes_ref(data)})
    # [2, batch, 16] read with axis 0 is a rank-3 input of 2 samples beside 8
    assert_clean_error(run_cli("optimize", path), 3, "data.eval batch 0", "state 2 (axis 0)",
                       what)


def test_batch_disagreeing_in_rank_or_dtype_names_batch_and_input(tmp_path):
    from compactor.data import DataSource
    from compactor.errors import DataError

    specs = text_specs()
    src = DataSource.__new__(DataSource)
    src.split, src.inputs = "eval", specs
    good = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}
    src._normalize((good,), 0)
    bad_rank = {**good, "attention_mask": np.ones((2, 5, 1), np.int64)}
    with pytest.raises(DataError, match=r"data.eval batch 3: input 'attention_mask' has rank 3"):
        src._normalize((bad_rank,), 3)
    bad_dtype = {**good, "input_ids": np.ones((2, 5), np.float32)}
    with pytest.raises(DataError, match=r"data.eval batch 1: input 'input_ids' is float32"):
        src._normalize((bad_dtype,), 1)
    scalar = InputSpec(name="sr", shape=[], dtype="int64")
    src.inputs = (scalar,)
    with pytest.raises(DataError, match=r"input 'sr' has rank 1 .*a scalar") as e:
        src._normalize(np.array([16000]), 2)
    assert e.value.exit_code == 3


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """TinyText fed batches padded to their own longest sentence: export → dynamic int8."""
    folder = tmp_path_factory.mktemp("padded")
    path = write_recipe(
        folder, model={"factory": ref("build_text"), "inputs": TEXT_INPUTS},
        data={"eval": shapes_ref("padded_text_eval")}, metric="accuracy",
        passes=[{"export": {}}, {"quantize": {"mode": "dynamic", "search_speed": False}}],
    )
    return optimize(load_recipe(path))


def test_padded_batches_finish_with_a_sane_metric(padded_run):
    base, export, quant = padded_run.stages
    assert base.metric == pytest.approx(1.0)  # labels are the float model's predictions
    assert export.metric == pytest.approx(1.0)
    assert quant.metric >= 0.8, f"int8 accuracy {quant.metric:.3f} on padded batches"
    assert all(s.p("fast") is not None for s in padded_run.stages)


def test_latency_shape_is_recorded(padded_run):
    median = sorted(PADDED_LENGTHS)[(len(PADDED_LENGTHS) - 1) // 2]
    for s in padded_run.manifest["stages"]:
        assert s["latency_shape"]["dims"] == {"seq": median}, s["latency_shape"]
        assert s["latency_shape"]["source"] == {"seq": "median"}
        assert s["latency_shape"]["inputs"]["input_ids"] == [1, median]
    json.dumps(padded_run.manifest)
    # the stage table says the shape its latency column was measured at
    from rich.console import Console

    from compactor.cli.render import stage_table
    from compactor.manifest import Manifest

    console = Console(record=True, width=200)
    console.print(stage_table(Manifest.model_validate(padded_run.manifest)))
    text = console.export_text()
    assert f"latency at batch 1, seq={median} (median of the eval batches)" in text, text


def test_latency_shape_from_the_recipe(tmp_path):
    path = write_recipe(
        tmp_path, model={"factory": ref("build_text"), "inputs": TEXT_INPUTS},
        data={"eval": shapes_ref("padded_text_eval"),
              "calibration": shapes_ref("padded_text_calibration")},
        metric="accuracy", measure={"dims": {"seq": 32}},
        passes=[{"export": {}}, {"quantize": {"mode": "static", "search_speed": False}}],
    )
    result = optimize(load_recipe(path))
    final = result.manifest["stages"][-1]
    assert final["latency_shape"]["dims"] == {"seq": 32}
    assert final["latency_shape"]["source"] == {"seq": "recipe"}
    assert final["record"]["calibration_samples"] == 8 * len(PADDED_LENGTHS)
    assert result.stages[-1].metric >= 0.7, result.stages[-1].metric
    lock = (tmp_path / "out" / "recipe.lock.yaml").read_text()
    assert "seq: 32" in lock


def test_recurrent_model_with_scalar_and_axis1_state(tmp_path):
    path = write_recipe(
        tmp_path, model={"factory": shapes_ref("build_vad"), "inputs": VAD_INPUTS,
                         "outputs": ["logits", "new_state"]},
        data={"eval": shapes_ref("vad_eval"), "calibration": shapes_ref("vad_calibration")},
        metric="accuracy",
        passes=[{"export": {}}, {"quantize": {"mode": "dynamic", "search_speed": False}}],
    )
    result = optimize(load_recipe(path))
    base, export, quant = result.stages
    assert base.metric == pytest.approx(1.0) and export.metric == pytest.approx(1.0)
    assert quant.metric >= 0.8, quant.metric
    inputs = {i["name"]: i for i in result.manifest["model"]["inputs"]}
    assert inputs["state"]["batch_axis"] == 1 and inputs["sr"]["batch_axis"] is None
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims["sr"] == [] and dims["state"][0] == 2 and isinstance(dims["state"][1], str)
    assert result.manifest["stages"][-1]["latency_shape"]["inputs"]["state"] == [2, 1, 16]


def test_distill_with_hint_mask_on_padded_batches(tmp_path):
    path = write_recipe(
        tmp_path, model={"factory": ref("build_tiny_bert"), "inputs": TEXT_INPUTS},
        data={"train": shapes_ref("padded_text_train"),
              "eval": shapes_ref("padded_text_unlabelled")},
        metric="fidelity",
        passes=[{"distill": {
            "epochs": 1, "hint_mask": "attention_mask",
            "hints": [{"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.1"}],
        }}],
    )
    result = optimize(load_recipe(path))
    assert result.stages[1].metric > 0.9, result.stages[1].metric
    assert result.manifest["stages"][1]["record"]["hint_mask"] == "attention_mask"
