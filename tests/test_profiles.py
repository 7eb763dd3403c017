"""Hardware profiles: the built-in YAMLs, profile files, their errors, `compactor profiles`."""

from __future__ import annotations

import pytest
import yaml
from toys import assert_clean_error, run_cli

from compactor.errors import RecipeError
from compactor.profiles import Profile, builtin_names, load_profile

CLASSES = {"host-cpu": "host", "cloud-cpu": "cloud", "cloud-gpu": "cloud", "edge-cpu": "edge",
           "mobile": "mobile"}


def test_every_deployment_class_has_a_builtin_profile():
    assert set(CLASSES) <= set(builtin_names())


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_profile_is_complete(name):
    p = load_profile(name)
    assert p.name == name
    assert p.execution_providers and p.batch_sizes
    assert p.timing.target_ci > 0
    if name in CLASSES:
        assert p.target_class == CLASSES[name]
    if p.target_class != "host":
        # Targets other than this machine carry the figures estimates and the split
        # planner use.
        e = p.estimates
        assert e.power_w and e.peak_gflops_fp32 and e.peak_gops_int8 and e.memory_bandwidth_gbs
        assert p.network.uplink_mbps and p.network.rtt_ms is not None
        assert p.limits.memory_mb


def test_builtin_profiles_say_what_the_issue_asks():
    cloud_cpu = load_profile("cloud-cpu")
    assert cloud_cpu.batch_sizes == (1, 8, 32) and cloud_cpu.intra_op_threads > 1
    gpu = load_profile("cloud-gpu")
    assert gpu.execution_providers[:2] == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert gpu.preferred_precision == "fp16" and gpu.estimates.peak_gflops_fp16
    edge = load_profile("edge-cpu")
    assert (edge.intra_op_threads, edge.limits.memory_mb, edge.estimates.power_w) == (4, 2048, 6)
    mobile = load_profile("mobile")
    assert (mobile.intra_op_threads, mobile.limits.memory_mb, mobile.estimates.power_w) == (
        2, 512, 3)
    assert mobile.format == "ort"


def test_unknown_profile_suggests_and_lists():
    with pytest.raises(RecipeError) as e:
        load_profile("edge-cpus")
    assert "unknown profile 'edge-cpus'" in e.value.message
    assert "did you mean 'edge-cpu'?" in e.value.hint
    for name in CLASSES:
        assert name in e.value.hint


def test_profile_file_next_to_the_recipe(tmp_path):
    (tmp_path / "board.yaml").write_text(
        "name: board\nclass: edge\nintra_op_threads: 1\nbatch_sizes: [4, 1, 4]\n",
        encoding="utf-8")
    p = load_profile("board.yaml", tmp_path)
    assert p.name == "board" and p.target_class == "edge"
    assert p.batch_sizes == (1, 4)  # sorted, duplicates dropped
    with pytest.raises(RecipeError, match="profile file not found"):
        load_profile("nope.yaml", tmp_path)


BAD_PROFILES = [
    ("name: x\nclass: edge\nthreads: 4\n", "unknown key 'threads'", "allowed keys"),
    ("name: x\nclass: edge\nlimits: {memroy_mb: 5}\n", "unknown key 'limits.memroy_mb'",
     "did you mean 'memory_mb'?"),
    ("name: x\nclass: laptop\n", "class", "docs/profiles.md"),
    ("name: x\nclass: edge\nbatch_sizes: [0]\n", "batch sizes must be positive", ""),
    ("name: x\nclass: edge\nexecution_providers: [CUDA]\n",
     "'CUDA' is not an ONNX Runtime execution provider", ""),
    ("name: x\nclass: edge\nintra_op_threads: many\n", "intra_op_threads", "'many'"),
    ("name: x\nclass: edge\ntiming: {target_ci: 0}\n", "timing.target_ci", ""),
    ("class: edge\n", "name: Field required", ""),
    ("- just\n- a list\n", "must be a YAML mapping", ""),
    ("name: [unclosed\n", "malformed YAML", ""),
]


@pytest.mark.parametrize(("text", "message", "more"), BAD_PROFILES)
def test_bad_profile_file(tmp_path, text, message, more):
    (tmp_path / "p.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as e:
        load_profile("p.yaml", tmp_path)
    assert message in e.value.message
    assert more in f"{e.value.message} {e.value.hint}"


def test_bad_profile_file_is_one_clean_cli_error(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nclass: edge\nthreads: 4\n", encoding="utf-8")
    assert_clean_error(run_cli("profiles", "show", bad), 2, "unknown key 'threads'")


def test_profiles_list_and_show():
    r = run_cli("profiles", "list")
    assert r.exit_code == 0, r.output
    for name in CLASSES:
        assert name in r.stdout
    r = run_cli("profiles", "show", "mobile")
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert Profile.model_validate(shown) == load_profile("mobile")
    assert_clean_error(run_cli("profiles", "show", "mobil"), 2, "did you mean 'mobile'?")
