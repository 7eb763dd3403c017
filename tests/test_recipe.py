"""Recipe loading and validation: bad recipes as a table of (yaml, expected message, line:col)
rows, then what a valid recipe resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from compactor.errors import EXIT_USAGE, RecipeError
from compactor.exporting import ExportConfig
from compactor.passes.quantize import QuantizeConfig
from compactor.recipe import Drop, LatencyBudget, load_recipe, parse_recipe

# Line numbers matter: the table below points at them.
BASE = """\
version: 1
name: toy
model:
  factory: net.py:build
  inputs:
    - {name: image, shape: [batch, 1, 8, 8], dtype: float32}
data:
  eval: data.py:eval_batches
  calibration: data.py:calib_batches
passes:
  - export: {opset: 17}
  - quantize: {mode: static}
targets:
  - profile: host-cpu
    budgets: {max_size_mb: 1, max_latency_ms: {p90: 5}, max_accuracy_drop: 0.01}
"""

ONNX_BASE = """\
name: toy-onnx
model: {onnx: net.onnx}
data: {eval: data.npz}
"""


def sub(old: str, new: str, text: str = BASE) -> str:
    """BASE with one exact substring replaced; a stale row fails loudly, not silently."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


EXPORT_QUANTIZE = "  - export: {opset: 17}\n  - quantize: {mode: static}\n"

