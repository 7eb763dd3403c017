"""The ``distill`` pass: losses, the training loop, students, teachers, and bad input."""

from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import toys
from toys import CNN_INPUT, TEXT_INPUTS, assert_clean_error, ref, run_cli, write_recipe

from compactor.errors import PassError, RecipeError
from compactor.model import load_model
from compactor.passes import RunContext
from compactor.passes.distill import DistillPass, StudentSpec, keep_layers
from compactor.progress import Progress, Task
from compactor.recipe import load_recipe
from compactor.training import losses
from compactor.training.checkpoint import load_torch
from compactor.training.loop import EvalResult, LoopConfig, TrainTask, train

# --------------------------------------------------------------------------- losses


def test_kl_of_identical_logits_is_zero():
    z = torch.randn(16, 10) * 5
    for t in (1.0, 4.0, 10.0):
        value = float(losses.kl_loss(z, z.clone(), t))
        assert abs(value) < 1e-6, f"KL(z‖z) at T={t} is {value}"


def test_kl_matches_hinton_with_t_squared_scaling():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    for temp in (1.0, 2.0, 4.0):
        p = F.softmax(t / temp, dim=1)
        manual = (p * (p.log() - F.log_softmax(s / temp, dim=1))).sum(1).mean() * temp**2
        got = losses.kl_loss(s, t, temp)
        assert torch.allclose(got, manual, atol=1e-6), (temp, float(got), float(manual))
    # T² keeps the gradients' size: at high T they tend to (z_s - z_t) / (N · classes)
    s.requires_grad_(True)
    losses.kl_loss(s, t, 50.0).backward()
    centred = (s - t) - (s - t).mean(dim=1, keepdim=True)
    want = centred.detach() / (s.shape[0] * s.shape[1])
    err = float((s.grad - want).abs().max() / want.abs().max())
    assert err < 0.05, f"relative gradient error at T=50: {err:.4f}"


def test_kl_on_token_logits_counts_every_token():
    z = torch.randn(2, 3, 7)
    flat = losses.kl_loss(z.reshape(6, 7), z.reshape(6, 7) * 0.5, 2.0)
    assert torch.allclose(losses.kl_loss(z, z * 0.5, 2.0), flat)


def test_ce_with_labels_and_one_hot():
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(losses.ce_loss(z, y), F.cross_entropy(z, y))
    assert torch.allclose(losses.ce_loss(z, F.one_hot(y, 4)), F.cross_entropy(z, y), atol=1e-6)


def test_mse_and_cosine():
    a = torch.randn(5, 8)
    assert float(losses.mse_loss(a, a)) == 0.0
    assert float(losses.cosine_loss(a, a)) < 1e-6
    assert abs(float(losses.cosine_loss(a, -a)) - 2.0) < 1e-6
    assert float(losses.cosine_loss(a, 3.0 * a)) < 1e-6, "cosine ignores scale"
    assert float(losses.mse_loss(a, 3.0 * a)) > 0.1, "mse does not"


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [((2, 8, 4, 4), (2, 16, 4, 4), "Conv2d"), ((2, 5, 32), (2, 5, 64), "Linear"),
     ((2, 32), (2, 48), "Linear"), ((2, 8, 4, 4), (2, 8, 4, 4), None)],
)
def test_projection_maps_the_student_width_to_the_teacher(student, teacher, kind):
    s, t = torch.randn(*student), torch.randn(*teacher)
    proj = losses.make_projection(s, t)
    assert (None if proj is None else type(proj).__name__) == kind
    if proj is not None:
        assert proj(s).shape == t.shape


def test_projection_refuses_other_differences():
    with pytest.raises(ValueError, match="more than their width"):
        losses.make_projection(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8))


def test_distill_loss_sums_its_weighted_parts():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    fs, ft = [torch.randn(4, 6)], [torch.randn(4, 6)]
    fn = losses.DistillLoss(losses.LossWeights(kl=0.5, ce=2.0, mse=1.0, cosine=0.25), 3.0,
                            hint_weights=[4.0])
    total, parts = fn(s, t, y, fs, ft)
    assert set(parts) == {"kl", "ce", "mse", "cosine", "hint0"}
    assert torch.allclose(parts["kl"], 0.5 * losses.kl_loss(s, t, 3.0))
    assert torch.allclose(parts["hint0"], 4.0 * F.mse_loss(fs[0], ft[0]))
    assert torch.allclose(total, sum(parts.values()))
    with pytest.raises(ValueError, match="needs labels"):
        fn(s, t, None)


