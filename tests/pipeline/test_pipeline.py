"""End to end: recipes on toy models through load → passes → measurements → artifact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import toys
from toys import (
    CNN_INPUT,
    TEXT_INPUTS,
    assert_clean_error,
    cnn_model,
    leftovers,
    ref,
    run_cli,
    snapshot,
    write_recipe,
)

from compactor.errors import CompactorError, RecipeError
from compactor.measure.host import ISA_FLAGS
from compactor.passes.quantize import QuantizePass
from compactor.pipeline import optimize
from compactor.recipe import load_recipe


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """The CNN from a factory file with weights → export → static int8, run once."""
    folder = tmp_path_factory.mktemp("cnn")
    torch.save(toys.cnn_state_dict(), folder / "weights.pt")
    path = write_recipe(
        folder,
        name="toy-cnn",
        model=cnn_model(outputs=["logits"]),
        data={"calibration": ref("cnn_calibration_batches"), "eval": ref("cnn_eval_batches")},
        metric="accuracy",
        passes=[{"export": {"opset": 18}},  # int8 of a toy this small times slower than
                {"quantize": {"mode": "static", "keep_float": "never"}}],  # float: ship it
        budgets={"max_size_mb": 1.0, "max_accuracy_drop": 0.2},
    )
    recipe = load_recipe(path)
    result = optimize(recipe)
    return folder, recipe, result


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> Path:
    return toys.export_cnn_onnx(tmp_path_factory.mktemp("onnx") / "cnn.onnx")


def onnx_recipe(folder: Path, cnn_onnx: Path, **fields) -> Path:
    """The teacher CNN as an ONNX file, static int8."""
    # keep_float: never: int8 of this toy CNN times slower than float, and is what is tested
    fields.setdefault("passes", [{"quantize": {"mode": "static", "keep_float": "never"}}])
    fields.setdefault(
        "data", {"calibration": ref("cnn_calibration_batches"), "eval": ref("cnn_eval_batches")}
    )
    return write_recipe(folder, model={"onnx": str(cnn_onnx)}, **fields)


# --------------------------------------------------------------------------- 1. the artifact


def test_artifact_has_its_files(cnn_run):
    folder, _, result = cnn_run
    art = folder / "out"
    assert result.artifact.resolve() == art.resolve()
    names = {p.name for p in art.iterdir()}
    assert {"manifest.json", "model.onnx", "recipe.lock.yaml", "report.md"} <= names, names
    assert not [n for n in names if (n.startswith(".") and n != ".compactor-artifact.json")
                or ".partial" in n], names  # the marker is the artifact's one hidden file
    assert leftovers(folder) == []
    onnx.checker.check_model(str(art / "model.onnx"))
    assert json.loads((art / "manifest.json").read_text()) == json.loads(
        json.dumps(result.manifest, default=str)
    )


def test_manifest_hashes_match_the_files(cnn_run):
    folder, _, result = cnn_run
    m = result.manifest
    assert m["schema_version"] == 1
    assert m["hashes"]["recipe"] == sha256(folder / "recipe.yaml")
    assert m["hashes"]["input_model"] == {
        toys.TOYS.name: sha256(toys.TOYS),
        "weights.pt": sha256(folder / "weights.pt"),
    }
    assert m["model"]["sha256"] == sha256(folder / "out" / "model.onnx")
    assert m["model"]["size_bytes"] == (folder / "out" / "model.onnx").stat().st_size


def test_manifest_measures_every_stage(cnn_run):
    _, _, result = cnn_run
    m = result.manifest
    assert [s["name"] for s in m["stages"]] == ["baseline", "export", "quantize"]
    want = {"name": "accuracy", "higher_is_better": True, "eval_samples": 96}
    assert {k: m["metric"].get(k) for k in want} == want, m["metric"]
    for s in m["stages"]:
        assert 0.0 <= s["metric"] <= 1.0, s
        assert s["size_bytes"] > 0 and s["params"] > 0, s
        assert s["macs"] and s["macs"] > 0, s
        lat = s["latency_ms"]["fast"]["1"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], lat
        assert lat["runs"] >= 5, lat
    # The labels are the teacher's predictions: 1.0 proves the weights file was applied.
    assert stage(m, "baseline")["metric"] == 1.0
    assert stage(m, "export")["metric"] == 1.0
    drop = stage(m, "quantize")["drop"]
    assert drop <= 0.1, f"int8 accuracy drop {drop:.3f} > 0.1"
    params = {s["params"] for s in m["stages"][:2]}
    assert params == {sum(p.numel() for p in toys.teacher_cnn().parameters())}, params
    assert m["model"]["outputs"][0]["name"] == "logits"
    assert m["model"]["inputs"] == [{**CNN_INPUT, "shape": ["batch", 1, 16, 16], "batch_axis": 0}]


def test_manifest_targets_and_host(cnn_run):
    _, _, result = cnn_run
    m = result.manifest
    (target,) = m["targets"]
    assert target["profile"] == "fast"
    assert target["passed"] is True and m["passed"] is True and result.passed
    assert {v["budget"]: v["status"] for v in target["verdicts"]} == {
        "max_size_mb": "pass", "max_accuracy_drop": "pass",
    }
    host = m["host"]
    assert host["onnxruntime"] == ort.__version__
    assert isinstance(host["isa"], list) and set(host["isa"]) <= set(ISA_FLAGS), host["isa"]
    if host["machine"] in ("x86_64", "AMD64"):
        assert "avx" in host["isa"], host["isa"]
    assert host["cores"] >= 1 and host["cpu"]


def test_recipe_lock_reloads(cnn_run):
    folder, recipe, _ = cnn_run
    lock = folder / "out" / "recipe.lock.yaml"
    locked = load_recipe(lock)
    assert locked.to_dict() == recipe.to_dict()
    # Every default is filled in, so the lock names settings the recipe left out.
    assert locked.to_dict()["passes"][1]["quantize"]["calibration_method"] == "minmax"


def test_report_md_lists_stages_and_verdicts(cnn_run):
    folder, _, _ = cnn_run
    md = (folder / "out" / "report.md").read_text()
    assert "toy-cnn" in md
    for word in ("baseline", "export", "quantize", "max_size_mb", "max_accuracy_drop", "pass"):
        assert word in md, word


def test_int8_model_is_smaller(cnn_run):
    _, _, result = cnn_run
    m = result.manifest
    ratio = stage(m, "quantize")["size_bytes"] / stage(m, "export")["size_bytes"]
    assert ratio < 0.4, f"int8 model is {ratio:.3f}x the float one"
    rec = stage(m, "quantize")["record"]
    assert rec["mode"] == "static" and rec["int8_weight_tensors"] >= 4, rec
    assert rec["calibration_samples"] == 64, rec


def test_export_record(cnn_run):
    _, _, result = cnn_run
    rec = stage(result.manifest, "export")["record"]
    assert rec["exporter"] in ("dynamo", "legacy"), rec
    assert rec["opset"] == 18, rec
    assert rec["max_abs_error"] < 1e-3, f"export max_abs_error {rec['max_abs_error']:.3g}"
    assert rec["checked_samples"] > 0, rec


def test_torch_stages_are_measured_as_the_recipe_exports(tmp_path):
    """The baseline (torch) is exported for measurement with the recipe's export settings,
    so its figures compare like for like with the exported stage's."""
    torch.save(toys.cnn_state_dict(), tmp_path / "weights.pt")
    path = write_recipe(tmp_path, model=cnn_model(), data={"eval": ref("cnn_eval_batches")},
                        metric="accuracy",
                        passes=[{"export": {"opset": 17, "exporter": "legacy"}}])
    result = optimize(load_recipe(path))
    base = stage(result.manifest, "baseline")
    assert base["eval_export"]["exporter"] == "legacy", base["eval_export"]
    assert base["eval_export"]["opset"] == 17, base["eval_export"]


