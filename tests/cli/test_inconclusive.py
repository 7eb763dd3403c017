"""The --inconclusive policy and its exit codes on check and optimize, the same verdict in
--json, JUnit and GitHub annotations, and the bad inputs of issue 14 (a bad policy, a limit
of 0 or less, a time cap too short for one measurement)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import toys
from toys import assert_clean_error, run_cli, write_cnn_npz

from compactor.cli.options import DEFAULT_SETTLE_S, gate_exit
from compactor.errors import EXIT_BUDGET, EXIT_INCONCLUSIVE, EXIT_OK, EXIT_USAGE


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """An artifact of the toy CNN as it is (no passes), measured on the fast profile."""
    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    folder = tmp_path_factory.mktemp("inc")
    cnn = toys.export_cnn_onnx(folder / "cnn.onnx")
    write_cnn_npz(folder / "eval.npz", n=32)
    recipe = toys.write_recipe(folder, model={"onnx": str(cnn)},
                               data={"eval": "eval.npz", "batch_size": 32})
    return optimize(load_recipe(recipe)).artifact


def straddling_limit(artifact: Path) -> float:
    """A p50 limit inside the interval the manifest recorded: undecided from it."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    est, lo, hi = manifest["stages"][-1]["latency_ms"]["fast"]["1"]["quiet"]["p50"]
    assert lo < hi, (lo, hi)
    return (lo + hi) / 2


def test_the_default_policy_exits_5_on_an_undecided_gate(artifact, tmp_path):
    limit = straddling_limit(artifact)
    junit = tmp_path / "j.xml"
    r = run_cli("check", artifact, "--budget", f"max_latency_ms.p50={limit}", "--junit", junit)
    assert r.exit_code == EXIT_INCONCLUSIVE, r.output
    assert "checks inconclusive" in r.stdout
    root = ET.parse(junit).getroot()
    skipped = [c.get("name") for c in root.iter("testcase") if c.find("skipped") is not None]
    assert skipped == ["max_latency_ms.p50"] and root.get("failures") == "0"
    message = root.find(".//skipped").get("message")
    assert "straddles" in message and "--remeasure times it again" in message


def test_json_says_inconclusive_and_github_gets_a_warning(artifact, tmp_path):
    limit = straddling_limit(artifact)
    summary = tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    from click.testing import CliRunner

    from compactor.cli import cli

    r = CliRunner().invoke(cli, ["check", str(artifact), "--json", "--budget",
                                 f"max_latency_ms.p50={limit}"], env=env)
    assert r.exit_code == EXIT_INCONCLUSIVE, r.output
    data = json.loads(r.stdout)
    (v,) = [v for v in data["targets"][0]["verdicts"] if v["budget"] == "max_latency_ms.p50"]
    assert v["status"] == "inconclusive" and v["low"] < limit < v["high"]
    assert data["passed"] is True and data["inconclusive"] == 1
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("::warning ")]
    assert len(warnings) == 1 and "max_latency_ms.p50" in warnings[0]
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("::error ")]
    assert "❔ inconclusive" in summary.read_text()


@pytest.mark.parametrize(("policy", "code"), [("warn", EXIT_OK), ("pass", EXIT_OK),
                                              ("fail", EXIT_INCONCLUSIVE)])
def test_the_policy_decides_the_exit_code(artifact, policy, code):
    limit = straddling_limit(artifact)
    r = run_cli("check", artifact, "--budget", f"max_latency_ms.p50={limit}",
                "--inconclusive", policy)
    assert r.exit_code == code, r.output
    if policy == "warn":
        assert "warning" in r.stdout


def test_a_failure_still_exits_1_whatever_the_policy(artifact):
    r = run_cli("check", artifact, "--budget", "max_size_mb=0.000001", "--inconclusive",
                "pass")
    assert r.exit_code == EXIT_BUDGET, r.output


def test_gate_exit_codes():
    assert gate_exit(True, 0, "fail") == EXIT_OK
    assert gate_exit(True, 2, "fail") == EXIT_INCONCLUSIVE == 5
    assert gate_exit(True, 2, "warn") == gate_exit(True, 2, "pass") == EXIT_OK
    assert gate_exit(False, 2, "pass") == EXIT_BUDGET


def test_the_cli_default_cap_is_the_librarys():
    from compactor.budgets import DEFAULT_SETTLE_S as LIB

    assert DEFAULT_SETTLE_S == LIB


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["check", "optimize"])
def test_a_bad_policy_is_a_usage_error(artifact, command):
    target = artifact if command == "check" else artifact / "recipe.lock.yaml"
    r = run_cli(command, target, "--inconclusive", "maybe")
    assert r.exit_code == EXIT_USAGE, r.output
    assert "'maybe' is not one of 'fail', 'warn', 'pass'" in r.output


