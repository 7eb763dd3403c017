"""The bundled demo (compactor/examples/digits.yaml): what `compactor optimize` with no
argument runs. Its recipe must show the whole chain and hold on a busy machine; its chain
must run on the demo's own model and data (shrunk here, so the test takes seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from toys.recipes import fast_profile, run_cli

from compactor.cli.optimize_cmd import demo_recipe
from compactor.recipe import load_recipe

CHAIN = ["prune", "distill", "export", "quantize"]


def test_the_demo_runs_the_whole_chain():
    recipe = load_recipe(demo_recipe())
    assert [name for name, _ in recipe.pass_list] == CHAIN


def test_the_demo_budgets_hold_on_a_busy_host():
    """Absolute latency moves with whatever else the machine runs: a newcomer's first
    `compactor optimize` must not fail because a browser was open. Ratios, size and
    accuracy are the budgets the demo may state."""
    recipe = load_recipe(demo_recipe())
    for target in recipe.targets:
        assert target.budgets.max_latency_ms is None, target.profile
    first = recipe.targets[0].budgets
    # each says something true about the chain, with room (measured figures in RESULTS.md)
    assert first.min_speedup is not None and first.min_speedup >= 2
    assert first.max_size_mb is not None and first.max_size_mb <= 1
    assert first.max_accuracy_drop is not None
    assert first.max_accuracy_drop.value <= 0.005


def test_the_demo_model_is_big_enough_for_pruning_and_int8_to_win():
    """The pruned model must keep widths in whole SIMD blocks and the teacher must be wide
    enough that prune + int8 give the demo's speed-up with margin."""
    from compactor.examples.digits import build

    recipe = load_recipe(demo_recipe())
    width = recipe.model.args["width"]
    model = build(width)
    params = sum(p.numel() for p in model.parameters())
    assert params > 2_000_000, f"{params:,} parameters"
    (name, prune), *_ = recipe.pass_list
    assert name == "prune"
    assert prune.round_to == 16 and prune.target.macs <= 0.35


def _shrunk_demo(folder: Path) -> Path:
    """The demo recipe with a narrow CNN trained for one epoch, three distill steps, a short
    int8 search, measured on a fast profile: the same chain on the same data."""
    raw = yaml.safe_load(demo_recipe().read_text(encoding="utf-8"))
    raw["model"]["args"] = {"width": 8, "epochs": 1}
    passes = []
    for entry in raw["passes"]:
        ((name, cfg),) = entry.items()
        cfg = dict(cfg or {})
        if name == "distill":
            cfg.pop("epochs", None)
            cfg["steps"] = 3
        if name == "quantize":
            cfg["time_budget_s"] = 5
        passes.append({name: cfg})
    raw["passes"] = passes
    fast_profile(folder / "fast.yaml")
    raw["targets"] = [{"profile": "fast.yaml", "budgets": raw["targets"][0]["budgets"]}]
    raw["output"] = "out"
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def one_torch_thread():
    """Tiny models train faster on one thread, and far faster on a shared, busy host (two
    threads wait on each other at every op)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_demo_chain_runs_on_the_demo_model_and_data(tmp_path, monkeypatch,
                                                        one_torch_thread):
    monkeypatch.setenv("COMPACTOR_CACHE_DIR", str(tmp_path / "cache"))
    result = run_cli("optimize", _shrunk_demo(tmp_path))
    # a width-8 CNN trained one epoch may miss the demo's budgets; the chain must run
    assert result.exit_code in (0, 1), result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    stages = {s["name"]: s for s in manifest["stages"]}
    assert list(stages) == ["baseline", *CHAIN]
    prune = stages["prune"]["record"]
    assert prune["macs"]["ratio"] <= 0.35, prune["macs"]
    for unit in prune["units"]:
        if unit["before"] > 16:
            assert unit["after"] % 16 == 0, unit
    assert stages["distill"]["record"]["steps"] == 3
    # the teacher is cached where the demo says: a second run trains nothing
    assert list((tmp_path / "cache").glob("digits-cnn-*.pt"))
    for name in ("baseline", "prune", "distill", "export", "quantize"):
        assert name in result.stdout, result.stdout


@pytest.mark.slow
def test_the_real_demo_meets_its_expectations(tmp_path, monkeypatch):
    """The demo as shipped, end to end (minutes on 2 cores, training included): ≥ 8×
    smaller than the fp32 baseline, accuracy within 0.5 points, every budget holds.
    The ≥ 4× speed-up (AVX-512 VNNI; ≥ 2.5× AVX2) is benchmarks/demo.py's, measured paired."""
    monkeypatch.setenv("COMPACTOR_CACHE_DIR", str(tmp_path / "cache"))
    result = run_cli("optimize", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    stages = {s["name"]: s for s in manifest["stages"]}
    base, final = stages["baseline"], stages["quantize"]
    assert base["size_bytes"] / final["size_bytes"] >= 8
    drop_pt = (base["metric"] - final["metric"]) * 100
    assert drop_pt <= 0.5, f"accuracy drop {drop_pt:.2f} points"
