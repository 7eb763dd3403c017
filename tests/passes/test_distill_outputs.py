"""The ``distill`` pass on a model with several outputs: every output is distilled (by
default; per output under ``outputs``), each head's loss is recorded, and bad output
configs are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import toys
from toys import RecordingProgress, assert_clean_error, run_cli, write_recipe
from toys.multihead import (
    INPUT,
    OUTPUTS,
    build_student,
    build_teacher,
    head_errors,
    ref_multihead,
)
from toys.progress import count_teacher_calls

from compactor.errors import PassError, RecipeError
from compactor.model import load_model
from compactor.passes.distill import DistillPass
from compactor.recipe import load_recipe


def _recipe(tmp_path: Path, distill: dict, outputs=OUTPUTS, **fields) -> Path:
    """The teacher is the recipe's model (the baseline, distill's default teacher)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = {"factory": ref_multihead("build_teacher"), "inputs": [INPUT]}
    if outputs:
        model["outputs"] = list(outputs)
    return write_recipe(
        tmp_path, model=model,
        data={"train": ref_multihead("train_batches"), "eval": ref_multihead("eval_batches")},
        metric="fidelity", passes=[{"distill": {"lr": 0.01, "epochs": 4, **distill}}],
        **fields,
    )


def _distill(tmp_path: Path, distill: dict, student: str = "build_student", **kw):
    """Run the pass on an untrained narrow student, as after pruning the teacher."""
    from toys import multihead

    recipe = load_recipe(_recipe(tmp_path, distill, **kw))
    baseline, _ = load_model(recipe.model, recipe.base_dir)
    ctx = toys.run_context(recipe, tmp_path, progress=RecordingProgress(), baseline=baseline)
    stage = baseline.derive("prune", module=getattr(multihead, student)())
    out = DistillPass(recipe.pass_list[0][1]).run(stage, ctx)
    return out, ctx


def test_every_head_learns_by_default_and_reports_its_loss(tmp_path):
    teacher = build_teacher()
    before = head_errors(build_student(), teacher)
    out, ctx = _distill(tmp_path / "all", {})
    after = head_errors(out.module, teacher)
    first_only, _ = _distill(tmp_path / "first",
                             {"outputs": {"box": {"weight": 0}, "landmarks": {"weight": 0}}})
    old = head_errors(first_only.module, teacher)
    for head in OUTPUTS:  # errors are MSE / teacher variance: 1.0 is a constant predictor
        assert after[head] < 0.5 * before[head], (head, before, after)
    # the regression: with the first output alone (before this change) the other heads
    # were never trained
    for head in ("box", "landmarks"):
        assert after[head] < 0.5 * old[head] and after[head] < 0.5, (head, old, after)
    rec = out.record
    assert rec["losses"] == {"mse": 1.0, "cosine": 1.0}, "the first output: today's losses"
    assert {n: e["losses"] for n, e in rec["outputs"].items()} == {
        "logits": {"mse": 1.0, "cosine": 1.0}, "box": {"nmse": 1.0},
        "landmarks": {"nmse": 1.0}}
    assert rec["outputs"]["box"]["shape"] == [4]
    assert rec["outputs"]["landmarks"]["shape"] == [5, 2]
    assert rec["outputs"]["box"]["teacher_variance"] > 100 > 1 > rec["outputs"][
        "landmarks"]["teacher_variance"], "pixels and unit coordinates"
    last = rec["history"][-1]
    assert set(last["eval_parts"]) == {"logits.mse", "logits.cosine", "box.nmse",
                                       "landmarks.nmse"}
    assert set(last["train_parts"]) == set(last["eval_parts"])
    assert rec["outputs"]["box"]["eval_nmse"] < 0.5, rec["outputs"]
    assert any("per output" in n and "box.nmse" in n for n in ctx.progress.notes)
    assert not out.warnings
    assert set(first_only.record["outputs"]["box"]["losses"]) == set(), "weight 0: left out"


def test_per_output_losses_weights_and_a_dict_returning_student(tmp_path, monkeypatch):
    calls = count_teacher_calls(monkeypatch)
    out, _ = _distill(tmp_path, {
        "epochs": 2,
        "outputs": {"logits": {"loss": "kl", "temperature": 2.0},
                    "box": {"loss": "mse", "weight": 0.001}},
    }, student="build_dict_student")
    rec = out.record
    assert {n: e["losses"] for n, e in rec["outputs"].items()} == {
        "logits": {"kl": 1.0}, "box": {"mse": 0.001}, "landmarks": {"nmse": 1.0}}
    assert set(rec["history"][-1]["eval_parts"]) == {"logits.kl", "box.mse", "landmarks.nmse"}
    assert rec["temperature"] == 4.0 and rec["losses"] == {"kl": 1.0}
    # probe 1 + 12 training batches once (nmse's variance fills the cache) + 3 eval batches
    assert calls["n"] == 1 + 12 + 3, calls


