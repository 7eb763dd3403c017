"""One conformance test over the pass registry (as timm tests every registered model): every
pass declares its contract, runs on a toy without touching its input stage, round-trips its
config through the lock, and rejects an unknown key, a wrong type and an out-of-range value
with a clear error (exit 2).

A pass registered later fails here until it has an entry in ``CASES``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from toys import (
    CNN_INPUT,
    assert_clean_error,
    build_cnn,
    export_cnn_onnx,
    fake_timer,
    ref,
    run_cli,
    run_context,
    write_recipe,
)

from compactor.model import onnx_input_specs
from compactor.passes import Pass, PassConfig, registry
from compactor.recipe import Recipe, load_recipe, parse_recipe
from compactor.stage import Stage

TOY_DATA = {
    "eval": ref("cnn_eval_batches"),
    "calibration": ref("cnn_calibration_batches"),
    "train": ref("cnn_calibration_batches"),  # 64 images: distillation's epoch stays short
}


@dataclass(frozen=True)
class Bad:
    """A bad value of each kind a user writes, with a fragment of the message it must give."""

    unknown_key: tuple[dict, str]  # a misspelt key: the message suggests the right one
    wrong_type: tuple[dict, str]
    out_of_range: tuple[dict, str]


@dataclass(frozen=True)
class Case:
    config: dict  # a small valid config, fast on the toy
    bad: Bad


CASES: dict[str, Case] = {
    "export": Case(
        config={"simplify": False, "check_batches": 1},
        bad=Bad(
            unknown_key=({"opsett": 17}, "did you mean 'opset'?"),
            wrong_type=({"simplify": "maybe"}, "export.simplify: input should be a valid boolean"),
            out_of_range=({"opset": 99}, "export.opset: input should be less than or equal to 23"),
        ),
    ),
    "quantize": Case(
        config={"calibration_samples": 32, "time_budget_s": 5},
        bad=Bad(
            unknown_key=({"calibration_sample": 5}, "did you mean 'calibration_samples'?"),
            wrong_type=({"per_channel": "often"},
                        "quantize.per_channel: input should be a valid boolean"),
            out_of_range=({"percentile": 50},
                          "quantize.percentile: input should be greater than 90"),
        ),
    ),
    "distill": Case(
        config={"epochs": 1},
        bad=Bad(
            unknown_key=({"epoch": 1}, "did you mean 'epochs'?"),
            wrong_type=({"epochs": "two"}, "distill.epochs: input should be a valid integer"),
            out_of_range=({"temperature": -1},
                          "distill.temperature: input should be greater than 0"),
        ),
    ),
    "prune": Case(
        config={"amount": 0.25},
        bad=Bad(
            unknown_key=({"amount": 0.3, "round_too": 8}, "did you mean 'round_to'?"),
            wrong_type=({"amount": "half"}, "prune.amount: input should be a valid number"),
            out_of_range=({"amount": 1.5}, "prune.amount: input should be less than 1"),
        ),
    ),
}

PASSES = sorted(registry())


def case(name: str) -> Case:
    if name not in CASES:
        pytest.fail(f"pass {name!r} is registered but has no conformance case: add a config "
                    "that runs fast on a toy and its bad configs to CASES in "
                    "tests/passes/test_conformance.py")
    return CASES[name]


def toy_recipe(folder: Path, name: str, config: dict) -> Path:
    """A recipe running pass ``name`` alone: on the toy CNN for a torch pass, on the same CNN
    exported to ONNX for an ONNX pass."""
    if registry()[name].input_kind == "onnx":
        model = {"onnx": str(export_cnn_onnx(folder / "cnn.onnx"))}
    else:
        model = {"factory": ref("build_cnn"), "inputs": [CNN_INPUT]}
    return write_recipe(folder, model=model, data=TOY_DATA, passes=[{name: config}])


def input_stage(recipe: Recipe, kind: str) -> Stage:
    if kind == "onnx":
        return Stage("baseline", "onnx", onnx_path=recipe.resolve(recipe.model.onnx),
                     lineage=("baseline",))
    return Stage("baseline", "torch", module=build_cnn(), lineage=("baseline",))


def stage_state(stage: Stage) -> dict:
    """Everything a pass could change in a stage: its fields, and its weights or file."""
    state = {f.name: copy.deepcopy(getattr(stage, f.name))
             for f in dataclasses.fields(stage) if f.name != "module"}
    if stage.module is not None:
        state["module"] = {k: v.detach().clone() for k, v in stage.module.state_dict().items()}
    if stage.onnx_path is not None:
        state["onnx_bytes"] = Path(stage.onnx_path).read_bytes()
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key == "module":
            assert before[key].keys() == after[key].keys()
            for tensor in before[key]:
                assert torch.equal(before[key][tensor], after[key][tensor]), (
                    f"the pass changed its input's {tensor!r}")
        else:
            assert before[key] == after[key], f"the pass changed its input stage's {key}"


# --------------------------------------------------------------------------- the registry


def test_every_registered_pass_has_a_case_and_every_case_a_pass():
    assert PASSES, "no pass is registered"
    assert set(CASES) == set(PASSES), (
        f"no case: {sorted(set(PASSES) - set(CASES))}; no pass: {sorted(set(CASES) - set(PASSES))}")


@pytest.mark.parametrize("name", PASSES)
def test_pass_declares_its_contract(name: str):
    cls = registry()[name]
    assert issubclass(cls, Pass)
    assert cls.name == name
    assert isinstance(cls.Config, type) and issubclass(cls.Config, PassConfig), cls.Config
    assert cls.input_kind in ("torch", "onnx") and cls.output_kind in ("torch", "onnx")
    assert isinstance(cls.summary, str) and cls.summary.strip(), f"{name} has no summary"
    assert isinstance(cls.distributed, bool) and isinstance(cls.must_be_faster, bool)
    assert cls.run is not Pass.run, f"{name} does not implement run()"


# --------------------------------------------------------------------------- run on a toy


@pytest.mark.parametrize("name", PASSES)
def test_pass_leaves_its_input_stage_untouched(name: str, tmp_path: Path, monkeypatch):
    # Candidates are 'timed' by a fake: this test is about the stage, not speed.
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    cls = registry()[name]
    recipe = load_recipe(toy_recipe(tmp_path, name, case(name).config))
    ((first, config),) = [(n, c) for n, c in recipe.pass_list if n == name]
    assert first == name
    stage = input_stage(recipe, cls.input_kind)
    work = tmp_path / "work"
    work.mkdir()
    inputs = onnx_input_specs(stage.onnx_path) if cls.input_kind == "onnx" else None
    ctx = run_context(recipe, work, inputs=inputs, baseline=stage)
    before = stage_state(stage)

    out = cls(config).run(stage, ctx)

    assert_same_state(before, stage_state(stage))
    assert out is not stage and out.kind == cls.output_kind, (out.kind, cls.output_kind)


# --------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("name", PASSES)
def test_config_round_trips_through_the_lock(name: str, tmp_path: Path):
    recipe = load_recipe(toy_recipe(tmp_path, name, case(name).config))
    again = parse_recipe(recipe.to_yaml(), base_dir=recipe.base_dir)
    assert again.pass_list == recipe.pass_list
    (config,) = [c for n, c in recipe.pass_list if n == name]
    assert type(config) is registry()[name].Config


# --------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("kind", [f.name for f in dataclasses.fields(Bad)])
@pytest.mark.parametrize("name", PASSES)
def test_bad_config_is_a_clear_recipe_error(name: str, kind: str, tmp_path: Path):
    config, fragment = getattr(case(name).bad, kind)
    path = toy_recipe(tmp_path, name, config)
    assert_clean_error(run_cli("recipe", "validate", path), 2, f"passes[0].{name}", fragment)
