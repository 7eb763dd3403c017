"""`compactor sensitivity`: each layer pruned alone, measured in ONNX Runtime, written as a
table, a chart and JSON, with per-layer amounts for a MACs target to paste into a recipe."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from toys import CNN_INPUT, assert_clean_error, export_cnn_onnx, ref, run_cli, write_recipe

CNN_DATA = {"train": ref("cnn_eval_batches"), "eval": ref("cnn_eval_batches")}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sensitivity_writes_table_chart_and_a_pasteable_suggestion(tmp_path):
    path = write_recipe(tmp_path, model={"factory": ref("build_prune_cnn"),
                                         "inputs": [CNN_INPUT]},
                        data=CNN_DATA, metric="fidelity",
                        passes=[{"prune": {"target": {"macs": 0.6}, "round_to": 4}}])
    r = run_cli("sensitivity", path, "--amounts", "0.25,0.5", "-o", tmp_path / "sens")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "stem.0" in out and "down.0" in out and "block.0" in out
    assert "suggestion for MACs ≤ 0.6" in out  # the recipe's target is the default

    files = {p.name for p in (tmp_path / "sens").iterdir()}
    assert files == {"sensitivity.json", "sensitivity.md", "sensitivity.svg"}
    data = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["stem.0", "down.0", "block.0"]
    for layer in data["layers"]:
        assert [p["amount"] for p in layer["points"]] == [0.25, 0.5]
        assert all(0 < p["metric"] <= 1.0 + 1e-6 for p in layer["points"])
        assert all(0 < p["macs_ratio"] < 1 for p in layer["points"])
    assert data["kept_for_outputs"] == ["fc"]
    svg = (tmp_path / "sens" / "sensitivity.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3
    md = (tmp_path / "sens" / "sensitivity.md").read_text()
    assert "| `block.0` | channels | 32 |" in md

    s = data["suggestion"]
    assert s["reachable"] and s["macs_ratio"] <= 0.62 and s["layers"]
    assert s["settings"]["round_to"] == 4
    # the printed suggestion is a passes: entry that a recipe accepts as it is
    snippet = out[out.index("passes:"):out.index("wrote ")]
    passes = yaml.safe_load(snippet)["passes"]
    assert passes[0]["prune"]["layers"] == s["layers"]
    pasted = write_recipe(tmp_path, filename="pasted.yaml",
                          model={"factory": ref("build_prune_cnn"), "inputs": [CNN_INPUT]},
                          data=CNN_DATA, passes=passes)
    assert run_cli("recipe", "validate", pasted).exit_code == 0


def test_sensitivity_json_and_unreachable_target(tmp_path):
    path = write_recipe(tmp_path, model={"factory": ref("build_prune_cnn"),
                                         "inputs": [CNN_INPUT]},
                        data=CNN_DATA, metric="fidelity")
    r = run_cli("sensitivity", path, "--amounts", "0.25", "--target-macs", "0.05",
                "--ignore", "stem*", "--json", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [layer["name"] for layer in data["layers"]] == ["down.0", "block.0"]
    assert data["suggestion"]["reachable"] is False
    assert set(data["files"]) == {"json", "markdown", "chart"}


@pytest.mark.parametrize("args, fragment", [
    (["--amounts", "0.5,1.5"], "each amount must be in (0, 1)"),
    (["--amounts", "half"], "expected fractions"),
    (["--target-macs", "2"], "target-macs"),
])
def test_bad_sensitivity_options_exit_2(tmp_path, args, fragment):
    path = write_recipe(tmp_path, model={"factory": ref("build_prune_cnn"),
                                         "inputs": [CNN_INPUT]}, data=CNN_DATA)
    r = run_cli("sensitivity", path, *args)
    assert r.exit_code == 2, r.output
    assert fragment in r.output


def test_sensitivity_of_an_onnx_model_is_a_recipe_error(tmp_path):
    export_cnn_onnx(tmp_path / "m.onnx")
    path = write_recipe(tmp_path, model={"onnx": "m.onnx"}, data=CNN_DATA)
    assert_clean_error(run_cli("sensitivity", path), 2, "torch model", "model.factory")
