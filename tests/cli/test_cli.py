"""The command line: exit codes and messages of every command that needs no model run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

import compactor
from compactor.cli.optimize_cmd import demo_recipe
from compactor.errors import (
    EXIT_INTERRUPTED,
    EXIT_LOAD,
    EXIT_OK,
    EXIT_PASS,
    EXIT_USAGE,
)
from compactor.passes import registry
from compactor.profiles import builtin_names, load_profile
from compactor.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]


def bundled_recipes(folder: Path) -> list[Path]:
    """The recipe files in ``folder``; dot-files (an editor's lock, macOS's ``._`` copies)
    are not recipes, though ``*.yaml`` matches them."""
    return sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("."))


RECIPES = bundled_recipes(REPO / "recipes")

# A valid torch recipe whose files do not exist: enough for every command that must not
# load the model. quantize leaves calibration_method to its default on purpose.
RECIPE = """\
version: 1
name: cli-toy
model:
  factory: net.py:build
  inputs:
    - {name: image, shape: [batch, 1, 8, 8]}
data:
  eval: data.py:eval_batches
  calibration: data.py:calib_batches
passes:
  - export: {opset: 17}
  - quantize: {mode: static}
targets:
  - profile: host-cpu
    budgets: {max_accuracy_drop: 2%}
  - profile: edge-cpu
    budgets: {max_latency_ms: 4}
