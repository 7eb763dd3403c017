"""The int8 search's accuracy judge scores every output the recipe's metric names: a
candidate that breaks a second head misses the budget, though output 0 is untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from toys.heads import heads_data, three_heads_onnx

from compactor.data import Batch
from compactor.metrics import get_metric
from compactor.quantization.accuracy import AccuracyJudge, Budget, run_all


def _batches(n: int = 48, size: int = 16) -> list[Batch]:
    x = heads_data(n, seed=1)["x"]
    return [Batch({"x": x[i:i + size]}) for i in range(0, n, size)]


def _judge(tmp_path: Path, metric) -> AccuracyJudge:
    model = three_heads_onnx(tmp_path / "heads.onnx")
    batches = _batches()
    baseline = run_all(model, batches)
    return AccuracyJudge(metric, batches, model,
                         lambda _v: Budget(0.01, "test", "0.01", "baseline"),
                         baseline, holdout_fraction=0.25, seed=0)


def test_a_broken_second_head_misses_the_budget(tmp_path):
    judge = _judge(tmp_path, get_metric("fidelity", Path(".")))
    assert judge.reference.names == ("face", "box", "landmarks")
    same = judge.score(three_heads_onnx(tmp_path / "same.onnx"))
    assert same.ok and same.value == pytest.approx(1.0)
    broken = judge.score(three_heads_onnx(tmp_path / "broken.onnx", broken="landmarks"))
    assert not broken.ok and broken.drop > 0.1, broken
    assert judge.score(three_heads_onnx(tmp_path / "b2.onnx", broken="landmarks"),
                       "held-out").ok is False


def test_naming_one_output_scores_that_output_alone(tmp_path):
    from compactor.recipe import MetricSpec

    metric = get_metric(MetricSpec(name="fidelity", outputs=("box",)), Path("."))
    judge = _judge(tmp_path, metric)
    elsewhere = judge.score(three_heads_onnx(tmp_path / "lm.onnx", broken="landmarks"))
    assert elsewhere.ok and elsewhere.value == pytest.approx(1.0)
    here = judge.score(three_heads_onnx(tmp_path / "box.onnx", broken="box"))
    assert not here.ok
    assert np.isfinite(here.value)
