"""A repair that made the most accurate candidate pass is carried to the other kinds of
candidate (another op set, the fused source): the fastest that passes wins, not the one the
repair happened to start from (MiniLM: SmoothQuant was applied to the unfused "compute ops"
candidate only, while the fused "all ops" one, smoothed, passes too and runs faster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from toys import fake_timer, mlp_data, mlp_onnx, run_pass, toy_recipe

from compactor.quantization.candidates import SMOOTH_MUL_SUFFIX


def _mlp_with_table(path: Path) -> Path:
    """The outlier MLP plus an embedding table, gathered at each token's largest feature and
    added to its output: dynamic int8 of "all ops" quantizes the table's Gather, "compute
    ops" leaves it float, so the two candidates differ."""
    mlp_onnx(path, outlier=100.0)
    model = onnx.load(str(path))
    head = next(n for n in model.graph.node if n.name == "head")
    head.output[0] = "y0"
    r = np.random.default_rng(3)
    model.graph.initializer.extend([
        numpy_helper.from_array(r.standard_normal((64, 16)).astype(np.float32), "E")])
    model.graph.node.extend([
        helper.make_node("ArgMax", ["x"], ["idx"], name="pick", axis=2, keepdims=0),
        helper.make_node("Gather", ["E", "idx"], ["g"], name="table"),
        helper.make_node("Add", ["y0", "g"], ["y"], name="plus_table")])
    onnx.save(model, str(path))
    return path


def _graph(path: Path) -> tuple[bool, bool]:
    """(all ops: the Gather is quantized, smoothed)"""
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    all_ops = any(n.op_type == "DequantizeLinear" for n in nodes)
    return all_ops, any(n.name.endswith(SMOOTH_MUL_SUFFIX) for n in nodes)


def test_the_repair_is_tried_on_the_other_op_set_and_the_faster_one_wins(tmp_path,
                                                                         monkeypatch):
    from compactor.quantization import accuracy

    real_score = accuracy.AccuracyJudge.score

    def score(self, path, part="search"):
        s = real_score(self, path, part)
        all_ops, smoothed = _graph(path)
        if smoothed:
            return accuracy.Score(s.value, 0.0, True, s.samples)
        # plain candidates fail; "compute ops" fails by less: the repair starts there
        return accuracy.Score(s.value, 0.2 if all_ops else 0.1, False, s.samples)

    def latency(path: Path) -> float:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        if "DynamicQuantizeLinear" not in ops:
            return 5.0  # float
        all_ops, smoothed = _graph(path)
        # plain: tied (within timing noise); smoothed: "all ops" clearly faster
        return {(True, False): 1.0, (False, False): 1.01,
                (True, True): 1.1, (False, True): 1.5}[(all_ops, smoothed)]

    monkeypatch.setattr(accuracy.AccuracyJudge, "score", score)
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer(latency))
    model = _mlp_with_table(tmp_path / "mlp.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, model, mlp_data), model, mode="dynamic",
                   op_types="auto", max_accuracy_drop=0.01, repairs=["smoothquant"]).record
    assert rec["accuracy_budget"]["met"], rec["accuracy_budget"]
    assert rec["search"]["chosen"].endswith("all ops smoothed"), rec["search"]
    repairs = [r for r in rec["search"]["repairs"] if "label" in r]
    labels = {r["label"]: r for r in repairs}
    assert any("compute ops smoothed" in k for k in labels), repairs  # the repair's start
    slower = [r for r in repairs if "compute ops smoothed" in r["label"] and "note" in r]
    assert any(r["note"] == "repaired; slower than the chosen candidate" for r in slower), repairs
    assert rec["search"]["speedup_vs_input"] == round(5.0 / 1.1, 3), rec["search"]