"""


# --------------------------------------------------------------------------- recipe


def test_validate_ok(invoke, write_recipe):
    r = invoke("recipe", "validate", write_recipe(RECIPE))
    assert r.exit_code == EXIT_OK, r.output
    assert r.stdout == "ok: cli-toy: export → quantize; targets: host-cpu, edge-cpu\n"


def test_validate_error(invoke, write_recipe):
    path = write_recipe(RECIPE.replace("{mode: static}", "{mod: static}"))
    r = invoke("recipe", "validate", path)
    assert r.exit_code == EXIT_USAGE
    assert r.stdout == ""
    assert f"error: {path}:12:16: unknown key 'mod' in passes[1].quantize\n" in r.stderr
    assert "hint: did you mean 'mode'?" in r.stderr
    assert "Traceback" not in r.output


def test_validate_missing_file(invoke, tmp_path: Path):
    r = invoke("recipe", "validate", tmp_path / "nope.yaml")
    assert r.exit_code == EXIT_USAGE
    assert "error: recipe file not found:" in r.stderr
    assert "nope.yaml" in r.stderr


def test_lock_fills_every_default(invoke, write_recipe):
    path = write_recipe(RECIPE)
    r = invoke("recipe", "lock", path)
    assert r.exit_code == EXIT_OK, r.output
    assert r.stdout.startswith("# compactor recipe.lock")
    lock = yaml.safe_load(r.stdout)
    quantize = lock["passes"][1]["quantize"]
    assert quantize["calibration_method"] == "minmax"
    assert quantize["per_channel"] is True
    assert lock["passes"][0]["export"] == {
        "opset": 17,
        "exporter": "auto",
        "simplify": True,
        "tolerance": 0.001,
        "check_batches": 4,
    }
    assert lock["model"]["inputs"] == [
        {"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32", "batch_axis": 0}
    ]
    assert lock["measure"] == {"dims": {}}
    assert lock["data"]["batch_size"] == 32
    assert lock["metric"] == "accuracy"
    assert lock["seed"] == 0
    from compactor.recipe import Budgets

    # every budget key is present in the lock, set or not
    assert set(lock["targets"][0]["budgets"]) == set(Budgets.model_fields)
    assert lock["targets"][0]["budgets"]["max_accuracy_drop"] == "2%"
    assert lock["targets"][0]["budgets"]["max_size_mb"] is None
    assert lock["targets"][1]["budgets"]["max_latency_ms"] == {"p50": 4.0, "p90": None, "p99": None}
    # the lock is itself a recipe, and the same one
    assert parse_recipe(r.stdout) == parse_recipe(RECIPE)


def test_lock_is_idempotent(invoke, write_recipe):
    first = invoke("recipe", "lock", write_recipe(RECIPE)).stdout
    second = invoke("recipe", "lock", write_recipe(first, name="lock.yaml")).stdout
    assert second == first


def test_lock_shows_the_implicit_final_export(invoke, write_recipe):
    text = RECIPE.replace("passes:\n  - export: {opset: 17}\n  - quantize: {mode: static}\n", "")
    assert "passes" not in text
    r = invoke("recipe", "lock", write_recipe(text))
    assert r.exit_code == EXIT_OK, r.output
    passes = yaml.safe_load(r.stdout)["passes"]
    assert [next(iter(p)) for p in passes] == ["export"]
    assert passes[0]["export"]["opset"] == 18


def test_lock_to_file(invoke, write_recipe, tmp_path: Path):
    out = tmp_path / "recipe.lock.yaml"
    r = invoke("recipe", "lock", write_recipe(RECIPE), "-o", out)
    assert r.exit_code == EXIT_OK, r.output
    assert r.stdout == ""
    assert f"wrote {out}" in r.stderr
    assert out.read_text() == invoke("recipe", "lock", tmp_path / "recipe.yaml").stdout
    assert invoke("recipe", "validate", out).exit_code == EXIT_OK


def test_lock_error(invoke, write_recipe, tmp_path: Path):
    out = tmp_path / "lock.yaml"
    r = invoke("recipe", "lock", write_recipe(RECIPE + "metric: acuracy\n"), "-o", out)
    assert r.exit_code == EXIT_USAGE
    assert "unknown metric 'acuracy'" in r.stderr
    assert not out.exists()


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else node


def test_schema(invoke):
    r = invoke("recipe", "schema")
    assert r.exit_code == EXIT_OK, r.output
    schema = json.loads(r.stdout)
    assert schema["type"] == "object"
    assert {"model", "data", "passes", "targets"} <= set(schema["properties"])
    assert {"name", "model", "data"} <= set(schema["required"])
    assert schema["additionalProperties"] is False
    items = schema["properties"]["passes"]["items"]
    assert "export" in json.dumps(items) or "Export" in json.dumps(items)
    names = set()
    for option in items["oneOf"]:
        names |= set(_resolve(schema, option)["properties"])
    assert names == set(registry())
    assert {"export", "quantize"} <= names
    quantize = _resolve(schema, schema["$defs"]["QuantizeConfigEntry"]["properties"]["quantize"])
    assert {"static", "dynamic"} <= set(quantize["properties"]["mode"]["enum"])


def test_schema_accepts_what_recipes_write(invoke):
    # budgets are written as 0.01 / "2%" and "max_latency_ms: 3": an editor must accept them
    schema = json.loads(invoke("recipe", "schema").stdout)
    budgets = schema["$defs"]["Budgets"]["properties"]
    drop_ref = next(o for o in budgets["max_accuracy_drop"]["anyOf"] if "$ref" in o)
    drop = _resolve(schema, drop_ref)["anyOf"]
    assert {"type": "number", "minimum": 0} in drop
    pattern = next(o["pattern"] for o in drop if o.get("type") == "string")
    assert re.search(pattern, "2%") and re.search(pattern, "0.5 %")
    assert not re.search(pattern, "2 percent") and not re.search(pattern, "2")
    lat_ref = next(o for o in budgets["max_latency_ms"]["anyOf"] if "$ref" in o)
    lat = _resolve(schema, lat_ref)["anyOf"]
    assert any(o.get("type") == "number" for o in lat)
    assert any("p90" in _resolve(schema, o).get("properties", {}) for o in lat)


# --------------------------------------------------------------------------- recipes/


def test_recipes_folder_holds_the_demo():
    assert REPO / "recipes" / "digits.yaml" in RECIPES
    assert (REPO / "recipes" / "digits.yaml").resolve() == demo_recipe().resolve()


def test_dot_files_in_the_recipes_folder_are_not_recipes(tmp_path: Path):
    for name in ("digits.yaml", "._digits.yaml", ".#digits.yaml", ".hidden.yaml"):
        (tmp_path / name).write_text("not: a recipe\n", encoding="utf-8")
    assert bundled_recipes(tmp_path) == [tmp_path / "digits.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_bundled_recipe_validates(invoke, path: Path):
    r = invoke("recipe", "validate", path)
    assert r.exit_code == EXIT_OK, r.output
    assert r.stdout.startswith("ok: ")
    recipe = load_recipe(path)
    for target in recipe.targets:  # `validate` does not resolve profiles; a run would
        load_profile(target.profile, recipe.base_dir)


# --------------------------------------------------------------------------- profiles


def test_profiles_list(invoke):
    r = invoke("profiles", "list")
    assert r.exit_code == EXIT_OK, r.output
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == builtin_names()
    assert {"host-cpu", "edge-cpu"} <= set(builtin_names())
    edge = next(line for line in lines if line.startswith("edge-cpu "))
    assert "edge" in edge.split() and "4 threads" in edge
    host = next(line for line in lines if line.startswith("host-cpu "))
    assert "all cores" in host


def test_profiles_show(invoke):
    r = invoke("profiles", "show", "edge-cpu")
    assert r.exit_code == EXIT_OK, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["name"] == "edge-cpu"
    assert shown["class"] == "edge"
    assert shown["intra_op_threads"] == 4
    assert shown["timing"]["min_runs"] >= 5  # defaults are filled in
    assert shown["execution_providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_profile_shows(invoke, name: str):
    r = invoke("profiles", "show", name)
    assert r.exit_code == EXIT_OK, r.output
    assert yaml.safe_load(r.stdout)["name"] == name


def test_profiles_show_unknown(invoke):
    r = invoke("profiles", "show", "edge-cpus")
    assert r.exit_code == EXIT_USAGE
    assert "error: unknown profile 'edge-cpus'" in r.stderr
    assert "did you mean 'edge-cpu'?" in r.stderr
    assert "host-cpu" in r.stderr


def test_profiles_show_file(invoke, tmp_path: Path):
    path = tmp_path / "board.yaml"
    path.write_text("name: board\nclass: edge\nintra_op_threads: 2\n")
    r = invoke("profiles", "show", path)
    assert r.exit_code == EXIT_OK, r.output
    shown = yaml.safe_load(r.stdout)
    assert (shown["name"], shown["intra_op_threads"], shown["batch_sizes"]) == ("board", 2, [1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: b\nclass: edge\nintra_op_threads: -1\n", "intra_op_threads: Input should be"),
        ("name: b\nclass: edge\nthreads: 2\n", "unknown key 'threads'"),
        ("name: b\nclass: phone\n", "class: Input should be"),
        ("name: b\nclass: edge\ntiming: {min_runs: 1}\n", "timing.min_runs:"),
        ("name: b\nclass: edge\nbatch_sizes: [1\n", "malformed YAML"),
    ],
    ids=["negative-threads", "unknown-key", "bad-class", "nested", "malformed"],
)
def test_profiles_show_bad_file(invoke, tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = invoke("profiles", "show", path)
    assert r.exit_code == EXIT_USAGE, r.output
    assert f"error: profile {path}:" in r.stderr  # malformed YAML adds :line:col
    assert expected in r.stderr
    assert "hint: " in r.stderr


def test_profiles_show_missing_file(invoke, tmp_path: Path):
    r = invoke("profiles", "show", tmp_path / "nope.yaml")
    assert r.exit_code == EXIT_USAGE
    assert "profile file not found" in r.stderr


# --------------------------------------------------------------------------- inspect


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    """x[batch,1,8,8] → Conv 3x3 (4 ch, same padding) → Relu → Flatten → Gemm 256→10 → Relu
    → MatMul 10→3 → y[batch,3]."""
    rng = __import__("numpy").random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [
            init("w1", 4, 1, 3, 3),
            init("b1", 4),
            init("w2", 10, 256),
            init("b2", 10),
            init("w3", 10, 3),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests"
    )
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


# MACs per sample, by hand: the conv gives 4x8x8 outputs of 1x3x3 MACs each, the Gemm 10
# outputs of 256, the MatMul 3 outputs of 10. Relu/Flatten count nothing.
MACS_PER_SAMPLE = 4 * 8 * 8 * (1 * 3 * 3) + 10 * 256 + 3 * 10
PARAMS = 4 * 1 * 3 * 3 + 4 + 10 * 256 + 10 + 10 * 3


def test_inspect_json(invoke, tiny_onnx: Path):
    r = invoke("inspect", tiny_onnx, "--json")
    assert r.exit_code == EXIT_OK, r.output
    info = json.loads(r.stdout)
    assert info["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "y", "shape": ["batch", 3], "dtype": "float32"}]
    assert info["op_histogram"] == {"Relu": 2, "Conv": 1, "Flatten": 1, "Gemm": 1, "MatMul": 1}
    assert list(info["op_histogram"]) == ["Relu", "Conv", "Flatten", "Gemm", "MatMul"]
    assert info["nodes"] == 6
    assert info["params"] == PARAMS == 2640
    assert info["macs"] == MACS_PER_SAMPLE == 4894
    assert info["macs_at"] == {"batch": 1}
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["size_bytes"] == tiny_onnx.stat().st_size
    assert info["producer"] == "tests"


def test_inspect_dim_scales_macs(invoke, tiny_onnx: Path):
    r = invoke("inspect", tiny_onnx, "--json", "--dim", "batch=4")
    assert r.exit_code == EXIT_OK, r.output
    info = json.loads(r.stdout)
    assert info["macs"] == 4 * MACS_PER_SAMPLE
    assert info["macs_at"] == {"batch": 4}
    assert info["params"] == PARAMS  # parameters do not grow with the batch


def test_inspect_table(invoke, tiny_onnx: Path):
    r = invoke("inspect", tiny_onnx, "--dim", "batch=4")
    assert r.exit_code == EXIT_OK, r.output
    assert "op histogram" in r.stdout
    assert "MatMul" in r.stdout and "Gemm" in r.stdout
    shown = " ".join(r.stdout.split())  # rich wraps lines at the runner's 80 columns
    assert "MACs: 19.58k (at batch=4)" in shown
    assert "2.64k params, 6 nodes" in shown


def test_inspect_missing_file(invoke, tmp_path: Path):
    r = invoke("inspect", tmp_path / "nope.onnx")
    assert r.exit_code == EXIT_LOAD
    assert "error: model file not found:" in r.stderr and "nope.onnx" in r.stderr


@pytest.mark.parametrize("content", [b"this is not a model\n", b""], ids=["text", "empty"])
def test_inspect_not_onnx(invoke, tmp_path: Path, content: bytes):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    r = invoke("inspect", path, "--json")
    assert r.exit_code == EXIT_LOAD, r.output
    assert "error: model.onnx is not an ONNX model" in r.stderr
    assert "hint: inspect takes an .onnx file" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("dim", ["batch", "batch=0", "batch=x", "batch=-2", "batch=1.5"])
def test_inspect_bad_dim(invoke, tiny_onnx: Path, dim: str):
    r = invoke("inspect", tiny_onnx, "--dim", dim)
    assert r.exit_code == EXIT_USAGE, r.output
    assert f"error: --dim {dim!r}: expected NAME=N with N a positive integer" in r.stderr


# --------------------------------------------------------------------------- errors, --debug


def test_unknown_command(invoke):
    r = invoke("optimise")
    assert r.exit_code == EXIT_USAGE
    assert "No such command 'optimise'" in r.output
    assert "Did you mean 'optimize'?" in r.output


def test_no_traceback_without_debug(invoke, tmp_path: Path):
    r = invoke("recipe", "validate", tmp_path / "nope.yaml")
    assert r.exit_code == EXIT_USAGE
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(invoke, tmp_path: Path, how: str):
    args = ("--debug",) if how == "flag" else ()
    env = {"COMPACTOR_DEBUG": "1"} if how == "env" else None
    r = invoke(*args, "recipe", "validate", tmp_path / "nope.yaml", env=env)
    assert r.exit_code == EXIT_USAGE, r.output  # CI scripts see the same code with --debug
    assert "Traceback (most recent call last)" in r.stderr
    assert "RecipeError: recipe file not found" in r.stderr
    assert "error: recipe file not found" in r.stderr


def _run_compactor(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from compactor.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_debug_prints_a_traceback(tmp_path: Path):
    missing = str(tmp_path / "nope.yaml")
    plain = _run_compactor("recipe", "validate", missing)
    assert plain.returncode == EXIT_USAGE, plain.stderr
    assert "Traceback" not in plain.stderr
    assert "error: recipe file not found" in plain.stderr

    debug = _run_compactor("--debug", "recipe", "validate", missing)
    assert debug.returncode == EXIT_USAGE, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr
    assert "RecipeError: recipe file not found" in debug.stderr


def _boom(*_a, **_k):
    raise RuntimeError("boom")


def test_internal_error(invoke, monkeypatch, write_recipe):
    monkeypatch.setattr("compactor.recipe.load_recipe", _boom)
    r = invoke("recipe", "validate", write_recipe(RECIPE))
    assert r.exit_code == EXIT_PASS
    assert "error: internal error: RuntimeError: boom" in r.stderr
    assert "this is a bug in compactor; rerun with --debug" in r.stderr
    assert "Traceback" not in r.output

    r = invoke("--debug", "recipe", "validate", write_recipe(RECIPE))
    assert r.exit_code == EXIT_PASS
    assert "Traceback (most recent call last)" in r.stderr
    assert "RuntimeError: boom" in r.stderr


def test_interrupt(invoke, monkeypatch, write_recipe):
    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("compactor.recipe.load_recipe", interrupt)
    r = invoke("recipe", "validate", write_recipe(RECIPE))
    assert r.exit_code == EXIT_INTERRUPTED
    assert "interrupted" in r.stderr


# --------------------------------------------------------------------------- --help, --version


def test_version(invoke):
    r = invoke("--version")
    assert r.exit_code == EXIT_OK
    assert r.stdout == f"compactor, version {compactor.__version__}\n"
    assert compactor.__version__ == metadata.version("compactor")


def test_help(invoke):
    r = invoke("--help")
    assert r.exit_code == EXIT_OK
    for command in ("optimize", "inspect", "profiles", "recipe"):
        assert re.search(rf"^  {command} ", r.stdout, re.M), command
    assert "Exit codes" in r.stdout


LEAN = """
import sys
from compactor.cli import cli
code = cli.main(sys.argv[1:], standalone_mode=False)
heavy = [m for m in ("torch", "onnxruntime") if m in sys.modules]
print("HEAVY", heavy, file=sys.stderr)
sys.exit(code if not heavy else 99)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["recipe", "validate", str(demo_recipe())], ["profiles", "list"]],
    ids=["help", "validate", "profiles"],
)
def test_light_commands_import_no_torch_or_onnxruntime(args: list[str]):
    r = subprocess.run(
        [sys.executable, "-c", LEAN, *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == EXIT_OK, r.stderr
    assert "HEAVY []" in r.stderr


def test_inspect_imports_no_torch(tiny_onnx: Path):
    # inspect must work on an edge device with onnxruntime and no torch
    code = LEAN.replace('("torch", "onnxruntime")', '("torch",)')
    r = subprocess.run(
        [sys.executable, "-c", code, "inspect", "--json", str(tiny_onnx)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == EXIT_OK, r.stderr
    assert json.loads(r.stdout)["macs"] == MACS_PER_SAMPLE


# --------------------------------------------------------------------------- optimize


def test_optimize_missing_recipe(invoke, tmp_path: Path):
    r = invoke("optimize", tmp_path / "nope.yaml")
    assert r.exit_code == EXIT_USAGE
    assert "error: recipe file not found" in r.stderr


def test_optimize_bad_recipe(invoke, write_recipe):
    path = write_recipe(RECIPE.replace("- quantize:", "- quantise:"))
    r = invoke("optimize", path)
    assert r.exit_code == EXIT_USAGE
    assert f"{path}:12:5: passes[1]: unknown pass 'quantise'" in r.stderr


# These recipes name model files that do not exist: an output check that let the run start
# would end in exit 3 (model not loaded), not 2.


def test_optimize_output_under_a_file(invoke, write_recipe, tmp_path: Path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    r = invoke("optimize", write_recipe(RECIPE), "-o", tmp_path / "blocker" / "out")
    assert r.exit_code == EXIT_USAGE, r.output
    assert f"error: cannot write the artifact to {tmp_path / 'blocker' / 'out'}" in r.stderr
    assert "hint: choose another folder with --output" in r.stderr
    assert (tmp_path / "blocker").read_text() == "a file, not a folder"


def test_optimize_recipe_output_under_a_file(invoke, write_recipe, tmp_path: Path):
    # the recipe's own `output:` resolves against the recipe's folder
    (tmp_path / "blocker").write_text("")
    r = invoke("optimize", write_recipe(RECIPE + "output: blocker/out\n"))
    assert r.exit_code == EXIT_USAGE, r.output
    assert "error: cannot write the artifact to" in r.stderr
    assert str(tmp_path.resolve() / "blocker" / "out") in r.stderr


def test_optimize_output_is_a_file(invoke, write_recipe, tmp_path: Path):
    (tmp_path / "out").write_text("keep")
    r = invoke("optimize", write_recipe(RECIPE + "output: out\n"))
    assert r.exit_code == EXIT_USAGE, r.output
    assert "exists and is not a folder" in r.stderr
    assert (tmp_path / "out").read_text() == "keep"


def test_optimize_refuses_a_folder_that_is_not_an_artifact(invoke, write_recipe, tmp_path: Path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    recipe = write_recipe(RECIPE)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    r = invoke("optimize", recipe, "-o", out)
    assert r.exit_code == EXIT_USAGE, r.output
    assert (
        f"error: output folder {out} is not empty and does not hold a compactor artifact"
        in r.stderr
    )
    assert "hint: compactor only replaces its own artifacts" in r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (out / "notes.txt").read_text() == "precious"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"


def test_optimize_checks_output_before_loading(invoke, write_recipe, tmp_path: Path):
    # the counter-check for the tests above: with a writable output, this recipe gets as far
    # as loading its (missing) model and exits 3
    r = invoke("optimize", write_recipe(RECIPE), "-o", tmp_path / "fresh")
    assert r.exit_code == EXIT_LOAD, r.output
    assert "net.py" in r.stderr
    assert not (tmp_path / "fresh").exists()