# (id, recipe text, substrings the message + hint must contain, "line:col" or None)
BAD_RECIPES = [
    # --- YAML itself
    (
        "yaml-colon-in-value",
        sub("name: toy", "name: toy: x"),
        ["malformed YAML", "mapping values are not allowed here"],
        "2:10",
    ),
    (
        "yaml-unclosed-flow",
        sub("{opset: 17}", "{opset: 17"),
        ["malformed YAML", "expected ',' or '}'"],
        "12:13",
    ),
    ("yaml-tab-indent", sub("  factory:", "\tfactory:"), ["malformed YAML", "'\\t'"], "4:1"),
    (
        "yaml-not-a-mapping",
        "- export\n- quantize\n",
        ["a recipe must be a YAML mapping (got list)"],
        None,
    ),
    ("yaml-empty", "", ["a recipe must be a YAML mapping (got NoneType)"], None),
    # --- unknown keys, with did-you-mean
    (
        "unknown-top-level-key",
        sub("model:", "modle:"),
        [
            "unknown key 'modle' in the recipe",
            "did you mean 'model'?",
            "allowed keys in the recipe: version, name, model",
        ],
        "3:1",
    ),
    (
        "unknown-key-in-pass",
        sub("{mode: static}", "{mod: static}"),
        ["unknown key 'mod' in passes[1].quantize", "did you mean 'mode'?", "calibration_method"],
        "12:16",
    ),
    (
        "unknown-key-in-export",
        sub("{opset: 17}", "{opst: 17}"),
        ["unknown key 'opst' in passes[0].export", "did you mean 'opset'?"],
        "11:14",
    ),
    (
        "unknown-key-in-target",
        sub("    budgets:", "    budget:"),
        ["unknown key 'budget' in targets[0]", "did you mean 'budgets'?"],
        "15:5",
    ),
    (
        "unknown-budget",
        sub("max_size_mb: 1", "max_sise_mb: 1"),
        ["unknown key 'max_sise_mb' in targets[0].budgets", "did you mean 'max_size_mb'?"],
        "15:15",
    ),
    (
        "unknown-key-in-input",
        sub("dtype: float32", "dtyp: float32"),
        ["unknown key 'dtyp' in model.inputs[0]", "did you mean 'dtype'?"],
        "6:46",
    ),
    (
        "unknown-pass",
        sub("- quantize:", "- quantise:"),
        [
            "passes[1]: unknown pass 'quantise'",
            "did you mean 'quantize'?",
            "known passes: export, quantize",
        ],
        "12:5",
    ),
    (
        "unknown-pass-no-close-match",
        sub("- quantize: {mode: static}", "- sparsify: {}"),
        ["passes[1]: unknown pass 'sparsify'", "known passes: export, quantize"],
        "12:5",
    ),
    (
        "passes-not-a-list",
        sub(EXPORT_QUANTIZE, "  export: {}\n"),
        ["passes: expected a list of passes"],
        "10:1",
    ),
    (
        "pass-with-two-keys",
        sub("- export: {opset: 17}", "- {export: {}, quantize: {}}"),
        ["passes[0]: each pass is a mapping with one key"],
        "11:5",
    ),
    # --- wrong types and out-of-range values, with the field's path
    (
        "bad-literal",
        sub("{mode: static}", "{mode: fast}"),
        ["passes[1].quantize.mode: Input should be 'static', 'dynamic'", '(got "fast")'],
        "12:16",
    ),
    (
        "opset-too-low",
        sub("opset: 17", "opset: 5"),
        ["passes[0].export.opset:", "greater than or equal to 13", "(got 5)"],
        "11:14",
    ),
    (
        "opset-too-high",
        sub("opset: 17", "opset: 99"),
        ["passes[0].export.opset:", "less than or equal to 23", "(got 99)"],
        "11:14",
    ),
    (
        "opset-wrong-type",
        sub("opset: 17", "opset: latest"),
        ["passes[0].export.opset:", "integer", '(got "latest")'],
        "11:14",
    ),
    (
        "negative-size-budget",
        sub("max_size_mb: 1", "max_size_mb: -1"),
        ["targets[0].budgets.max_size_mb: Input should be greater than 0", "(got -1)"],
        "15:15",
    ),
    (
        "negative-latency-budget",
        sub("{p90: 5}", "{p90: -5}"),
        ["targets[0].budgets.max_latency_ms.p90:", "greater than 0"],
        "15:48",
    ),
    (
        "bad-dtype",
        sub("dtype: float32", "dtype: float33"),
        ["model.inputs[0].dtype:", "'float32'", '(got "float33")'],
        "6:46",
    ),
    (
        "zero-dim",
        sub("[batch, 1, 8, 8]", "[batch, 0, 8, 8]"),
        ["model.inputs[0].shape:", "dimension 0 must be positive"],
        "6:21",
    ),
    (
        "bad-axis-name",
        sub("[batch, 1, 8, 8]", "['batch size', 1, 8, 8]"),
        ["model.inputs[0].shape:", "must be an identifier"],
        "6:21",
    ),
    ("bad-name", sub("name: toy", "name: my toy"), ["name:", "pattern"], "2:1"),
    ("bad-version", sub("version: 1", "version: 2"), ["version: Input should be 1"], "1:1"),
    # --- required fields
    (
        "missing-eval",
        sub("  eval: data.py:eval_batches\n", ""),
        ["data.eval: this field is required"],
        "7:1",
    ),
    (
        "missing-model",
        sub(
            "model:\n  factory: net.py:build\n  inputs:\n"
            "    - {name: image, shape: [batch, 1, 8, 8], dtype: float32}\n",
            "",
        ),
        ["model: this field is required"],
        None,
    ),
    (
        "missing-data",
        ONNX_BASE.replace("data: {eval: data.npz}\n", ""),
        ["data: this field is required"],
        None,
    ),
    # --- the model's source
    (
        "factory-and-onnx",
        sub("  factory: net.py:build\n", "  factory: net.py:build\n  onnx: net.onnx\n"),
        ["model: give exactly one of 'factory', 'torchscript' or 'onnx' (got factory, onnx)"],
        "3:1",
    ),
    (
        "no-model-source",
        ONNX_BASE.replace("{onnx: net.onnx}", "{weights: w.pt}"),
        ["model: give exactly one of 'factory', 'torchscript' or 'onnx'"],
        "2:1",
    ),
    (
        "weights-without-factory",
        ONNX_BASE.replace("{onnx: net.onnx}", "{onnx: net.onnx, weights: w.pt}"),
        ["'weights' applies only to a 'factory' model"],
        "2:1",
    ),
    (
        "torch-without-inputs",
        sub("  inputs:\n    - {name: image, shape: [batch, 1, 8, 8], dtype: float32}\n", ""),
        ["model: a torch model needs 'inputs'"],
        "3:1",
    ),
    (
        "duplicate-input-names",
        sub(
            "    - {name: image, shape: [batch, 1, 8, 8], dtype: float32}\n",
            "    - {name: image, shape: [batch, 4]}\n    - {name: image, shape: [batch, 2]}\n",
        ),
        ["input names must be unique", "['image', 'image']"],
        "3:1",
    ),
    # --- pass order and what passes need
    (
        "quantize-before-export",
        sub(EXPORT_QUANTIZE, "  - quantize: {mode: dynamic}\n  - export: {}\n"),
        ["passes[0] 'quantize' needs an ONNX model", "add '- export: {}' before it"],
        None,
    ),
    (
        "quantize-without-export",
        sub("  - export: {opset: 17}\n", ""),
        ["passes[0] 'quantize' needs an ONNX model", "add '- export: {}' before it"],
        None,
    ),
    (
        "export-twice",
        sub("  - quantize: {mode: static}\n", "  - export: {}\n"),
        ["passes[1] 'export' works on torch models and cannot run after 'export'"],
        None,
    ),
    (
        "export-on-onnx-model",
        ONNX_BASE + "passes: [export]\n",
        ["passes[0] 'export' works on torch models", "model is an ONNX file"],
        "4:10",
    ),
    (
        "static-without-calibration",
        sub("  calibration: data.py:calib_batches\n", ""),
        ["static quantization needs calibration data", "data.calibration", "mode: dynamic"],
        None,
    ),
    (
        "static-is-the-default-mode",
        sub("  calibration: data.py:calib_batches\n", "", sub("{mode: static}", "{}")),
        ["static quantization needs calibration data"],
        None,
    ),
    # --- budgets and metric
    (
        "drop-in-words",
        sub("max_accuracy_drop: 0.01", "max_accuracy_drop: 2 percent"),
        ["targets[0].budgets.max_accuracy_drop:", "'2 percent' is not a drop", "'N%'"],
        "15:57",
    ),
    (
        "drop-boolean",
        sub("max_accuracy_drop: 0.01", "max_accuracy_drop: true"),
        ["targets[0].budgets.max_accuracy_drop:", "percentage string like '2%'"],
        "15:57",
    ),
    (
        "drop-negative",
        sub("max_accuracy_drop: 0.01", "max_accuracy_drop: -0.01"),
        ["targets[0].budgets.max_accuracy_drop", "greater than or equal to 0"],
        "15:57",
    ),
    (
        "unknown-metric",
        BASE + "metric: acuracy\n",
        ["metric: unknown metric 'acuracy'", "did you mean 'accuracy'?", "'module:fn'"],
        "16:1",
    ),
    (
        "target-without-profile",
        sub("  - profile: host-cpu\n    budgets:", "  - budgets:"),
        ["targets[0].profile: this field is required"],
        "14:5",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "pos"),
    [pytest.param(t, e, p, id=i) for i, t, e, p in BAD_RECIPES],
)
def test_bad_recipe_is_one_clear_error(text: str, expected: list[str], pos: str | None):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    err = info.value
    shown = str(err)  # message, then "hint: ..."
    for part in expected:
        assert part in shown, f"{part!r} not in:\n{shown}"
    assert err.exit_code == EXIT_USAGE
    assert err.hint, "every recipe error says what to do about it"
    assert "\n" not in err.message, f"the message is one line:\n{err.message}"
    if pos is not None:
        assert err.message.startswith(f"<recipe>:{pos}: "), err.message