def test_a_head_no_better_than_a_constant_is_a_warning(tmp_path):
    # lr so small the student stays where it started: its heads stay worse than a constant
    out, _ = _distill(tmp_path, {"lr": 1e-7, "epochs": 1})
    assert any("'box'" in w and "no better than predicting a constant" in w
               for w in out.warnings), out.warnings


def test_unnamed_outputs_take_the_exported_names(tmp_path):
    out, _ = _distill(tmp_path, {"epochs": 1, "outputs": {"output_2": {"weight": 2.0}}},
                      outputs=())
    assert list(out.record["outputs"]) == ["output_0", "output_1", "output_2"]
    assert out.record["outputs"]["output_2"]["losses"] == {"nmse": 2.0}


# --------------------------------------------------------------------------- bad input


def test_unknown_output_name_is_refused_at_load_with_a_suggestion(tmp_path):
    result = run_cli("optimize", _recipe(tmp_path, {"outputs": {"boxes": {"weight": 1}}}))
    assert_clean_error(result, 2, "passes[0].distill.outputs", "'boxes' is not one of the "
                       "model's outputs (logits, box, landmarks)", "did you mean 'box'")


def test_unknown_output_name_without_model_outputs_is_refused_at_pass_start(tmp_path):
    with pytest.raises(RecipeError, match="'output_3' is not one of the model's outputs") as e:
        _distill(tmp_path, {"outputs": {"output_3": {}}}, outputs=())
    assert e.value.exit_code == 2 and "output_0" in e.value.message


@pytest.mark.parametrize(("distill", "fragments"), [
    ({"outputs": {"box": {"weight": -1}}},
     ("distill.outputs.box.weight", "greater than or equal to 0")),
    ({"outputs": {"box": {"loss": "nmse", "temperature": 2}}},
     ("temperature applies to loss 'kl'",)),
    ({"outputs": {"box": {"loss": "huber"}}}, ("distill.outputs.box.loss",)),
    ({"losses": {"kl": 1}, "outputs": {"logits": {"loss": "mse"}}},
     ("'logits' has its losses set twice", "keep one")),
])
def test_bad_output_configs_exit_2(tmp_path, distill, fragments):
    result = run_cli("optimize", _recipe(tmp_path, distill))
    assert_clean_error(result, 2, *fragments)


def test_nothing_left_to_distill(tmp_path):
    zero = {name: {"weight": 0} for name in OUTPUTS}
    with pytest.raises(RecipeError, match="nothing to distill") as e:
        _distill(tmp_path, {"outputs": zero})
    assert e.value.exit_code == 2


def test_student_output_the_teacher_lacks_names_it(tmp_path):
    """A one-output teacher for a three-output student: the second output has no match."""
    recipe = load_recipe(_recipe(tmp_path, {"teacher": {"factory": ref_multihead(
        "build_one_head")}}))
    baseline, _ = load_model(recipe.model, recipe.base_dir)
    ctx = toys.run_context(recipe, tmp_path, progress=RecordingProgress(), baseline=baseline)
    stage = baseline.derive("prune", module=build_student())
    with pytest.raises(PassError, match="the student's output 'box' has no teacher output"):
        DistillPass(recipe.pass_list[0][1]).run(stage, ctx)


def test_an_onnx_teacher_teaches_every_output(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher()
    torch.onnx.export(teacher, (torch.randn(2, 16),), str(tmp_path / "teacher.onnx"),
                      dynamo=False, input_names=["x"], output_names=list(OUTPUTS),
                      dynamic_axes={"x": {0: "batch"}})
    before = head_errors(build_student(), teacher)
    out, _ = _distill(tmp_path, {"teacher": {"onnx": "teacher.onnx"}})
    after = head_errors(out.module, teacher)
    assert out.record["teacher"] == "teacher teacher.onnx"
    for head in OUTPUTS:
        assert after[head] < 0.5 * before[head], (head, before, after)


def test_a_locked_recipe_with_outputs_reloads(tmp_path):
    from compactor.recipe import parse_recipe

    recipe = load_recipe(_recipe(tmp_path, {"outputs": {
        "logits": {"loss": "kl", "temperature": 2.0}, "box": {"weight": 0.5}}}))
    again = parse_recipe(recipe.to_yaml(), base_dir=tmp_path)
    assert again.pass_list == recipe.pass_list
    assert again.pass_list[0][1].outputs["box"].loss == "nmse"
