"""`compactor check` on artifacts that came from elsewhere: the manifest is validated
against its schema, every path stays inside the artifact, sizes are checked before hashing,
figures taken from the manifest are bounded, and every string from it is escaped before it
reaches a terminal, a CI log, a JUnit file or a report."""

from __future__ import annotations

import json
import os
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
import toys
from toys import assert_clean_error, run_cli, write_cnn_npz

from compactor.manifest import Manifest, load_manifest, visible

PHONE_PROFILE = """\
name: phone
class: mobile
execution_providers: [CUDAExecutionProvider]
format: ort
estimates: {power_w: 5, peak_gflops_fp32: 500, peak_gops_int8: 2000, memory_bandwidth_gbs: 30}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real artifact from a fast run: no passes, a measured target with every budget, and
    a target this host cannot measure whose profile asks for model.ort (a deployable)."""
    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    folder = tmp_path_factory.mktemp("untrusted")
    cnn = toys.export_cnn_onnx(folder / "cnn.onnx")
    write_cnn_npz(folder / "eval.npz", n=32)
    (folder / "phone.yaml").write_text(PHONE_PROFILE, encoding="utf-8")
    recipe = toys.write_recipe(
        folder,
        model={"onnx": str(cnn)},
        data={"eval": "eval.npz", "batch_size": 32},
        passes=[],
        targets=[
            {
                "profile": "fast.yaml",
                "budgets": {
                    "max_size_mb": 1,
                    "max_latency_ms": {"p90": 1000},
                    "max_memory_mb": 1000,
                    "max_accuracy_drop": "2%",
                    "min_speedup": 0.01,
                },
            },
            {"profile": "phone.yaml", "budgets": {"max_latency_ms": {"p50": 10}}},
        ],
    )
    result = optimize(load_recipe(recipe))
    assert result.passed, result.manifest["targets"]
    return result.artifact


@pytest.fixture
def hostile(artifact, tmp_path) -> Callable[..., Path]:
    """A copy of the artifact whose manifest ``edit`` changed (in place, on the dict)."""

    def make(edit: Callable[[dict], object] | None = None, name: str = "copy") -> Path:
        return toys.edited_copy(artifact, tmp_path / name, edit)

    return make


def check(*args, env=None):
    from click.testing import CliRunner

    from compactor.cli import cli

    return CliRunner().invoke(cli, ["check", *map(str, args)], env=env)


def _set(path: str, value: object) -> Callable[[dict], None]:
    """An edit that sets ``a.b.0.c`` in the manifest."""

    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


# --------------------------------------------------------------------------- the schema


def test_the_manifest_optimize_writes_is_what_the_schema_reads(artifact):
    """Writer and reader cannot drift: a real run's manifest validates strictly and
    round-trips unchanged."""
    text = (artifact / "manifest.json").read_text(encoding="utf-8")
    m = load_manifest(artifact)
    assert isinstance(m, Manifest) and m.deployables and m.targets[0].budgets is not None
    assert m.targets[0].settings is not None and m.targets[0].settings.name == "fast"
    assert m.to_dict() == json.loads(text)
    assert set(m.hashed_files()) == {"model.onnx", "model.ort", "model.required_operators.config"}
    r = check(artifact, "--json")
    assert r.exit_code == 0, r.output
    assert [v["status"] for v in json.loads(r.stdout)["integrity"]] == ["pass"] * 3


