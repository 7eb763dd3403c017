"""The evaluator on every output: each stage's per-output figures, the constant-predictor
check on the shipped stage only, and outputs an exporter renamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from toys import run_context, write_recipe
from toys.heads import heads_data, three_heads_onnx
from toys.progress import RecordingProgress

from compactor.model import onnx_input_specs
from compactor.pipeline.evaluate import Evaluator
from compactor.pipeline.judge import pass_verdicts
from compactor.recipe import load_recipe
from compactor.stage import Stage


def _evaluator(tmp_path: Path, model: Path, progress=None) -> Evaluator:
    np.savez(tmp_path / "eval.npz", **heads_data(64, seed=1))
    recipe = load_recipe(write_recipe(tmp_path, model={"onnx": str(model)},
                                      data={"eval": "eval.npz", "batch_size": 16},
                                      metric="fidelity"))
    work = tmp_path / "work"
    work.mkdir()
    ctx = run_context(recipe, work, inputs=onnx_input_specs(model), progress=progress)
    return Evaluator(ctx, ctx.metric, [])


def _stage(path: Path, *lineage: str) -> Stage:
    return Stage(lineage[-1], "onnx", onnx_path=path, lineage=lineage)


def test_a_broken_head_fails_only_when_it_ships(tmp_path):
    base = three_heads_onnx(tmp_path / "base.onnx")
    progress = RecordingProgress()
    ev = _evaluator(tmp_path, base, progress)
    b = ev.evaluate(_stage(base, "baseline"))
    assert [o.name for o in b.outputs] == ["face", "box", "landmarks"]
    assert all(o.mse is None for o in b.outputs) and not b.checks
    broken = ev.evaluate(_stage(three_heads_onnx(tmp_path / "broken.onnx", broken="box"),
                                "baseline", "prune"))
    assert [c.status for c in broken.checks] == ["pass", "fail", "pass"], broken.checks
    assert any("WORSE THAN A CONSTANT" in w and "'box'" in w for w in broken.warnings)
    assert any("WORSE THAN A CONSTANT" in n for n in progress.notes), progress.notes
    repaired = ev.evaluate(_stage(base, "baseline", "prune", "distill"))
    assert all(c.status == "pass" for c in repaired.checks)
    # an intermediate broken stage repaired by the next pass: nothing fails the run
    assert pass_verdicts([b, broken, repaired]) == []
    (v,) = pass_verdicts([b, repaired, broken])
    assert v.budget == "outputs.box.constant_predictor" and v.status == "fail"
    assert v.low > v.limit, "fail only when the interval lies above the constant's error"


def test_outputs_renamed_by_a_tool_are_the_baseline_outputs(tmp_path):
    base = three_heads_onnx(tmp_path / "base.onnx")
    renamed = onnx.load(str(base))
    for node in renamed.graph.node:
        node.output[:] = [f"{o}_q" if o in ("face", "box", "landmarks") else o
                          for o in node.output]
    for out in renamed.graph.output:
        out.name = f"{out.name}_q"
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    ev = _evaluator(tmp_path, base)
    ev.evaluate(_stage(base, "baseline"))
    r = ev.evaluate(_stage(tmp_path / "renamed.onnx", "baseline", "quantize"))
    assert [o.name for o in r.outputs] == ["face", "box", "landmarks"]
    assert r.metric > 0.999 and all(c.status == "pass" for c in r.checks)


def test_a_broken_head_before_the_last_pass_says_a_later_pass_may_repair_it(tmp_path):
    base = three_heads_onnx(tmp_path / "base.onnx")
    ev = _evaluator(tmp_path, base)
    ev.passes = 2
    ev.evaluate(_stage(base, "baseline"))
    broken = three_heads_onnx(tmp_path / "broken.onnx", broken="box")
    early = ev.evaluate(_stage(broken, "baseline", "prune"))
    (w,) = [w for w in early.warnings if "WORSE THAN A CONSTANT" in w]
    assert "a later pass (e.g. distill) may repair it" in w
    shipped = ev.evaluate(_stage(broken, "baseline", "prune", "quantize"))
    (w,) = [w for w in shipped.warnings if "WORSE THAN A CONSTANT" in w]
    assert "later pass" not in w
