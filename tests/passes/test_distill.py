"""The ``distill`` pass: students, teachers, hints, torchrun, and bad input (its losses and
training loop: tests/training/)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import toys
from toys import (
    CNN_INPUT,
    TEXT_INPUTS,
    RecordingProgress,
    assert_clean_error,
    ref,
    run_cli,
    write_recipe,
)
from toys.progress import count_teacher_calls

from compactor.errors import PassError, RecipeError
from compactor.model import load_model
from compactor.passes import RunContext
from compactor.passes.distill import DistillPass, StudentSpec, keep_layers
from compactor.recipe import load_recipe
from compactor.training import losses
from compactor.training.checkpoint import load_torch

# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class _Distill:
    """A recipe's first pass (distill) and the context it runs in."""

    ctx: RunContext
    config: Any

    @property
    def progress(self) -> Any:
        return self.ctx.progress


def _context(tmp_path: Path, **fields) -> tuple[_Distill, object]:
    fields.setdefault("metric", "accuracy")
    recipe = load_recipe(write_recipe(tmp_path, **fields))
    baseline, _ = load_model(recipe.model, recipe.base_dir)
    ctx = toys.run_context(recipe, tmp_path, progress=RecordingProgress(), baseline=baseline)
    return _Distill(ctx, recipe.pass_list[0][1]), baseline


def _run_distill(run: _Distill, stage):
    return DistillPass(run.config).run(stage, run.ctx)


def _fidelity(student, teacher, batches) -> dict[str, float]:
    """Cosine of the logits, KL(teacher ‖ student) and top-1 agreement, on ``batches``."""
    with torch.inference_mode():
        s = torch.cat([student(torch.from_numpy(b[0])) for b in batches])
        t = torch.cat([teacher(torch.from_numpy(b[0])) for b in batches])
    return {"cosine": float(F.cosine_similarity(s, t, dim=1).mean()),
            "kl": float(losses.kl_loss(s, t, 1.0)),
            "agreement": float((s.argmax(1) == t.argmax(1)).float().mean())}


def _label_free(tmp_path: Path, **distill):
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {"teacher": {"factory": ref("teacher_cnn")}, "lr": 0.003,
                             **distill}}],
    )
    teacher, evals = toys.teacher_cnn(), toys.cnn_eval_batches()
    before = _fidelity(baseline.module, teacher, evals)
    out = _run_distill(ctx, baseline)
    after = _fidelity(out.module, teacher, evals)
    # the input stage is untouched: passes never mutate their input
    assert _fidelity(baseline.module, teacher, evals) == before
    assert out.module is not baseline.module and not out.module.training
    return before, after, out


def test_label_free_distillation_brings_the_student_to_the_teacher(tmp_path):
    before, after, out = _label_free(tmp_path, epochs=6)
    assert out.record["losses"] == {"kl": 1.0}, "no labels: teacher outputs only"
    assert after["kl"] < 0.5 * before["kl"], f"KL to the teacher {before} → {after}"
    assert after["agreement"] > before["agreement"] + 0.25, f"{before} → {after}"


def test_label_free_mse_distillation_matches_the_teacher_logits(tmp_path):
    before, after, out = _label_free(tmp_path, epochs=10, losses={"mse": 1.0})
    assert out.record["losses"] == {"mse": 1.0}
    assert after["cosine"] > 0.9 and after["cosine"] > before["cosine"] + 0.5, (before, after)


def test_default_teacher_is_the_baseline_and_labels_add_ce(tmp_path):
    torch.save(toys.cnn_state_dict(), tmp_path / "weights.pt")
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_cnn"), "weights": "weights.pt", "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_labelled_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {"epochs": 1}}],
    )
    out = _run_distill(ctx, baseline)
    assert out.record["teacher"] == "baseline"
    assert out.record["losses"] == {"kl": 1.0, "ce": 0.5}


def test_feature_hints_train_through_a_projection_that_is_dropped(tmp_path):
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {
            "teacher": {"factory": ref("build_wide_cnn")}, "epochs": 2, "lr": 0.003,
            "hints": [{"student": "features.3", "teacher": "features.3", "weight": 2.0}],
        }}],
    )
    out = _run_distill(ctx, baseline)
    (hint,) = out.record["hints"]
    assert hint["projection"] == "Conv2d"
    assert (hint["student_shape"], hint["teacher_shape"]) == ([16, 8, 8], [32, 8, 8])
    assert set(out.module.state_dict()) == set(baseline.module.state_dict()), "projection kept"
    assert not out.module._forward_hooks and not out.module.features[3]._forward_hooks
    assert any("hint0" in s or "loss" in s for s in ctx.progress.statuses)