def test_masked_hint_counts_real_positions_only():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    real = mask.bool()
    want = F.mse_loss(s[real], t[real])
    got = losses.hint_loss(s, t, mask)
    assert torch.allclose(got, want, atol=1e-6), (float(got), float(want))
    s2 = s.clone()
    s2[~real] += 100.0  # padding positions: anything goes
    assert torch.allclose(losses.hint_loss(s2, t, mask), want, atol=1e-6)
    assert torch.allclose(losses.hint_loss(s, t, torch.ones(3, 5)), F.mse_loss(s, t))
    fn = losses.DistillLoss(losses.LossWeights(cosine=1.0), hint_weights=[2.0])
    _, parts = fn(s.mean(1), t.mean(1), None, [s2], [t], mask)
    assert torch.allclose(parts["hint0"], 2.0 * want, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        losses.hint_loss(s, t, mask[:, :4])


# --------------------------------------------------------------------------- the loop


class _Bar(Task):
    def __init__(self, owner):
        self.owner = owner

    def advance(self, n: int = 1) -> None:
        self.owner.steps += n
        if self.owner.interrupt_at == self.owner.steps:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    def status(self, text: str) -> None:
        self.owner.statuses.append(text)


class RecordingProgress(Progress):
    """Counts training steps, keeps status lines, and can press Ctrl-C at a given step."""

    def __init__(self, interrupt_at: int | None = None):
        self.interrupt_at = interrupt_at
        self.steps = 0
        self.statuses: list[str] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def task(self, description, total=None):
        yield _Bar(self) if description.startswith("distill: train") else Task()

    def note(self, message):
        self.notes.append(message)


def _regression_task(evals: list[float] | None = None, seed: int = 0) -> TrainTask:
    """A linear model fitting a fixed target; ``evals`` scripts the eval metric per epoch."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1),
                                 torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 4, generator=g) for _ in range(6)]
    batches = [(x, x.sum(1, keepdim=True)) for x in xs]
    calls = {"n": 0}

    def step(batch):
        x, y = batch
        loss = F.mse_loss(module(x), y)
        return loss, {"mse": loss}, len(x)

    def evaluate():
        calls["n"] += 1
        with torch.no_grad():
            loss = float(sum(F.mse_loss(module(x), y) for x, y in batches) / len(batches))
        value = evals[calls["n"] - 1] if evals else -loss
        return EvalResult(value=value, loss=loss)

    return TrainTask(module, step, evaluate, batches, "score", True, torch.device("cpu"))


def test_training_reduces_the_loss_and_reports_progress(tmp_path):
    task = _regression_task()
    before = task.evaluate().loss
    progress = RecordingProgress()
    result = train(task, LoopConfig(epochs=6, lr=0.02, seed=0), tmp_path, key="k",
                   progress=progress, label="distill: train")
    assert result.steps == 36 and result.total_steps == 36
    assert result.best.loss < 0.5 * before, (before, result.best.loss)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    status = progress.statuses[-1]
    for part in ("epoch 6/6", "loss", "score", "samples/s", "ETA"):
        assert part in status, status


def test_best_checkpoint_is_kept_and_early_stopping_stops(tmp_path):
    task = _regression_task(evals=[0.5, 0.9, 0.7, 0.8, 0.95, 0.99])
    result = train(task, LoopConfig(epochs=6, lr=0.01, patience=2), tmp_path, key="k",
                   progress=RecordingProgress())
    assert result.stopped_early and result.epochs == 4, result.history
    assert result.best_epoch == 2 and result.best.value == 0.9
    best = load_torch(tmp_path / "best.pt")
    assert best["epoch"] == 2
    for k, v in task.module.state_dict().items():
        assert torch.equal(v, best["module"][k]), f"{k}: the module is not the best epoch's"


def test_steps_budget_instead_of_epochs(tmp_path):
    result = train(_regression_task(), LoopConfig(steps=9, lr=0.01), tmp_path, key="k",
                   progress=RecordingProgress())
    assert result.steps == 9 and result.epochs == 2  # 6 steps, then 3 and an evaluation


def test_lr_schedule_warms_up_then_decays():
    from compactor.training.loop import lr_lambda

    f = lr_lambda(100, 10, "cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5)
    assert f(99) < 0.01


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = LoopConfig(epochs=4, lr=0.02, seed=3)
    whole = _regression_task()
    train(whole, cfg, tmp_path / "a", key="k", progress=RecordingProgress(),
          label="distill: train")

    cut = _regression_task()
    with pytest.raises(KeyboardInterrupt):
        train(cut, cfg, tmp_path / "b", key="k", progress=RecordingProgress(interrupt_at=9),
              label="distill: train")
    saved = load_torch(tmp_path / "b" / "last.pt")
    # Ctrl-C after step 9: step 10 finishes, then the checkpoint is written
    assert saved["state"]["global_step"] == 10 and saved["state"]["epoch"] == 1

    resumed = _regression_task(seed=99)  # other initial weights: all must come from the file
    result = train(resumed, cfg, tmp_path / "b", key="k", progress=RecordingProgress(),
                   resume=True, label="distill: train")
    assert result.resumed_from == {"epoch": 1, "step": 10}
    for k, v in whole.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), f"{k} differs after resume"


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    train(_regression_task(), LoopConfig(epochs=1), tmp_path, key="old",
          progress=RecordingProgress())
    with pytest.raises(RecipeError, match="different settings"):
        train(_regression_task(), LoopConfig(epochs=1), tmp_path, key="new",
              progress=RecordingProgress(), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    task = _regression_task()
    inner = task.step
    count = {"n": 0}

    def step(batch):
        count["n"] += 1
        loss, parts, n = inner(batch)
        return (loss * float("nan") if count["n"] == 8 else loss), parts, n

    task.step = step
    with pytest.raises(PassError) as e:
        train(task, LoopConfig(epochs=3), tmp_path, key="k", progress=RecordingProgress())
    msg = str(e.value)
    assert "nan" in msg and "epoch 2, step 8" in msg and "last good checkpoint" in msg, msg
    assert load_torch(tmp_path / "last.pt")["state"]["global_step"] == 6


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


def _count_teacher_calls(monkeypatch) -> dict[str, int]:
    """``calls["n"]`` counts the teacher's forward passes from here on."""
    from compactor.passes import distill

    calls = {"n": 0}
    real = distill._Teacher.__call__

    def counting(self, batch):
        calls["n"] += 1
        return real(self, batch)

    monkeypatch.setattr(distill._Teacher, "__call__", counting)
    return calls


def test_frozen_parameters_stay_and_the_teacher_runs_once_per_batch(tmp_path, monkeypatch):
    calls = _count_teacher_calls(monkeypatch)
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
    calls = _count_teacher_calls(monkeypatch)
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


# --------------------------------------------------------------------------- data parallel

_DDP_WORKER = '''
import json, sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compactor.progress import Progress
from compactor.training import ddp
from compactor.training.loop import EvalResult, LoopConfig, TrainTask, train

out = Path(sys.argv[1])
assert ddp.ensure_initialized(use_cuda=False)
torch.manual_seed(ddp.rank())  # different initial weights: DDP must broadcast rank 0's
module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
wrapped = ddp.wrap(module, torch.device("cpu"))
g = torch.Generator().manual_seed(1)
batches = [torch.randn(8, 4, generator=g) for _ in range(7)]  # 7: one is left out
seen = []

def step(x):
    seen.append(float(x[0, 0]))
    loss = F.mse_loss(wrapped(x), x.sum(1, keepdim=True))
    return loss, {"mse": loss}, len(x)

def evaluate():
    with torch.no_grad():
        loss = float(sum(F.mse_loss(module(x), x.sum(1, keepdim=True)) for x in batches))
    return EvalResult(value=-loss, loss=loss)

task = TrainTask(module, step, evaluate, batches, "score", True, torch.device("cpu"))
ckpt = out / f"rank{ddp.rank()}"
result = train(task, LoopConfig(epochs=2, lr=0.01), ckpt, key="k", progress=Progress(),
               writable=ddp.is_main())
torch.save(module.state_dict(), out / f"weights{ddp.rank()}.pt")
(out / f"result{ddp.rank()}.json").write_text(json.dumps({**result.to_record(), "seen": seen}))
ddp.shutdown()
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_training_with_two_cpu_processes(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    for _attempt in range(2):  # a free port can be taken before rank 0 binds it: retry once
        port = str(_free_port())
        procs = []
        for rank in (0, 1):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=120)[0] for p in procs]
        if not any("address already in use" in o.lower() for o in outs):
            break
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k}: the ranks' weights differ"
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["steps"] == r1["steps"] == 2 * 3
    for epoch in (slice(0, 3), slice(3, 6)):  # each epoch, each rank has its own batches
        assert not set(r0["seen"][epoch]) & set(r1["seen"][epoch]), (r0["seen"], r1["seen"])
    assert (tmp_path / "rank0" / "last.pt").is_file()
    assert not (tmp_path / "rank1").exists(), "only rank 0 writes checkpoints"


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