MALFORMED = [
    ("model.file an int", _set("model.file", 5), "model.file"),
    ("model a string", _set("model", "model.onnx"), "model:"),
    ("empty stages", _set("stages", []), "stages:"),
    ("size a string", _set("stages.0.size_bytes", "big"), "stages.0.size_bytes"),
    ("size a numeric string", _set("model.size_bytes", "105513"), "model.size_bytes"),
    ("targets a string", _set("targets", "fast"), "targets:"),
    (
        "a budget value a string",
        _set("targets.0.budgets.max_size_mb", "lots"),
        "targets.0.budgets.max_size_mb",
    ),
    (
        "a verdict status unknown",
        _set("targets.0.verdicts.0.status", "ok"),
        "targets.0.verdicts.0.status",
    ),
    (
        "a timing setting a string",
        _set("targets.0.settings.timing.max_time_s", "long"),
        "targets.0.settings.timing.max_time_s",
    ),
    (
        "a latency a string",
        _set("stages.0.latency_ms.fast.1.p50", "fast"),
        "stages.0.latency_ms.fast.1.p50",
    ),
    (
        "peak memory a list",
        _set("stages.0.runtime.fast.peak_rss_mb", [1]),
        "stages.0.runtime.fast.peak_rss_mb",
    ),
    ("a hash that is not sha256", _set("model.sha256", "abc"), "model.sha256"),
    (
        "an unknown key where files are verified",
        _set("model.external_data", ["w.bin"]),
        "model.external_data",
    ),
    ("schema_version missing", lambda m: m.pop("schema_version"), "schema_version"),
    ("schema_version a string", _set("schema_version", "1"), "schema_version"),
    (
        "an absurd input dimension",
        _set("model.inputs.0.shape", [1, 10**12]),
        "model.inputs.0.shape",
    ),
    ("a model larger than any ONNX file", _set("model.size_bytes", 200 << 30), "model.size_bytes"),
]


@pytest.mark.parametrize(
    ("edit", "field"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_manifest_is_damaged_not_a_crash(hostile, edit, field):
    r = check(hostile(edit))
    assert_clean_error(r, 1, "artifact damaged", field)
    assert "internal error" not in r.output


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "invalid json"),
        ("[1, 2]", "not a json object"),
        ("[" * 100_000 + "]" * 100_000, "invalid json"),
        ('{"schema_version": 1, "n": 1' + "0" * 5000 + "}", "invalid json"),
        (b"\xff\xfe".decode("latin-1"), "utf-8"),
    ],
)
def test_manifest_text_that_is_not_a_manifest(hostile, text, why):
    copy = hostile()
    data = text.encode("latin-1") if why == "utf-8" else text.encode("utf-8")
    (copy / "manifest.json").write_bytes(data)
    r = check(copy)
    assert_clean_error(r, 1, "artifact damaged", why)


def test_another_schema_version_is_named(hostile):
    assert_clean_error(
        check(hostile(_set("schema_version", 7))), 2, "schema version 7", "reads version 1"
    )


def test_against_an_older_manifest_with_wrong_types(artifact, hostile, tmp_path):
    old = hostile(_set("stages.0.metric", "high"), name="old")
    r = check(artifact, "--against", old)
    assert_clean_error(r, 1, "--against", "artifact damaged", "stages.0.metric")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    assert_clean_error(
        check(artifact, "--against", tmp_path / "broken.json"), 1, "--against", "invalid json"
    )


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (_set("model.file", "/etc/hostname"), ("model.file", "absolute path")),
        (_set("model.file", "../../outside.onnx"), ("model.file", "..")),
        (_set("model.file", "sub/../../outside.onnx"), ("model.file", "..")),
        (_set("model.file", "C:\\Windows\\x.onnx"), ("model.file", "absolute path")),
        (
            lambda m: m["deployables"][0]["files"].update(
                {"../secret.txt": m["deployables"][0]["files"]["model.ort"]}
            ),
            ("deployables.0.files", ".."),
        ),
        (_set("partition", {"files": ["../head.onnx"]}), ("partition.files.0", "..")),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "windows-drive", "deployable", "partition"],
)
def test_paths_in_the_manifest_stay_inside_the_artifact(hostile, edit, fragments):
    assert_clean_error(check(hostile(edit)), 1, "artifact damaged", *fragments)
    assert_clean_error(
        check(hostile(edit, name="again"), "--remeasure"), 1, "artifact damaged", *fragments
    )


def test_a_symlinked_model_leaving_the_artifact_is_refused(hostile, tmp_path):
    copy = hostile()
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(copy / "model.onnx", outside)  # same bytes: the hash would match
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(outside)
    assert_clean_error(
        check(copy), 1, "artifact damaged", "model.file", "leads out of the artifact folder"
    )
    # a link that stays inside the folder is fine
    (copy / "model.onnx").unlink()
    shutil.copyfile(outside, copy / "real.onnx")
    (copy / "model.onnx").symlink_to("real.onnx")
    assert check(copy).exit_code == 0


