"""The training loop's thread choice: the faster of all threads and one, from its own steps."""

from __future__ import annotations

import pytest
import torch

from compactor.training.threads import MIN_STEPS, ThreadChooser


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _run(chooser: ThreadChooser, all_s: float, one_s: float) -> list[int]:
    seen = []
    for step in range(8):
        chooser.before(step)
        seen.append(torch.get_num_threads())
        chooser.after(step, all_s if step < 3 else one_s)
    return seen


def test_one_thread_is_kept_when_it_steps_faster(two_threads):
    c = ThreadChooser("cpu", total_steps=MIN_STEPS, distributed=False)
    seen = _run(c, all_s=0.020, one_s=0.007)
    assert seen[:6] == [2, 2, 2, 1, 1, 1]
    assert seen[6:] == [1, 1]
    assert c.record() == {"threads": 1, "of": 2, "step_ms": {"all": 20.0, "one": 7.0}}
    c.restore()
    assert torch.get_num_threads() == 2


def test_all_threads_are_kept_when_they_step_faster(two_threads):
    c = ThreadChooser(torch.device("cpu"), total_steps=MIN_STEPS, distributed=False)
    seen = _run(c, all_s=0.005, one_s=0.009)
    assert seen[6:] == [2, 2]
    assert c.record()["threads"] == 2


@pytest.mark.parametrize("kw", [
    {"device": "cpu", "total_steps": MIN_STEPS - 1, "distributed": False},  # short run
    {"device": "cpu", "total_steps": 1000, "distributed": True},  # torchrun
    {"device": torch.device("meta"), "total_steps": 1000, "distributed": False},  # not CPU
])
def test_no_probing_where_it_cannot_pay(two_threads, kw):
    c = ThreadChooser(**kw)
    assert _run(c, all_s=0.020, one_s=0.001) == [2] * 8
    assert c.record() is None


def test_the_loop_records_its_choice_and_restores_threads(two_threads, tmp_path):
    from compactor.progress import Progress
    from compactor.training.loop import EvalResult, LoopConfig, TrainTask, train

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(MIN_STEPS)]

    def step(b):
        loss = torch.nn.functional.mse_loss(model(b[0]), b[1])
        return loss, {"mse": loss}, len(b[0])

    task = TrainTask(model, step, lambda: EvalResult(0.0, 0.0), batches)
    res = train(task, LoopConfig(epochs=1), tmp_path, key="k", progress=Progress())
    assert res.to_record()["threads"]["of"] == 2
    assert res.to_record()["threads"]["threads"] in (1, 2)
    assert torch.get_num_threads() == 2
