"""compactor/training/loop.py: the training loop on a toy regression (progress, best
checkpoint and early stopping, step budgets, the LR schedule, Ctrl-C and resume, NaN loss)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from toys import RecordingProgress

from compactor.errors import PassError, RecipeError
from compactor.training.checkpoint import load_torch
from compactor.training.loop import EvalResult, LoopConfig, TrainTask, train


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


def _two_part_task(seed: int = 0) -> TrainTask:
    """The regression with its loss split in two named terms (as two model outputs give),
    each reported in training and in evaluation."""
    task = _regression_task(seed=seed)
    module, batches = task.module, task.batches

    def parts_of(x, y):
        out = module(x)
        return {"a.mse": F.mse_loss(out, y), "b.mse": 0.5 * F.mse_loss(out, 2 * y)}

    def step(batch):
        parts = parts_of(*batch)
        return sum(parts.values()), parts, len(batch[0])

    def evaluate():
        with torch.no_grad():
            parts = [parts_of(x, y) for x, y in batches]
        mean = {k: float(sum(p[k] for p in parts) / len(parts)) for k in parts[0]}
        return EvalResult(value=-sum(mean.values()), loss=sum(mean.values()), parts=mean)

    return TrainTask(module, step, evaluate, batches, "score", True, torch.device("cpu"))


def test_each_loss_term_is_in_the_history_and_survives_a_resume(tmp_path):
    cfg = LoopConfig(epochs=3, lr=0.02, seed=3)
    whole = train(_two_part_task(), cfg, tmp_path / "a", key="k", progress=RecordingProgress(),
                  label="distill: train")
    for entry in whole.history:
        assert set(entry["train_parts"]) == set(entry["eval_parts"]) == {"a.mse", "b.mse"}
        assert entry["eval_loss"] == pytest.approx(sum(entry["eval_parts"].values()), abs=1e-5)
    assert whole.history[-1]["eval_parts"]["a.mse"] < whole.history[0]["eval_parts"]["a.mse"]
    with pytest.raises(KeyboardInterrupt):
        train(_two_part_task(), cfg, tmp_path / "b", key="k",
              progress=RecordingProgress(interrupt_at=8), label="distill: train")
    resumed = train(_two_part_task(seed=99), cfg, tmp_path / "b", key="k",
                    progress=RecordingProgress(), resume=True, label="distill: train")
    assert resumed.resumed_from is not None and resumed.history == whole.history
    assert EvalResult(**dataclasses.asdict(whole.best)) == whole.best, "checkpointed as values"