def test_a_fallback_repair_is_not_carried_over(tmp_path, monkeypatch):
    """Float fallback nodes were ranked on one graph: no other candidate gets them."""
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    model = _mlp_with_table(tmp_path / "mlp.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, model, mlp_data), model, mode="dynamic",
                   op_types="auto", max_accuracy_drop=0.001, repairs=["fallback"]).record
    assert rec["accuracy_budget"]["met"], rec["accuracy_budget"]
    fallbacks = [r for r in rec["search"]["repairs"] if r["repair"].startswith("fallback")]
    assert fallbacks and all("smoothquant" not in r["repair"] for r in rec["search"]["repairs"])


def _timers(in_process, alone):
    """A fake timer whose ``in_processes`` (each model alone in a fresh process) disagrees
    with its in-process ranking."""
    from compactor.quantization.timing import Timing

    def make(ctx, cfg):
        def timer(models):
            return Timing({k: in_process(Path(p)) for k, p in models.items()}, 10, "fake",
                          1, 1, 0.0)

        def in_processes(models, folder):
            assert folder.is_dir()
            return Timing({k: alone(Path(p)) for k, p in models.items()}, 3, "fake", 1, 1,
                          0.0, in_processes=True)
        timer.in_processes = in_processes
        return timer
    return make


def _latency(table):
    def latency(path: Path) -> float:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        return 5.0 if "DynamicQuantizeLinear" not in ops else table[_graph(path)]
    return latency


def test_passing_candidates_are_ranked_alone_in_fresh_processes(tmp_path, monkeypatch):
    """In-process, smoothed "compute ops" looks faster; each alone in a fresh process (as
    served), smoothed "all ops" is: the fresh-process timing decides, and is recorded."""
    from compactor.quantization import accuracy

    real_score = accuracy.AccuracyJudge.score

    def score(self, path, part="search"):
        s = real_score(self, path, part)
        all_ops, smoothed = _graph(path)
        return accuracy.Score(s.value, 0.0 if smoothed else 0.1 + 0.1 * all_ops, smoothed,
                              s.samples)

    in_process = _latency({(True, False): 1.0, (False, False): 1.01,
                           (True, True): 1.3, (False, True): 1.1})
    alone = _latency({(True, False): 1.0, (False, False): 1.01,
                      (True, True): 1.05, (False, True): 1.2})
    monkeypatch.setattr(accuracy.AccuracyJudge, "score", score)
    monkeypatch.setattr("compactor.passes.quantize._timer", _timers(in_process, alone))
    model = _mlp_with_table(tmp_path / "mlp.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, model, mlp_data), model, mode="dynamic",
                   op_types="auto", max_accuracy_drop=0.01, repairs=["smoothquant"]).record
    assert rec["search"]["chosen"].endswith("all ops smoothed"), rec["search"]
    last = rec["search"]["timings"][-1]
    assert last["method"] == "each model alone in a fresh process", last
    assert rec["search"]["speedup_vs_input"] == round(5.0 / 1.05, 3), rec["search"]
    loser = [r for r in rec["search"]["repairs"] if r.get("label", "").endswith(
        "compute ops smoothed") and r.get("note")]
    assert loser and loser[-1]["note"].startswith("passes; slower than the chosen one"), loser


def test_without_a_rival_nothing_is_timed_in_processes(tmp_path, monkeypatch):
    """One passing candidate: no fresh-process timing (it costs seconds per model)."""
    def alone(path: Path) -> float:
        raise AssertionError("timed in processes with nothing to compare")

    in_process = _latency({(False, False): 1.0})
    monkeypatch.setattr("compactor.passes.quantize._timer", _timers(in_process, alone))
    model = mlp_onnx(tmp_path / "mlp.onnx")
    rec = run_pass(tmp_path, toy_recipe(tmp_path, model, mlp_data), model, mode="dynamic",
                   op_types="compute", max_accuracy_drop=0.5).record
    assert rec["accuracy_budget"]["met"], rec["accuracy_budget"]
    assert all(t.get("method") != "each model alone in a fresh process"
               for t in rec["search"]["timings"]), rec["search"]["timings"]