def test_a_symlinked_manifest_leaving_the_artifact_is_refused(hostile, tmp_path):
    copy = hostile()
    outside = tmp_path / "manifest-elsewhere.json"
    shutil.move(copy / "manifest.json", outside)
    (copy / "manifest.json").symlink_to(outside)
    assert_clean_error(
        check(copy), 1, "artifact damaged", "manifest.json", "leads out of the artifact folder"
    )


def test_a_profile_file_named_by_the_artifact_is_never_read(hostile, tmp_path):
    """Old manifests (no recorded settings) name a profile; a file there is not read —
    here it would fail to parse, exit 2, if it were."""
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: [unterminated", encoding="utf-8")

    def edit(m: dict) -> None:
        m["targets"][0].pop("settings")
        m["targets"][0]["profile"] = str(evil)

    r = check(hostile(edit))
    assert_clean_error(r, 1, "artifact damaged", "targets.0.settings", "not a built-in")

    def relative(m: dict) -> None:
        m["targets"][0].pop("settings")
        m["targets"][0]["profile"] = "../evil.yaml"

    assert_clean_error(check(hostile(relative, name="rel")), 1, "artifact damaged")


def test_a_hostile_lock_file_is_damage_and_runs_nothing(hostile, tmp_path):
    """Manifests without target budgets read them from recipe.lock.yaml: a python tag there
    is refused (never executed), without a traceback."""
    marker = tmp_path / "pwned"
    copy = hostile(lambda m: [t.pop("budgets") for t in m["targets"]])
    (copy / "recipe.lock.yaml").write_text(
        f"targets: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8"
    )
    assert_clean_error(check(copy), 1, "artifact damaged", "recipe.lock.yaml")
    assert not marker.exists()


# --------------------------------------------------------------------------- bounds


def test_a_huge_sparse_model_fails_before_it_is_read(hostile):
    copy = hostile()
    os.truncate(copy / "model.onnx", 200 << 30)  # sparse: costs no disk
    t0 = time.perf_counter()
    r = check(copy, "--remeasure")
    assert time.perf_counter() - t0 < 10
    assert_clean_error(r, 1, "model.onnx", "does not match the manifest", "not hashed")


def test_a_huge_manifest_is_refused_before_it_is_read(hostile):
    copy = hostile()
    os.truncate(copy / "manifest.json", 1 << 40)
    t0 = time.perf_counter()
    assert_clean_error(check(copy), 1, "artifact damaged", "manifest.json", "bytes")
    assert time.perf_counter() - t0 < 10


def test_remeasure_bounds_the_timing_an_artifact_asks_for(hostile, monkeypatch):
    """A manifest asking for 31 years of timing, a trillion warm-up runs and 30 batch sizes
    is measured within the caps, and says so."""
    import compactor.check as check_mod

    def edit(m: dict) -> None:
        s = m["targets"][0]["settings"]
        s["timing"].update(max_time_s=1e9, min_time_s=1e9, warmup=10**12, warmup_s=1e9)
        s["batch_sizes"] = list(range(1, 31))

    copy = hostile(edit)
    from compactor.profiles import Profile

    entry = load_manifest(copy).targets[0]
    bounded, notes = check_mod._bounded(entry.settings)
    assert isinstance(bounded, Profile)
    assert bounded.timing.max_time_s == check_mod.MAX_TIME_S <= 60
    assert bounded.timing.warmup == check_mod.MAX_WARMUP_RUNS
    assert len(bounded.batch_sizes) == check_mod.MAX_BATCH_SIZES and len(notes) == 2

    monkeypatch.setattr(check_mod, "MAX_TIME_S", 0.05)
    monkeypatch.setattr(check_mod, "MAX_WARMUP_RUNS", 2)
    monkeypatch.setattr(check_mod, "MAX_BATCH_SIZES", 2)
    t0 = time.perf_counter()
    r = check(copy, "--remeasure", "--target", "fast", "--json")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 60
    (t,) = json.loads(r.stdout)["targets"]
    assert any("were capped" in n for n in t["notes"])
    assert any("first 2 of the artifact's 30 batch sizes" in n for n in t["notes"])


def test_bench_refuses_an_input_too_large_to_feed(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1_600_000_000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1_600_000_000])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "big.onnx"
    )
    t0 = time.perf_counter()
    r = run_cli("bench", tmp_path / "big.onnx")
    assert_clean_error(r, 2, "6.4 GB", "'x'", "--dim")
    assert time.perf_counter() - t0 < 20