def test_frozen_parameters_stay_and_the_teacher_runs_once_per_batch(tmp_path, monkeypatch):
    calls = count_teacher_calls(monkeypatch)
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {"teacher": {"factory": ref("teacher_cnn")}, "epochs": 3,
                             "freeze": ["features.*"]}}],
    )
    out = _run_distill(ctx, baseline)
    before, after = baseline.module.state_dict(), out.module.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == k.startswith("features."), f"{k}: frozen={k.startswith('features.')}"
    assert out.record["frozen_params"] == sum(
        v.numel() for k, v in before.items() if k.startswith("features."))
    assert all(p.requires_grad for p in out.module.parameters())
    # probe 1 + eval batches 3 + 8 training batches once (3 epochs): the cache works
    assert calls["n"] == 1 + 3 + 8, calls


def test_hidden_state_hints_with_a_padding_mask_and_a_cached_teacher(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    calls = count_teacher_calls(monkeypatch)
    hints = [{"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.1"},
             {"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.3",
              "weight": 2.0}]
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_tiny_bert"), "inputs": TEXT_INPUTS},
        data={"train": ref("text_train_batches"), "eval": ref("text_batches")},
        metric="fidelity",
        passes=[{"distill": {"student": {"keep_layers": [0, 3]}, "epochs": 8, "lr": 0.003,
                             "hints": hints, "hint_mask": "attention_mask"}}],
    )
    out = _run_distill(ctx, baseline)
    assert out.record["hint_mask"] == "attention_mask"
    assert [h["projection"] for h in out.record["hints"]] == [None, None]
    history = out.record["history"]
    assert history[-1]["train_loss"] < 0.85 * history[0]["train_loss"], history
    assert len(out.module.bert.encoder.layer) == 2
    assert not any("projection" in k for k in out.module.state_dict())
    # probe 1 + eval batches 3 + 6 training batches once (8 epochs): hinted features cached
    assert calls["n"] == 1 + 3 + 6, calls


def test_hint_mask_must_fit_the_hinted_features(tmp_path):
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {"teacher": {"factory": ref("teacher_cnn")}, "epochs": 1,
                             "hints": [{"student": "features.3", "teacher": "features.3"}],
                             "hint_mask": "image"}}],
    )
    with pytest.raises(PassError, match="hint_mask 'image' has shape") as e:
        _run_distill(ctx, baseline)
    assert "hidden states" in e.value.hint


def test_freeze_pattern_that_matches_nothing(tmp_path):
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {"freeze": ["feature.*"]}}],
    )
    with pytest.raises(RecipeError, match="matches no parameter") as e:
        _run_distill(ctx, baseline)
    assert "features.0.weight" in e.value.hint


def test_onnx_teacher(tmp_path):
    toys.export_cnn_onnx(tmp_path / "teacher.onnx")
    before, after, out = _label_free(tmp_path, epochs=6, teacher={"onnx": "teacher.onnx"})
    assert out.record["teacher"] == "teacher teacher.onnx"
    assert after["kl"] < 0.5 * before["kl"], (before, after)


def test_keep_layers_on_a_layered_toy(tmp_path):
    model = toys.build_layered()
    student, info = keep_layers(model, StudentSpec(keep_layers=(0, 3)))
    assert info == {"layers": "blocks", "kept": [0, 3], "of": 4}
    assert len(student.blocks) == 2
    ids = torch.from_numpy(toys.text_arrays(2, 6, 0)["input_ids"])
    assert student(ids, torch.ones_like(ids)).shape == (2, 8)
    with pytest.raises(RecipeError, match="has 4 layers"):
        keep_layers(toys.build_layered(), StudentSpec(keep_layers=(0, 4)))


def test_keep_layers_student_of_a_tiny_bert_learns_label_free(tmp_path):
    pytest.importorskip("transformers")
    ctx, baseline = _context(
        tmp_path,
        model={"factory": ref("build_tiny_bert"), "inputs": TEXT_INPUTS},
        data={"train": ref("text_train_batches"), "eval": ref("text_batches")},
        metric="fidelity",
        passes=[{"distill": {"student": {"keep_layers": [0, 2]}, "epochs": 4, "lr": 0.003}}],
    )
    out = _run_distill(ctx, baseline)
    assert len(out.module.bert.encoder.layer) == 2
    assert out.module.bert.config.num_hidden_layers == 2
    assert len(baseline.module.bert.encoder.layer) == 4, "the teacher kept its layers"
    assert out.record["student"] == {"layers": "bert.encoder.layer", "kept": [0, 2], "of": 4}
    assert out.record["losses"] == {"mse": 1.0, "cosine": 1.0}
    history = out.record["history"]
    assert history[-1]["fidelity"] > history[0]["fidelity"] - 1e-9, history
    assert out.record["best_metric"] > 0.9, history


# --------------------------------------------------------------------------- bad input