def test_bad_recipe_table_rows_are_distinct():
    ids = [row[0] for row in BAD_RECIPES]
    assert len(ids) == len(set(ids))
    texts = [row[1] for row in BAD_RECIPES]
    assert len(texts) == len(set(texts))


def test_base_recipe_is_valid():
    # Every row above is BASE with one thing broken; BASE itself must pass.
    r = parse_recipe(BASE)
    assert [name for name, _ in r.pass_list] == ["export", "quantize"]
    assert r.pass_list[0][1] == ExportConfig(opset=17)
    assert r.pass_list[1][1] == QuantizeConfig(mode="static")


def test_several_problems_are_counted():
    text = sub("model:", "modle:", BASE) + "seeed: 1\n"
    with pytest.raises(RecipeError, match=r"\(and 2 more problems\)"):
        parse_recipe(text)


def test_error_names_the_recipe_file(write_recipe):
    path = write_recipe(sub("{mode: static}", "{mod: static}"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.message.startswith(f"{path}:12:16: unknown key 'mod'")


def test_recipe_file_not_found(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml") as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.exit_code == EXIT_USAGE
    assert "compactor optimize" in info.value.hint


def test_recipe_that_is_a_folder_is_not_found(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path)


def test_recipe_not_utf8(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="cannot read recipe") as info:
        load_recipe(path)
    assert "UTF-8" in info.value.hint


# --------------------------------------------------------------------------- valid recipes


def test_relative_and_absolute_drop():
    r = parse_recipe(BASE.replace("max_accuracy_drop: 0.01", "max_accuracy_drop: 2%"))
    rel = r.targets[0].budgets.max_accuracy_drop
    assert rel == Drop(value=0.02, relative=True)
    assert rel.allowed(0.9) == pytest.approx(0.018)
    assert rel.allowed(-50.0) == pytest.approx(1.0)  # relative to the baseline's magnitude

    absolute = parse_recipe(BASE).targets[0].budgets.max_accuracy_drop
    assert absolute == Drop(value=0.01, relative=False)
    assert absolute.allowed(0.9) == 0.01
    assert absolute.allowed(123.0) == 0.01


@pytest.mark.parametrize(
    ("raw", "value", "relative"),
    [
        ("2%", 0.02, True),
        (" 0.5 % ", 0.005, True),
        (".5%", 0.005, True),
        ("0%", 0.0, True),
        (0.01, 0.01, False),
        (0, 0.0, False),
        (3, 3.0, False),
    ],
)
def test_drop_forms(raw, value, relative):
    d = Drop.model_validate(raw)
    assert d.value == pytest.approx(value)
    assert d.relative is relative


@pytest.mark.parametrize("raw", ["2", "2 %%", "-2%", "two%", "2 percent", "%"])
def test_drop_rejects(raw):
    with pytest.raises(ValidationError):
        Drop.model_validate(raw)


def test_drop_dumps_as_written():
    assert Drop.model_validate("2%").model_dump() == "2%"
    assert Drop.model_validate("0.5%").model_dump() == "0.5%"
    assert Drop.model_validate(0.01).model_dump() == 0.01


def test_latency_budget_number_is_p50():
    r = parse_recipe(BASE.replace("max_latency_ms: {p90: 5}", "max_latency_ms: 3"))
    assert r.targets[0].budgets.max_latency_ms == LatencyBudget(p50=3.0)
    assert parse_recipe(BASE).targets[0].budgets.max_latency_ms == LatencyBudget(p90=5.0)


def test_latency_budget_boolean_is_not_a_number():
    with pytest.raises(RecipeError, match="max_latency_ms"):
        parse_recipe(BASE.replace("max_latency_ms: {p90: 5}", "max_latency_ms: true"))


def test_torch_recipe_without_export_gets_a_final_export():
    r = parse_recipe(BASE.replace("passes:\n" + EXPORT_QUANTIZE, ""))
    assert r.pass_list == [("export", ExportConfig())]
    lock = yaml.safe_load(r.to_yaml())
    assert lock["passes"] == [{"export": ExportConfig().model_dump(mode="json")}]


def test_recipe_ending_on_onnx_gets_no_extra_export():
    assert [n for n, _ in parse_recipe(BASE).pass_list] == ["export", "quantize"]
    only_export = BASE.replace("  - quantize: {mode: static}\n", "")
    assert [n for n, _ in parse_recipe(only_export).pass_list] == ["export"]


def test_onnx_model_needs_no_inputs_and_no_export():
    r = parse_recipe(ONNX_BASE + "passes: [{quantize: {mode: dynamic}}]\n")
    assert r.model.kind == "onnx"
    assert r.model.inputs == ()
    assert r.pass_list == [("quantize", QuantizeConfig(mode="dynamic"))]
    assert parse_recipe(ONNX_BASE).pass_list == []


def test_dynamic_quantize_needs_no_calibration():
    text = BASE.replace("  calibration: data.py:calib_batches\n", "")
    r = parse_recipe(text.replace("{mode: static}", "{mode: dynamic}"))
    assert r.data.calibration is None


def test_pass_may_be_a_bare_name():
    r = parse_recipe(BASE.replace(EXPORT_QUANTIZE, "  - export\n  - quantize:\n"))
    assert r.pass_list == [("export", ExportConfig()), ("quantize", QuantizeConfig())]


def test_defaults():
    r = parse_recipe(ONNX_BASE)
    assert r.version == 1
    assert r.metric == "accuracy"
    assert [t.profile for t in r.targets] == ["host-cpu"]
    assert r.data.batch_size == 32
    assert r.seed == 0
    assert r.output is None


def test_custom_metric_is_a_reference():
    assert parse_recipe(ONNX_BASE + "metric: metrics.py:bleu\n").metric == "metrics.py:bleu"


def test_recipe_is_frozen():
    r = parse_recipe(BASE)
    with pytest.raises(ValidationError):
        r.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        r.model.inputs[0].name = "x"  # type: ignore[misc]


def test_paths_resolve_against_the_recipe_folder(write_recipe, tmp_path: Path):
    path = write_recipe(BASE + "output: out/toy\n", name="sub/recipe.yaml")
    r = load_recipe(path)
    assert r.source == path
    assert r.base_dir == (tmp_path / "sub").resolve()
    assert r.resolve("net.py") == (tmp_path / "sub" / "net.py").resolve()
    assert r.resolve("/abs/net.py") == Path("/abs/net.py")
    assert r.output_dir == (tmp_path / "sub" / "out" / "toy").resolve()


def test_default_output_dir_is_named_after_the_recipe(write_recipe, tmp_path: Path):
    assert load_recipe(write_recipe(BASE)).output_dir == tmp_path.resolve() / "out" / "toy"


def test_lock_round_trips():
    r = parse_recipe(BASE.replace("max_accuracy_drop: 0.01", "max_accuracy_drop: 2%"))
    locked = r.to_yaml()
    assert "calibration_method: minmax" in locked
    assert "max_accuracy_drop: 2%" in locked
    again = parse_recipe(locked)
    assert again == r
    assert again.to_yaml() == locked