# --------------------------------------------------------------------------- 2. other sources


def test_torchscript_model(tmp_path):
    traced = torch.jit.trace(toys.teacher_cnn(), torch.zeros(2, *toys.CNN_SHAPE))
    traced.save(str(tmp_path / "cnn.torchscript"))
    path = write_recipe(
        tmp_path,
        model={"torchscript": "cnn.torchscript", "inputs": [CNN_INPUT]},
        data={"eval": ref("cnn_eval_batches")},
    )
    result = optimize(load_recipe(path))
    # No passes given: the artifact is ONNX, so a default export is appended.
    assert [s.name for s in result.stages] == ["baseline", "export"]
    assert [s.metric for s in result.stages] == [1.0, 1.0]
    rec = result.stages[-1].record
    assert rec["max_abs_error"] < 1e-3, f"export max_abs_error {rec['max_abs_error']:.3g}"
    assert result.manifest["hashes"]["input_model"] == {
        "cnn.torchscript": sha256(tmp_path / "cnn.torchscript")
    }
    # torch.export cannot take a ScriptModule: the legacy exporter's fallback is recorded.
    if rec["exporter"] == "legacy":
        assert "dynamo" in rec["fallback_reason"], rec
    assert "\x1b" not in (tmp_path / "out" / "manifest.json").read_text()


