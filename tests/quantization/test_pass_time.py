"""The quantize pass's time: time_budget_s bounds the whole pass (preparation included, the
search keeping a quarter of it), and the record says where the seconds went."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from toys import cnn_data, cnn_onnx, fake_timer, run_pass, toy_recipe

from compactor.quantization.search import Search


def test_the_record_says_where_the_pass_time_went(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    cnn = cnn_onnx(tmp_path / "cnn.onnx")
    out = run_pass(tmp_path, toy_recipe(tmp_path, cnn, cnn_data), cnn, mode="static")
    search = out.record["search"]
    phases = search["phases"]
    assert set(phases) == {"prepare", "calibration_and_reference", "build", "timing",
                           "accuracy", "analysis_and_other"}, phases
    assert phases["build"] > 0 and phases["accuracy"] > 0, phases
    assert sum(phases.values()) <= search["pass_seconds"] + 0.05, (phases, search)


def test_the_search_ends_by_the_pass_deadline_but_keeps_a_floor(tmp_path):
    env = SimpleNamespace(time_budget_s=100.0)
    s = Search(tmp_path / "m.onnx", SimpleNamespace(), env)
    s.limit_to(s.t0 + 40.0, 25.0)
    assert s.deadline == pytest.approx(s.t0 + 40.0)
    s.limit_to(time.monotonic() - 60.0, 25.0)  # preparation ate the whole budget
    assert s.deadline == pytest.approx(s.t0 + 25.0)