def _cli_recipe(tmp_path: Path, distill: dict, train: str | None = "cnn_distill_batches",
                **extra) -> Path:
    data = {"eval": ref("cnn_eval_batches")}
    if train:
        data["train"] = ref(train)
    return write_recipe(
        tmp_path, model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]}, data=data,
        metric="accuracy", passes=[{"distill": distill}], **extra,
    )


def test_no_training_data_is_a_recipe_error(tmp_path):
    result = run_cli("optimize", _cli_recipe(tmp_path, {}, train=None))
    assert_clean_error(result, 2, "distill", "data.train")


def test_epochs_and_steps_together_are_refused(tmp_path):
    result = run_cli("optimize", _cli_recipe(tmp_path, {"epochs": 2, "steps": 10}))
    assert_clean_error(result, 2, "passes[0].distill", "'epochs' or 'steps'")


def test_a_locked_recipe_reloads(tmp_path):
    from compactor.recipe import parse_recipe

    for budget in ({"epochs": 2}, {"steps": 40}, {}):
        recipe = load_recipe(_cli_recipe(tmp_path, {"hints": [{"student": "a", "teacher": "b"}],
                                                    **budget}))
        again = parse_recipe(recipe.to_yaml(), base_dir=tmp_path)
        assert again.pass_list == recipe.pass_list, budget


def test_teacher_with_other_output_shape_names_both_shapes(tmp_path):
    teacher = {"factory": ref("build_cnn"), "args": {"classes": 12}}
    result = run_cli("optimize", _cli_recipe(tmp_path, {"teacher": teacher}))
    assert_clean_error(result, 4, "teacher's output has shape [32, 12]", "student's [32, 10]")
    assert not (tmp_path / ".out.compactor-work").exists(), "nothing to resume: no work folder kept"


def test_unknown_hint_module_suggests_the_closest_name(tmp_path):
    hints = [{"student": "features.3", "teacher": "featurs.2"}]
    result = run_cli("optimize", _cli_recipe(tmp_path, {"hints": hints}))
    assert_clean_error(result, 2, "hints[0].teacher", "'featurs.2'", "did you mean 'features.2'")


def test_hint_mask_is_checked_at_load(tmp_path):
    hints = [{"student": "features.3", "teacher": "features.3"}]
    result = run_cli("optimize", _cli_recipe(tmp_path, {"hints": hints, "hint_mask": "imag"}))
    assert_clean_error(result, 2, "hint_mask", "'imag' is not one of the model's inputs",
                       "did you mean 'image'")
    result = run_cli("optimize", _cli_recipe(tmp_path, {"hint_mask": "image"}))
    assert_clean_error(result, 2, "hint_mask applies to feature hints")


def test_ce_without_labels_explains_label_free_mode(tmp_path):
    result = run_cli("optimize", _cli_recipe(tmp_path, {"losses": {"ce": 1.0}}))
    assert_clean_error(result, 3, "losses.ce needs labels", "label-free")


def test_nan_loss_exits_4_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = losses.DistillLoss.__call__
    seen = {"n": 0}

    def poisoned(self, *args, **kwargs):
        total, parts = real(self, *args, **kwargs)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            seen["n"] += 1
            if seen["n"] == 11:  # epoch 2 of 8-batch epochs
                total = total * math.nan
        return total, parts

    monkeypatch.setattr(losses.DistillLoss, "__call__", poisoned)
    result = run_cli("optimize", _cli_recipe(
        tmp_path, {"teacher": {"factory": ref("teacher_cnn")}, "epochs": 3}))
    assert_clean_error(result, 4, "loss became nan", "epoch 2, step 11", "last good checkpoint")
    last = load_torch(tmp_path / ".out.compactor-work" / "checkpoints" / "01-distill" / "last.pt")
    assert last["state"]["epoch"] == 1 and last["state"]["global_step"] == 8
    assert np.isfinite([float(v.float().abs().sum()) for v in last["module"].values()]).all()


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_runs_the_pipeline_data_parallel(tmp_path):
    """`torchrun --nproc_per_node 2 compactor optimize`: rank 0 measures and writes."""
    import json
    import shutil
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    compactor = shutil.which("compactor", path=str(Path(sys.executable).parent))
    if not torchrun.is_file() or compactor is None:
        pytest.skip("torchrun or the compactor script is not installed next to python")
    path = _cli_recipe(tmp_path, {"teacher": {"factory": ref("teacher_cnn")}, "epochs": 2})
    r = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python", compactor,
         "optimize", str(path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    record = manifest["stages"][1]["record"]
    assert record["world_size"] == 2 and record["steps"] == 2 * 4  # 8 batches over 2 ranks
    assert r.stdout.count("all budgets hold") == 1, "only rank 0 reports"
    assert not (tmp_path / ".out.compactor-work").exists()