def test_onnx_model_derives_inputs_from_the_graph(tmp_path, cnn_onnx):
    path = onnx_recipe(tmp_path, cnn_onnx)
    recipe = load_recipe(path)
    assert recipe.model.inputs == ()
    result = optimize(recipe)
    m = result.manifest
    assert [s["name"] for s in m["stages"]] == ["baseline", "quantize"]
    assert m["model"]["inputs"] == [
        {"name": "image", "shape": ["batch", 1, 16, 16], "dtype": "float32", "batch_axis": 0}
    ]
    assert stage(m, "baseline")["metric"] == 1.0
    assert m["hashes"]["input_model"] == {"cnn.onnx": sha256(cnn_onnx)}
    ratio = stage(m, "quantize")["size_bytes"] / stage(m, "baseline")["size_bytes"]
    assert ratio < 0.4, f"int8 model is {ratio:.3f}x the float one"


def test_onnx_model_refuses_torch_passes(tmp_path, cnn_onnx):
    path = onnx_recipe(tmp_path, cnn_onnx, passes=[{"export": {}}])
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "passes[0]" in str(e.value) and "export" in str(e.value)


def test_npz_data(tmp_path, cnn_onnx):
    toys.write_cnn_npz(tmp_path / "eval.npz", n=40, seed=1)
    toys.write_cnn_npz(tmp_path / "calib.npz", n=24, seed=2, labels=False)
    path = onnx_recipe(
        tmp_path, cnn_onnx,
        data={"calibration": "calib.npz", "eval": "eval.npz", "batch_size": 16},
    )
    result = optimize(load_recipe(path))
    m = result.manifest
    assert m["metric"]["eval_samples"] == 40
    assert stage(m, "baseline")["metric"] == 1.0
    assert stage(m, "quantize")["record"]["calibration_samples"] == 24


# --------------------------------------------------------------------------- 3. two inputs


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    path = write_recipe(
        folder,
        name="toy-text",
        model={"factory": ref("build_text"), "inputs": TEXT_INPUTS},
        data={"eval": ref("text_batches")},
        metric="fidelity",
        passes=[{"export": {}}, {"quantize": {"mode": "dynamic", "keep_float": "never"}}],
    )
    return folder, optimize(load_recipe(path))


def test_text_model_fidelity(text_run):
    _, result = text_run
    base, export, quant = result.stages
    assert base.metric == pytest.approx(1.0, abs=1e-9)
    assert export.metric >= 0.9999, f"export fidelity {export.metric:.6f}"
    assert quant.metric >= 0.95, f"dynamic int8 fidelity {quant.metric:.4f}"
    assert quant.drop == pytest.approx(1.0 - quant.metric, abs=1e-9)
    assert quant.record["mode"] == "dynamic"
    assert quant.size_bytes < export.size_bytes, (quant.size_bytes, export.size_bytes)
    assert result.manifest["metric"]["eval_samples"] == 40
    assert result.manifest["metric"]["higher_is_better"] is True


def test_text_model_keeps_batch_and_seq_dynamic(text_run):
    folder, _ = text_run
    model_path = folder / "out" / "model.onnx"
    graph = onnx.load(str(model_path)).graph
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.HasField("dim_param") for d in dims] == [True, True], (inp.name, dims)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in sess.get_inputs()) == ["attention_mask", "input_ids"]
    model = toys.build_text()
    for batch, seq in ((3, 7), (1, 33), (5, 2)):
        feeds = toys.text_arrays(batch, seq, seed=batch * 100 + seq)
        (got,) = sess.run(None, feeds)
        with torch.inference_mode():
            want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        assert got.shape == (batch, toys.TEXT_CLASSES), got.shape
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cos.min() >= 0.95, f"batch {batch} seq {seq}: cosine to torch {cos.min():.4f}"