# --------------------------------------------------------------------------- escaping


def test_visible_shows_control_characters_and_breaks_ci_commands():
    assert visible("a\nb\r\x1b[31m\x07") == "a\\nb\\r\\x1b[31m\\x07"
    assert visible("\u202eevil") == "\\u202eevil"
    assert "::" not in visible("x ::error::y") and "##[" not in visible("##[error]x")
    assert visible("plain text: ok [x]") == "plain text: ok [x]"


def test_rich_markup_from_the_artifact_prints_literally(hostile):
    def edit(m: dict) -> None:
        m["name"] = "[/]"
        m["targets"][0]["notes"] = ["[green]spoofed-ok[/]", "[bold red]FAIL[/] [link=x]y[/]"]

    r = check(hostile(edit))
    assert r.exit_code == 0, r.output
    assert "[/]: check" in r.stdout
    assert "[green]spoofed-ok[/]" in r.stdout
    assert "[bold red]FAIL[/] [link=x]y[/]" in r.stdout


def test_ansi_escapes_from_the_artifact_never_reach_the_terminal(hostile):
    def edit(m: dict) -> None:
        m["name"] = "toy\x1b]0;title\x07"
        m["targets"][0]["notes"] = ["\x1b[2J\x1b[31mred\x1b[0m", "bidi \u202eoverride"]

    r = check(hostile(edit))
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\u202e" not in r.output
    assert "\\x1b[31mred" in r.stdout and "\\u202eoverride" in r.stdout


def test_a_note_cannot_start_a_github_workflow_command(hostile, tmp_path):
    long = "padding " * 30 + "::error::wrapped-injection"

    def edit(m: dict) -> None:
        m["name"] = "toy\n::error::name-injection"
        m["targets"][0]["notes"] = ["fine\n::error::note-injection", long, "##[error]old-syntax"]

    summary = tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    r = check(
        hostile(edit), "--budget", "max_size_mb=0.001", "--junit", tmp_path / "j.xml", env=env
    )
    assert r.exit_code == 1, r.output
    commands = [ln.strip() for ln in r.output.splitlines() if ln.strip().startswith(("::", "##["))]
    assert commands, r.output  # compactor's own annotations are there
    for ln in commands:
        assert ln.startswith(("::error title=compactor ", "::warning title=compactor ")), ln
        assert ln.count("::") == 2  # the command's own; the artifact's text adds none
    assert "note-injection" in r.stdout  # shown, as text
    text = summary.read_text(encoding="utf-8")
    assert not any(ln.startswith("::") for ln in text.splitlines())
    ET.parse(tmp_path / "j.xml")  # still well-formed XML


def test_junit_xml_stays_well_formed_with_control_characters(hostile, tmp_path):
    def edit(m: dict) -> None:
        m["name"] = "toy\x1b\x00\x0b"

    r = check(hostile(edit), "--junit", tmp_path / "j.xml")
    assert r.exit_code == 0, r.output
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("name") == "compactor check toy\\x1b\\x00\\x0b"


def test_reports_escape_text_from_the_manifest(artifact):
    from compactor.manifest import Manifest
    from compactor.report.html import render_html
    from compactor.report.markdown import render_markdown

    m = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    attack = "<script>alert(1)</script> | `code` [link](http://x) \x1b[31m\n# heading"
    m["name"] = attack
    m["metric"]["name"] = attack
    m["host"]["cpu"] = attack
    m["targets"][0]["notes"] = [attack]
    for t in m["targets"]:
        t["verdicts"][0]["detail"] = attack
    html = render_html(Manifest.model_validate(m))
    assert "<script>" not in html and "\x1b" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = render_markdown(Manifest.model_validate(m))
    assert "<script>" not in md and "\x1b" not in md
    assert not any(ln.startswith("# heading") for ln in md.splitlines())
    assert "\\[link\\](http://x)" in md and "\\`code\\`" in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    widths = {ln.replace("\\|", "").count("|") for ln in table_rows}
    assert len(widths) <= 2  # the stage table and the budget table, no cell broke out
