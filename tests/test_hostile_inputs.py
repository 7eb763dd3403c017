"""Hostile and edge-case inputs (issue 17): bounded YAML, factories that exit or parse
arguments, SIGTERM, budgets no pass can meet, empty batches, a fixed batch axis."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import toys
import yaml

from compactor.errors import EXIT_LOAD, EXIT_TERMINATED, DataError, ModelLoadError, RecipeError
from compactor.recipe import load_recipe
from compactor.yamlsafe import MAX_BYTES, MAX_NODES, load_yaml

EXPORT_ONLY = [{"export": {"simplify": False}}]
# The head of a user module written by a test: it can import the toys (a package in tests/).
TESTS = Path(toys.__file__).parents[1]
TOYS_IMPORT = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport toys\n"


def _cnn_recipe(folder: Path, **fields) -> Path:
    fields.setdefault("model", toys.cnn_model(None))
    fields.setdefault("data", {"eval": toys.ref("cnn_eval_batches")})
    fields.setdefault("passes", EXPORT_ONLY)
    return toys.write_recipe(folder, **fields)


# --------------------------------------------------------------------------- bounded YAML


def _alias_bomb(levels: int = 9) -> str:
    """A 'billion laughs': 10**levels strings once every alias is expanded."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_alias_bomb_in_a_recipe_is_refused_fast_with_little_memory(tmp_path, invoke):
    recipe = _cnn_recipe(tmp_path)
    path = tmp_path / "bomb.yaml"
    path.write_text(recipe.read_text() + _alias_bomb(), encoding="utf-8")
    before = _peak_rss_mb()
    for command in (["recipe", "validate"], ["recipe", "lock"], ["optimize"]):
        t0 = time.perf_counter()
        r = invoke(*command, path)
        seconds = time.perf_counter() - t0
        toys.assert_clean_error(r, 2, str(path), f"more than {MAX_NODES:,} values", "alias")
        assert seconds < 5, f"{command}: {seconds:.1f} s"
    grew = _peak_rss_mb() - before
    assert grew < 200, f"peak RSS grew {grew:.0f} MB"


def test_alias_bomb_in_an_artifacts_lock_is_refused(tmp_path):
    from compactor.yamlsafe import load_yaml_file

    lock = tmp_path / "recipe.lock.yaml"
    lock.write_text(_alias_bomb(), encoding="utf-8")
    with pytest.raises(RecipeError, match="recipe.lock.yaml:.*more than"):
        load_yaml_file(lock, "recipe.lock.yaml")


def test_a_recursive_alias_is_refused():
    with pytest.raises(RecipeError, match=r"r.yaml:1:\d+: a YAML alias refers to the value"):
        load_yaml("a: &a [1, *a]\n", "r.yaml")


def test_aliases_and_merge_keys_of_a_normal_size_still_load():
    text = "base: &b {opset: 17}\nexport: {<<: *b, simplify: false}\nboth: [*b, *b]\n"
    assert load_yaml(text, "r.yaml") == {
        "base": {"opset": 17},
        "export": {"opset": 17, "simplify": False},
        "both": [{"opset": 17}, {"opset": 17}],
    }


def test_a_50_mb_recipe_is_refused_before_it_is_read(tmp_path, invoke):
    path = tmp_path / "huge.yaml"
    with open(path, "w", encoding="utf-8") as f:
        f.write("name: huge\n")
        f.writelines("# " + "x" * 1000 + "\n" for _ in range(50_000))  # ~50 MB
    assert path.stat().st_size > 50e6
    t0 = time.perf_counter()
    r = invoke("recipe", "validate", path)
    seconds = time.perf_counter() - t0
    toys.assert_clean_error(r, 2, str(path), f"{MAX_BYTES / 2**20:g} mib limit")
    assert seconds < 1, f"{seconds:.2f} s"