# --------------------------------------------------------------------------- 5. budgets


def test_failing_budget_exits_1_and_still_writes_the_artifact(tmp_path, cnn_onnx):
    # just above what the early check thinks int8 could reach: judged after the passes
    limit = round(toys.size_floor_mb(cnn_onnx, [{"quantize": {"mode": "static"}}]) * 1.01, 5)
    path = onnx_recipe(
        tmp_path, cnn_onnx,
        budgets={"max_size_mb": limit, "max_accuracy_drop": "50%", "min_speedup": 0.001},
    )
    result = run_cli("optimize", path, "--json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    printed = json.loads(result.stdout)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert printed["created"] == manifest["created"]
    assert manifest["passed"] is False
    (target,) = manifest["targets"]
    assert target["passed"] is False
    verdicts = {v["budget"]: v for v in target["verdicts"]}
    size = verdicts["max_size_mb"]
    assert size["status"] == "fail"
    assert size["measured"] == pytest.approx(stage(manifest, "quantize")["size_bytes"] / 1e6)
    # A relative drop is a share of the baseline's value.
    drop = verdicts["max_accuracy_drop"]
    base_acc = stage(manifest, "baseline")["metric"]
    assert drop["limit"] == pytest.approx(0.5 * base_acc)
    assert drop["measured"] == pytest.approx(stage(manifest, "quantize")["drop"])
    assert drop["status"] == "pass"
    # the speed-up is timed paired, baseline against final in one process (never the two
    # stages' own p50s, timed minutes apart), with its interval
    speed = verdicts["min_speedup"]
    assert speed["low"] <= speed["measured"] <= speed["high"], speed
    assert "paired" in speed["detail"]
    assert speed["status"] == "pass"
    md = (tmp_path / "out" / "report.md").read_text()
    fail_rows = [ln for ln in md.splitlines() if "max_size_mb" in ln]
    assert fail_rows and all("fail" in ln.lower() for ln in fail_rows), fail_rows
    assert leftovers(tmp_path) == []


def test_min_speedup_fails_when_not_met(tmp_path, cnn_onnx):
    path = onnx_recipe(tmp_path, cnn_onnx, budgets={"min_speedup": 1000})
    result = optimize(load_recipe(path))
    assert result.passed is False
    (v,) = result.targets[0].verdicts
    assert v.budget == "min_speedup" and v.status == "fail", v
    assert 0 < v.measured < 1000, v


# --------------------------------------------------------------------------- 6. bad input


def _missing_weights(folder: Path) -> dict:
    return {"model": cnn_model(weights="nope.pt")}


def _factory_import_fails(folder: Path) -> dict:
    (folder / "broken.py").write_text("raise ImportError('no module named cuda_ext')\n")
    return {"model": {"factory": "broken.py:build", "inputs": [CNN_INPUT]}}


def _factory_raises(folder: Path) -> dict:
    return {"model": {"factory": ref("build_raises"), "inputs": [CNN_INPUT]}}


def _factory_not_module(folder: Path) -> dict:
    return {"model": {"factory": ref("build_not_module"), "inputs": [CNN_INPUT]}}


def _weights_do_not_fit(folder: Path) -> dict:
    torch.save(toys.build_cnn(classes=3).state_dict(), folder / "weights.pt")
    return {"model": cnn_model()}


def _nan_data(folder: Path) -> dict:
    return {"data": {"eval": ref("cnn_nan_batches")}}


def _data_shape_mismatch(folder: Path) -> dict:
    return {"data": {"eval": ref("cnn_wrong_shape_batches")}}


def _model_fails_on_declared_shape(folder: Path) -> dict:
    inp = {**CNN_INPUT, "shape": ["batch", 3, 16, 16]}
    return {"model": cnn_model(inputs=[inp]), "data": {"eval": ref("cnn_rgb_batches")}}


def _model_asserts_on_the_declared_shape(folder: Path) -> dict:
    return {"model": {"factory": ref("build_picky_cnn"), "inputs": [CNN_INPUT]}}


def _npz_missing_input(folder: Path) -> dict:
    toys.write_cnn_npz(folder / "eval.npz", n=8, input_name="pixels")
    return {"data": {"eval": "eval.npz"}}


BAD_INPUT = {
    "missing weights file": (_missing_weights, ["file not found", "nope.pt"]),
    "factory file fails to import": (_factory_import_fails, ["broken.py", "cuda_ext"]),
    "factory raises": (_factory_raises, ["build_raises", "checkpoint server unreachable"]),
    "factory returns a non-module": (_factory_not_module, ["dict", "torch.nn.module"]),
    "weights do not fit": (_weights_do_not_fit, ["does not fit the model", "args"]),
    "data has NaN": (_nan_data, ["nan", "batch 0"]),
    "data shape differs from the declared one": (_data_shape_mismatch, ["[8, 1, 12, 12]"]),
    "model fails on the declared shape": (_model_fails_on_declared_shape, ["declared shape"]),
    "model asserts on the declared shape": (
        _model_asserts_on_the_declared_shape, ["declared shape", "AssertionError"]
    ),
    "npz lacks an input array": (_npz_missing_input, ["eval.npz", "image", "pixels"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_3_with_a_hint(tmp_path, case):
    make, fragments = BAD_INPUT[case]
    torch.save(toys.cnn_state_dict(), tmp_path / "weights.pt")
    fields = {
        "model": cnn_model(),
        "data": {"eval": ref("cnn_eval_batches")},
        "passes": [{"export": {}}],
        **make(tmp_path),
    }
    result = run_cli("optimize", write_recipe(tmp_path, **fields))
    assert_clean_error(result, 3, *fragments)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 7-8. atomicity


@pytest.fixture
def earlier_artifact(tmp_path, cnn_run) -> dict[str, bytes]:
    """A complete artifact already at tmp_path/out; returns its files' bytes."""
    shutil.copytree(cnn_run[0] / "out", tmp_path / "out")
    return snapshot(tmp_path / "out")


def _quantize_raises(monkeypatch):
    def boom(self, stage, ctx):
        raise RuntimeError("simulated crash inside quantize")

    monkeypatch.setattr(QuantizePass, "run", boom)


def _report_raises(monkeypatch):
    # Fails inside write_artifact, after the model and lock file are in the staging folder.
    def boom(manifest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("compactor.report.markdown.render_markdown", boom)


@pytest.mark.parametrize("fail", [_quantize_raises, _report_raises], ids=["pass", "writing"])
def test_failed_run_leaves_the_earlier_artifact_intact(tmp_path, cnn_onnx, earlier_artifact,
                                                        monkeypatch, fail):
    path = onnx_recipe(tmp_path, cnn_onnx, name="second")
    fail(monkeypatch)
    with pytest.raises(CompactorError) as e:
        optimize(load_recipe(path))
    assert e.value.exit_code == 4, e.value
    assert snapshot(tmp_path / "out") == earlier_artifact
    assert leftovers(tmp_path) == []


def test_successful_rerun_replaces_the_artifact(tmp_path, cnn_onnx, earlier_artifact):
    old = json.loads(earlier_artifact["manifest.json"])
    result = optimize(load_recipe(onnx_recipe(tmp_path, cnn_onnx, name="second")))
    new = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (old["name"], new["name"]) == ("toy-cnn", "second")
    assert new == json.loads(json.dumps(result.manifest, default=str))
    assert new["model"]["sha256"] == sha256(tmp_path / "out" / "model.onnx")
    assert leftovers(tmp_path) == []


def test_ctrl_c_exits_130_and_keeps_the_earlier_artifact(tmp_path, cnn_onnx, earlier_artifact,
                                                         monkeypatch):
    def interrupted(self, stage, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(QuantizePass, "run", interrupted)
    result = run_cli("optimize", onnx_recipe(tmp_path, cnn_onnx, name="second"))
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert "interrupted" in result.stderr
    assert snapshot(tmp_path / "out") == earlier_artifact
    assert leftovers(tmp_path) == []
