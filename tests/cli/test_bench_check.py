"""`compactor bench` and `compactor check`: results, CI outputs, bad input, and both working
where torch cannot be imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import toys
from toys import assert_clean_error, fast_profile, run_cli, write_cnn_npz

from compactor.pipeline import optimize
from compactor.recipe import load_recipe

GPU_PROFILE = """\
name: gpu
class: cloud
execution_providers: [CUDAExecutionProvider]
estimates: {power_w: 70, peak_gflops_fp32: 8000, peak_gops_int8: 100000,
            memory_bandwidth_gbs: 300}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A small int8 artifact with a measured target and one this host cannot measure."""
    folder = tmp_path_factory.mktemp("art")
    cnn = toys.export_cnn_onnx(folder / "cnn.onnx")
    write_cnn_npz(folder / "eval.npz", n=64)
    write_cnn_npz(folder / "calib.npz", n=32, seed=2, labels=False)
    (folder / "gpu.yaml").write_text(GPU_PROFILE, encoding="utf-8")
    recipe = toys.write_recipe(
        folder, model={"onnx": str(cnn)},
        data={"eval": "eval.npz", "calibration": "calib.npz", "batch_size": 32},
        passes=[{"quantize": {"mode": "static"}}],
        targets=[
            {"profile": "fast.yaml",
             "budgets": {"max_size_mb": 1, "max_latency_ms": {"p90": 1000},
                         "max_memory_mb": 1000, "max_accuracy_drop": 0.5,
                         "min_speedup": 0.01}},
            {"profile": "gpu.yaml", "budgets": {"max_latency_ms": {"p50": 10}}},
        ],
    )
    result = optimize(load_recipe(recipe))
    assert result.passed, result.manifest["targets"]
    return result.artifact


def check(*args, env=None):
    from click.testing import CliRunner

    from compactor.cli import cli

    return CliRunner().invoke(cli, ["check", *map(str, args)], env=env)


# --------------------------------------------------------------------------- check


def test_check_from_the_manifest(artifact):
    r = check(artifact, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["passed"] and [v["status"] for v in data["integrity"]] == ["pass"]
    fast, gpu = data["targets"]
    assert fast["source"] == "manifest"
    assert {v["budget"]: v["status"] for v in fast["verdicts"]} == {
        "max_size_mb": "pass", "max_latency_ms.p90": "pass", "max_memory_mb": "pass",
        "max_accuracy_drop": "pass", "min_speedup": "pass"}
    (lat,) = gpu["verdicts"]
    assert lat["status"] == "not measured" and lat["estimate"] > 0
    assert any("not measured" in n for n in gpu["notes"])
    text = check(artifact)
    assert text.exit_code == 0 and "all checks hold" in text.stdout


def test_check_with_a_budget_override_fails_and_reports_it(artifact, tmp_path):
    junit = tmp_path / "reports" / "check.xml"
    r = check(artifact, "--target", "fast", "--budget", "max_latency_ms.p50=0.000001",
              "--junit", junit)
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.stdout and "check failed" in r.stdout
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1"
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["max_latency_ms.p50"]
    assert int(root.get("tests")) == len(list(root.iter("testcase"))) == 7


def test_strict_fails_on_what_could_not_be_measured(artifact, tmp_path):
    assert check(artifact, "--target", "gpu").exit_code == 0
    junit = tmp_path / "j.xml"
    r = check(artifact, "--target", "gpu", "--strict", "--junit", junit)
    assert r.exit_code == 1, r.output
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_github_actions_annotations_and_step_summary(artifact, tmp_path):
    summary = tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    r = check(artifact, "--budget", "max_size_mb=0.001", env=env)
    assert r.exit_code == 1
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("::error ")]
    assert len(errors) == 2  # --budget applies to every checked target
    assert all("max_size_mb" in e and "title=compactor toy%3A" in e for e in errors)
    assert any(ln.startswith("::warning ") and "gpu" in ln for ln in r.stdout.splitlines())
    assert "❌" in summary.read_text()
    as_json = check(artifact, "--budget", "max_size_mb=0.001", "--json",
                    env={"GITHUB_ACTIONS": "true"})
    assert json.loads(as_json.stdout)["passed"] is False  # annotations go to stderr instead
    assert as_json.stderr.count("::error ") == 2
    quiet = check(artifact, env={"GITHUB_ACTIONS": ""})
    assert "::error" not in quiet.stdout and "::warning" not in quiet.stdout


def test_check_remeasures_on_this_host(artifact):
    r = check(artifact, "--remeasure", "--target", "fast", "--json")
    assert r.exit_code == 0, r.output
    (t,) = json.loads(r.stdout)["targets"]
    assert t["source"] == "re-measured on this host"
    assert {v["budget"]: v["status"] for v in t["verdicts"]}["max_memory_mb"] == "pass"
    # a profile the artifact was not built for can be measured too, with --budget limits
    r = check(artifact, "--remeasure", "--target", "host-cpu", "--budget", "max_size_mb=1",
              "--json")
    assert r.exit_code == 0, r.output
    (t,) = json.loads(r.stdout)["targets"]
    assert t["profile"] == "host-cpu" and t["verdicts"][0]["status"] == "pass"


def test_check_against_an_older_artifact(artifact, tmp_path):
    assert check(artifact, "--against", artifact).exit_code == 0
    old = json.loads((artifact / "manifest.json").read_text())
    old["stages"][-1]["size_bytes"] = int(old["stages"][-1]["size_bytes"] / 1.5)
    (tmp_path / "old.json").write_text(json.dumps(old))
    r = check(artifact, "--against", tmp_path / "old.json", "--json")
    assert r.exit_code == 1, r.output
    regs = {v["budget"]: v for v in json.loads(r.stdout)["regressions"]}
    assert regs["regression.size"]["status"] == "fail"
    assert regs["regression.size"]["measured"] == pytest.approx(50.0, abs=0.1)
    assert regs["regression.latency_p50.fast"]["status"] == "pass"
    loose = check(artifact, "--against", tmp_path / "old.json", "--max-regression", "60%")
    assert loose.exit_code == 0, loose.output


# --------------------------------------------------------------------------- bad input


def test_check_a_tampered_artifact(artifact, tmp_path):
    copy = shutil.copytree(artifact, tmp_path / "copy")
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    r = check(copy, "--junit", tmp_path / "j.xml")
    assert_clean_error(r, 1, "was modified after compactor wrote it", "model.onnx",
                       "does not match the manifest")
    assert ET.parse(tmp_path / "j.xml").getroot().get("failures") == "1"
    (copy / "model.onnx").unlink()
    assert_clean_error(check(copy), 1, "model.onnx is missing")


def test_check_a_folder_that_is_not_an_artifact(tmp_path):
    assert_clean_error(check(tmp_path), 2, "is not a compactor artifact", "manifest.json")
    assert_clean_error(check(tmp_path / "nowhere"), 2, "does not exist")
    (tmp_path / "manifest.json").write_text("{not json")
    r = check(tmp_path)
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_check_against_another_schema_version(artifact, tmp_path):
    old = json.loads((artifact / "manifest.json").read_text())
    old["schema_version"] = 99
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert_clean_error(check(artifact, "--against", tmp_path / "old.json"), 2,
                       "schema version 99", "reads version 1")
    assert_clean_error(check(artifact, "--against", tmp_path / "none.json"), 2,
                       "no manifest there")


def test_check_bad_options(artifact):
    assert_clean_error(check(artifact, "--budget", "max_sise_mb=1"), 2,
                       "unknown budget 'max_sise_mb'", "did you mean 'max_size_mb'?")
    assert_clean_error(check(artifact, "--target", "fsat"), 2, "no measurements for it",
                       "did you mean 'fast'?", "--remeasure")
    assert_clean_error(check(artifact, "--max-regression", "lots"), 2, "not a percentage")


# --------------------------------------------------------------------------- bench


@pytest.fixture(scope="module")
def cnn(artifact) -> Path:
    return artifact.parent / "cnn.onnx"


def test_bench_json(cnn, tmp_path):
    prof = fast_profile(tmp_path / "fast.yaml")
    r = run_cli("bench", cnn, "--profile", prof, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["measured"] and data["model"]["macs"] > 0 and data["model"]["dims"] == {
        "batch": 1}
    assert data["latency_ms"]["1"]["p50"] > 0 and data["memory"]["peak_rss_mb"] > 0
    assert "verdicts" not in data


def test_bench_text_with_budgets_and_an_unmeasurable_profile(cnn, tmp_path):
    fast = fast_profile(tmp_path / "fast.yaml")
    (tmp_path / "gpu.yaml").write_text(GPU_PROFILE, encoding="utf-8")
    r = run_cli("bench", cnn, "-p", fast, "-p", tmp_path / "gpu.yaml", "--budget",
                "max_latency_ms.p90=1000")
    assert r.exit_code == 0, r.output
    assert "latency (ms) and throughput" in r.stdout
    assert "not measured" in r.stdout and "estimate" in r.stdout
    r = run_cli("bench", cnn, "-p", fast, "--budget", "max_latency_ms.p50=0.000001")
    assert r.exit_code == 1 and "FAIL" in r.stdout


def test_bench_bad_input(cnn, tmp_path):
    assert_clean_error(run_cli("bench", tmp_path / "none.onnx"), 3, "model file not found")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_clean_error(run_cli("bench", tmp_path / "junk.onnx"), 3, "cannot load")
    assert_clean_error(run_cli("bench", cnn, "-p", "cloud-gpus"), 2,
                       "unknown profile 'cloud-gpus'", "did you mean 'cloud-gpu'?")
    assert_clean_error(run_cli("bench", cnn, "--budget", "max_accuracy_drop=1%"), 2,
                       "no eval data")
    assert_clean_error(run_cli("bench", cnn, "--dim", "seq"), 2, "NAME=N")


# --------------------------------------------------------------------------- no torch


def test_bench_and_check_work_where_torch_cannot_be_imported(artifact, cnn, tmp_path):
    """A `torch` package that refuses to import shadows the real one, in this process and
    in the measuring worker it starts."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {"PYTHONPATH": str(blocker.parent), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    fast = fast_profile(tmp_path / "fast.yaml")
    code = "import sys; from compactor.cli import cli; sys.exit(cli.main(sys.argv[1:]))"
    for args in (["bench", str(cnn), "-p", str(fast), "--json"],
                 ["check", str(artifact), "--remeasure", "--target", "fast"],
                 ["check", str(artifact), "--json"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])


def test_check_keeps_the_verdicts_the_run_judged_on_the_model(artifact, tmp_path):
    """A head worse than a constant predictor (or a pass's own missed budget) failed the
    run; a re-check of its artifact must fail too, not re-judge host budgets alone."""
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["stages"][-1]["checks"] = [
        {"budget": "outputs.box.constant_predictor", "limit": 1.0, "measured": 2.48,
         "unit": "x", "status": "fail", "detail": "worse than predicting the mean"}]
    path.write_text(json.dumps(manifest), encoding="utf-8")
    r = check(copy, "--json")
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    assert [(v["budget"], v["status"]) for v in data["model"]] == [
        ("outputs.box.constant_predictor", "fail")]
    assert "outputs.box.constant_predictor" in check(copy).stdout
    assert not json.loads(check(artifact, "--json").stdout)["model"]