def test_a_time_cap_too_short_for_one_measurement_names_the_setting(artifact):
    r = run_cli("check", artifact, "--settle-time", "0.1")
    assert_clean_error(r, EXIT_USAGE, "--settle-time 0.1", "too short to take one measurement")


def test_optimize_refuses_a_time_cap_too_short_before_any_work(tmp_path):
    recipe = toys.write_recipe(tmp_path, model={"onnx": "missing.onnx"},
                               data={"eval": "eval.npz"})
    r = run_cli("optimize", recipe, "--settle-time", "0")
    assert_clean_error(r, EXIT_USAGE, "--settle-time 0", "too short")


@pytest.mark.parametrize("limit", [0, -1])
@pytest.mark.parametrize("budget", ["max_latency_ms", "max_size_mb", "min_speedup",
                                    "max_memory_mb"])
def test_a_limit_of_zero_or_less_is_refused_at_load(tmp_path, budget, limit):
    recipe = toys.write_recipe(tmp_path, budgets={budget: limit}, model={"onnx": "m.onnx"},
                               data={"eval": "eval.npz"})
    r = run_cli("recipe", "validate", recipe)
    assert_clean_error(r, EXIT_USAGE, budget)


@pytest.mark.parametrize("pair", ["max_latency_ms.p90=0", "max_size_mb=-2", "min_speedup=0"])
def test_a_limit_of_zero_or_less_is_refused_on_the_command_line(artifact, pair):
    assert_clean_error(run_cli("check", artifact, "--budget", pair), EXIT_USAGE,
                       "must be positive")


def test_bench_judges_latency_on_its_interval(tmp_path):
    cnn = toys.export_cnn_onnx(tmp_path / "cnn.onnx")
    prof = toys.fast_profile(tmp_path / "fast.yaml")
    r = run_cli("bench", cnn, "--profile", prof, "--budget", "max_latency_ms.p50=1000",
                "--json")
    assert r.exit_code == EXIT_OK, r.output
    (v,) = json.loads(r.stdout)["verdicts"]
    assert v["status"] == "pass" and v["low"] <= v["measured"] <= v["high"] <= 1000
    assert "quiet-block estimate" in v["detail"]
    assert_clean_error(run_cli("bench", cnn, "--budget", "max_latency_ms.p50=1",
                               "--settle-time", "0.5"), EXIT_USAGE, "--settle-time 0.5")


def test_against_with_remeasure_times_both_models_paired(artifact):
    r = run_cli("check", artifact, "--against", artifact, "--remeasure", "--max-regression",
                "50%", "--settle-time", "3", "--json")
    assert r.exit_code == EXIT_OK, r.output
    regs = {v["budget"]: v for v in json.loads(r.stdout)["regressions"]}
    lat = regs["regression.latency_p50.fast"]
    assert lat["status"] == "pass" and "timed paired" in lat["detail"]
    assert lat["low"] <= lat["measured"] <= lat["high"] < 50  # the same model: no change


@pytest.mark.parametrize(("policy", "code"), [("fail", EXIT_INCONCLUSIVE), ("warn", EXIT_OK)])
def test_optimize_exits_by_the_policy_when_a_latency_stays_undecided(tmp_path, monkeypatch,
                                                                     policy, code):
    from compactor.measure.latency import Latency
    from compactor.pipeline import run as pipeline_run
    from compactor.pipeline.judge import Timer
    from compactor.verdict import Interval

    straddle = Interval(1.0, 0.5, 1.5)
    monkeypatch.setattr(Latency, "interval", lambda self, q: straddle)
    asked = []

    def fake_timer(*_args, **_kw):
        def latency(model, prof, seconds):
            asked.append(seconds)
            return {"p50": straddle}

        return Timer(latency, lambda *a: Interval.point(1.0), settle_s=3.0)

    monkeypatch.setattr(pipeline_run, "make_timer", fake_timer)
    cnn = toys.export_cnn_onnx(tmp_path / "cnn.onnx")
    write_cnn_npz(tmp_path / "eval.npz", n=32)
    recipe = toys.write_recipe(tmp_path, budgets={"max_latency_ms": {"p50": 1.0}},
                               model={"onnx": str(cnn)}, data={"eval": "eval.npz"})
    r = run_cli("optimize", recipe, "--inconclusive", policy)
    assert r.exit_code == code, r.output
    assert asked, "the undecided verdict was re-measured"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (v,) = manifest["targets"][0]["verdicts"]
    assert v["status"] == "inconclusive" and "straddles" in v["detail"]
    assert ("budgets inconclusive" in r.stdout) == (policy == "fail")