def test_a_recipe_just_over_the_limit_is_refused_and_one_under_it_is_read(tmp_path):
    over = tmp_path / "over.yaml"
    over.write_text("name: x\n#" + "x" * MAX_BYTES + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="over the 1 MiB limit"):
        load_recipe(over)
    under = _cnn_recipe(tmp_path, filename="under.yaml")
    under.write_text(under.read_text() + "#" + "x" * (MAX_BYTES // 2) + "\n", encoding="utf-8")
    assert load_recipe(under).name == "toy"


@pytest.mark.parametrize("where", ["recipe", "lock"])
def test_python_object_tags_are_refused_by_name_not_run(tmp_path, invoke, where):
    marker = tmp_path / "ran"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    recipe = _cnn_recipe(tmp_path)
    text = recipe.read_text().replace("name: toy", f"name: {payload}")
    path = tmp_path / ("recipe.lock.yaml" if where == "lock" else "tagged.yaml")
    path.write_text(text, encoding="utf-8")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "python/object" in ln)
    command = ["recipe", "validate"] if where == "recipe" else ["optimize"]
    r = invoke(*command, path)
    toys.assert_clean_error(
        r, 2, f"{path}:{line}:", "unsupported yaml tag", "!!python/object/apply:os.system"
    )
    assert not marker.exists()


def test_deep_nesting_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="nested more than 64 levels"):
        load_yaml("a: " + "[" * 100 + "]" * 100 + "\n", "r.yaml")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_yaml("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "r.yaml")


def test_a_profile_file_is_read_through_the_bounded_loader(tmp_path):
    from compactor.profiles import load_profile

    (tmp_path / "bomb.yaml").write_text(_alias_bomb(), encoding="utf-8")
    with pytest.raises(RecipeError, match="bomb.yaml:.*more than"):
        load_profile("bomb.yaml", tmp_path)
    (tmp_path / "tagged.yaml").write_text("name: !!python/name:os.system ''\n")
    with pytest.raises(RecipeError, match="unsupported YAML tag '!!python/name:os.system'"):
        load_profile("tagged.yaml", tmp_path)


def test_check_reads_an_old_artifacts_lock_through_the_bounded_loader(tmp_path):
    from compactor.check import _budgets_of
    from compactor.errors import ArtifactDamaged
    from compactor.manifest import TargetRecord

    entry = TargetRecord(profile="fast", passed=True, verdicts=[])  # no budgets: read the lock
    lock = tmp_path / "recipe.lock.yaml"
    lock.write_text(
        "targets:\n  - profile: fast\n    budgets: !!python/object/apply:os.getcwd []\n",
        encoding="utf-8",
    )
    with pytest.raises(ArtifactDamaged, match="artifact damaged: recipe.lock.yaml:3:.*YAML tag"):
        _budgets_of(tmp_path, 0, entry)
    lock.write_text(_alias_bomb(), encoding="utf-8")
    with pytest.raises(ArtifactDamaged, match="recipe.lock.yaml:.*more than"):
        _budgets_of(tmp_path, 0, entry)


# --------------------------------------------------------------------------- factories


FACTORIES = """
import argparse
import sys

import toys

def exits_0():
    sys.exit(0)

def raises_system_exit():
    raise SystemExit("bye")

def parses_required_args():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.parse_args()
    return toys.build_cnn()

def parses_optional_args():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=8)
    args = p.parse_args()  # compactor's own arguments must not reach it
    assert sys.argv[1:] == [], sys.argv
    return toys.build_cnn()

def data_exits_while_iterated():
    yield from toys.cnn_eval_batches()[:1]
    sys.exit(3)

def interrupted():
    raise KeyboardInterrupt
"""


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(
        TOYS_IMPORT + textwrap.dedent(FACTORIES),
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    "fn, fragments",
    [
        ("exits_0", ["exits_0()", "sys.exit(0)"]),
        ("raises_system_exit", ["raises_system_exit()", "sys.exit('bye')"]),
        (
            "parses_required_args",
            ["parses_required_args()", "argparse", "required: --data-dir", "model.args"],
        ),
    ],
)
def test_a_model_factory_that_exits_is_a_load_error(tmp_path, factories, invoke, fn, fragments):
    model = {"factory": f"factories.py:{fn}", "inputs": [toys.CNN_INPUT]}
    r = invoke("optimize", _cnn_recipe(tmp_path, model=model))
    toys.assert_clean_error(r, EXIT_LOAD, "model.factory", *fragments, "__main__")
    assert "usage:" not in r.output  # argparse's own message is not what the user sees


def test_a_factory_sees_argv_as_the_program_name_only_and_argv_is_restored(factories):
    from compactor._imports import call_user, resolve_callable

    argv = list(sys.argv)
    fn, _ = resolve_callable(f"{factories}:parses_optional_args", Path("."), ModelLoadError, "m")
    assert call_user(fn, ModelLoadError, "model.factory") is not None
    assert sys.argv == argv


def test_argv_is_restored_after_a_factory_exits(factories):
    from compactor._imports import call_user, resolve_callable

    argv = list(sys.argv)
    fn, _ = resolve_callable(f"{factories}:exits_0", Path("."), ModelLoadError, "m")
    with pytest.raises(ModelLoadError):
        call_user(fn, ModelLoadError, "model.factory")
    assert sys.argv == argv


def test_a_module_that_exits_on_import_is_a_load_error(tmp_path):
    from compactor._imports import resolve_callable

    (tmp_path / "exits_on_import.py").write_text(
        "import argparse\n"
        "p = argparse.ArgumentParser()\np.add_argument('x')\np.parse_args()\n"
        "def build():\n    return None\n",
        encoding="utf-8",
    )
    with pytest.raises(ModelLoadError, match=r"importing exits_on_import.py parses command-line"):
        resolve_callable("exits_on_import.py:build", tmp_path, ModelLoadError, "model.factory")


def test_a_data_generator_that_exits_while_iterated_is_a_data_error(tmp_path, factories):
    from compactor.data import DataSource

    src = DataSource(
        "eval", f"{factories}:data_exits_while_iterated", [_cnn_input_spec()], tmp_path
    )
    with pytest.raises(DataError, match=r"data.eval: iterating its batches called sys.exit\(3\)"):
        list(src.batches())


def test_a_metric_that_exits_is_a_load_error(tmp_path):
    from compactor.metrics import get_metric

    (tmp_path / "m.py").write_text("import sys\ndef acc(o, t):\n    sys.exit(1)\n")
    metric = get_metric("m.py:acc", tmp_path)
    with pytest.raises(RecipeError, match=r"metric: acc\(\) called sys.exit\(1\)") as e:
        metric.fn(None, None, None)
    assert e.value.exit_code == EXIT_LOAD


def test_ctrl_c_in_a_factory_still_interrupts(tmp_path, factories, invoke):
    model = {"factory": "factories.py:interrupted", "inputs": [toys.CNN_INPUT]}
    r = invoke("optimize", _cnn_recipe(tmp_path, model=model))
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.stderr


def _cnn_input_spec():
    from compactor.spec import InputSpec

    return InputSpec.model_validate(toys.CNN_INPUT)


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_a_run_cleanly_with_exit_143_and_a_resume_line(tmp_path):
    started = tmp_path / "calibration-started"
    (tmp_path / "slow_data.py").write_text(
        textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        import toys

        def slow_calibration():
            Path({str(started)!r}).touch()
            time.sleep(60)
            return toys.cnn_calibration_batches()
        """),
        encoding="utf-8",
    )
    recipe = _cnn_recipe(
        tmp_path,
        data={"eval": toys.ref("cnn_eval_batches"), "calibration": "slow_data.py:slow_calibration"},
        passes=[{"export": {"simplify": False}}, {"quantize": {"mode": "static"}}],
    )
    env = {**os.environ, "COMPACTOR_DEBUG": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from compactor.cli import main; main()", "optimize", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached calibration"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TERMINATED, err
    assert "Traceback" not in err, err
    assert "interrupted (SIGTERM)" in err
    assert f"resume with: compactor optimize {recipe} --resume" in err
    assert not (tmp_path / "out").exists()  # nothing half-written at the output


def test_sigterm_handler_is_installed_only_while_a_command_runs(invoke, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    r = invoke("recipe", "validate", _cnn_recipe(tmp_path))
    assert r.exit_code == 0, r.output
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- early budgets


def _limited_profile(folder: Path, **limits) -> str:
    path = toys.fast_profile(folder / "limited.yaml", name="limited")
    path.write_text(path.read_text() + f"limits: {yaml.safe_dump(limits, default_flow_style=True)}")
    return "limited.yaml"


def test_a_size_limit_no_pass_can_reach_fails_before_any_pass_runs(tmp_path, invoke):
    # TinyCNN: ~100k float weights, 0.4 MB; int8 at best 0.1 MB; the limit is 12x smaller
    profile = _limited_profile(tmp_path, model_size_mb=0.4 / 12)
    recipe = _cnn_recipe(
        tmp_path,
        data={"eval": toys.ref("cnn_eval_batches"), "calibration": toys.ref("cnn_eval_batches")},
        passes=[{"export": {}}, {"quantize": {"mode": "static"}}],
        targets=[{"profile": profile}],
    )
    t0 = time.perf_counter()
    r = invoke("optimize", recipe)
    error, hint = toys.assert_clean_error(
        r,
        1,
        "target limited",
        "limits.model_size_mb",
        "0.0333",
        "estimated 0.1",
        "0.4",
        "before any pass ran",
    )
    assert "pass 1/" not in r.stderr and "baseline: evaluate" not in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.work*"))
    assert time.perf_counter() - t0 < 10


def test_a_max_size_budget_counts_pruning_and_int8(tmp_path):
    from compactor.budgets import judge_before_passes, reachable_floor, weight_floor
    from compactor.errors import BudgetFailed
    from compactor.passes import get_pass
    from compactor.profiles import load_profile
    from compactor.recipe import parse_recipe
    from compactor.stage import Stage

    base = weight_floor(Stage("baseline", "torch", module=toys.build_cnn()))
    assert base is not None and 0.39 < base.mb < 0.42  # float32 weights of TinyCNN
    profiles = [load_profile("host-cpu", tmp_path)]

    def judge(passes: list, max_size_mb: float) -> None:
        recipe = parse_recipe(
            yaml.safe_dump(
                {
                    "name": "t",
                    "model": toys.cnn_model(None),
                    "passes": passes,
                    "data": {"eval": "x:y", "train": "x:y", "calibration": "x:y"},
                    "targets": [{"profile": "host-cpu", "budgets": {"max_size_mb": max_size_mb}}],
                }
            )
        )
        passes_ = [get_pass(n)(c) for n, c in recipe.pass_list]
        judge_before_passes(recipe.targets, profiles, base, reachable_floor(base, passes_))

    # a params target is squared like a MACs one: the bisection can stop below it
    prune_half = {"prune": {"target": {"params": 0.5}}}
    judge([prune_half, {"export": {}}, {"quantize": {}}], 0.03)  # 0.025 MB reachable: ok
    with pytest.raises(BudgetFailed, match=r"estimated 0\.025\d MB"):
        judge([prune_half, {"export": {}}, {"quantize": {}}], 0.02)
    with pytest.raises(BudgetFailed, match=r"estimated 0\.1 MB"):
        judge([prune_half], 0.09)  # float: a quarter of 0.4 MB
    judge([{"prune": {"amount": 0.5, "global": True}}], 0.001)  # no cheap bound: not judged
    judge([{"distill": {"student": {"keep_layers": [0]}}}], 0.001)


def test_a_fitting_model_is_not_stopped_early(tmp_path, invoke):
    profile = _limited_profile(tmp_path, model_size_mb=1.0, memory_mb=4096)
    r = invoke("optimize", _cnn_recipe(tmp_path, targets=[{"profile": profile}]))
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- data edges


def test_an_eval_batch_with_no_rows_is_a_data_error_naming_split_and_batch(tmp_path, invoke):
    (tmp_path / "empty_data.py").write_text(
        TOYS_IMPORT + "def with_empty():\n"
        "    b = toys.cnn_eval_batches(n=64)\n"
        "    return b + [(b[0][0][:0], b[0][1][:0])]\n",
        encoding="utf-8",
    )
    r = invoke("optimize", _cnn_recipe(tmp_path, data={"eval": "empty_data.py:with_empty"}))
    toys.assert_clean_error(r, 3, "data.eval batch 2", "0 rows")


def test_a_fixed_batch_axis_is_traced_and_measured_at_its_size(tmp_path, invoke):
    (tmp_path / "data16.py").write_text(
        TOYS_IMPORT + "def eval16():\n    return toys.cnn_eval_batches(n=32, batch_size=16)\n",
        encoding="utf-8",
    )
    model = {
        "factory": toys.ref("build_cnn"),
        "inputs": [{"name": "image", "shape": [16, 1, 16, 16]}],
    }
    recipe = _cnn_recipe(
        tmp_path, model=model, data={"eval": "data16.py:eval16"}, passes=[{"export": {}}]
    )
    r = invoke("optimize", recipe)
    assert r.exit_code == 0, r.output
    import onnx

    dims = onnx.load(str(tmp_path / "out" / "model.onnx")).graph.input[0].type.tensor_type
    assert [d.dim_value for d in dims.shape.dim] == [16, 1, 16, 16]


def test_example_inputs_keep_a_fixed_batch_and_cut_a_dynamic_one():
    import numpy as np

    from compactor.data import Batch, batch_sizes_for
    from compactor.exporting import example_inputs
    from compactor.spec import InputSpec

    x = np.zeros((16, 3), np.float32)
    fixed = InputSpec(name="x", shape=(16, 3))
    dynamic = InputSpec(name="x", shape=("batch", 3))
    assert example_inputs([fixed], Batch({"x": x}))["x"].shape == (16, 3)
    assert example_inputs([dynamic], Batch({"x": x}))["x"].shape == (2, 3)
    assert batch_sizes_for([fixed], [1, 8]) == [16]
    assert batch_sizes_for([dynamic], [1, 8]) == [1, 8]
