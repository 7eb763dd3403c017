"""`inspect` and `bench` on the models users bring: symbolic axes named with the --dim to
pass (no raw ONNX Runtime log lines), subgraphs counted, scalar and state inputs fed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toys import assert_clean_error, fast_profile, run_cli
from toys.foreign import dynamic_seq_onnx, if_weights_onnx, vad_onnx


@pytest.fixture
def fast(tmp_path):
    return fast_profile(tmp_path / "fast.yaml")


def _no_runtime_log(text: str) -> None:
    # ONNX Runtime's own log lines: "[E:onnxruntime:..." in red, or its error prefix
    assert "[E:onnxruntime" not in text and "\x1b[1;31m" not in text, text
    assert "[ONNXRuntimeError]" not in text, text


def test_inspect_a_model_that_fails_at_size_1_names_the_axes_and_the_dim(tmp_path, capfd):
    model = dynamic_seq_onnx(tmp_path / "dyn.onnx")
    r = run_cli("inspect", model)
    assert r.exit_code == 0, r.output
    err = capfd.readouterr()  # what ONNX Runtime's C++ logger would write goes to fd 2
    _no_runtime_log(r.output + err.err + err.out)
    assert "Concat" in r.output  # the reason, summarized in one line
    assert "symbolic axes: batch (x[0]) [batch], height (x[2]), width (x[3])" in r.output
    assert "--dim height=32 --dim width=32" in r.output, r.output
    info = json.loads(run_cli("inspect", model, "--json").output)
    assert info["macs"] is None and "--dim height=32 --dim width=32" in info["dim_hint"]
    assert [a["name"] for a in info["dynamic_axes"]] == ["batch", "height", "width"]
    # the suggested sizes do count
    ok = json.loads(run_cli("inspect", model, "--json", "--dim", "height=32",
                            "--dim", "width=32").output)
    assert ok["macs"] == 32 * 32 * 8 * 8 * 9 and ok["dim_hint"] is None


def test_inspect_counts_weights_in_if_branches(tmp_path):
    info = json.loads(run_cli("inspect", if_weights_onnx(tmp_path / "if.onnx"), "--json")
                      .output)
    assert info["params"] == 2 * 16 * 32 and info["macs"] == 16 * 32
    assert info["op_histogram"] == {"MatMul": 2, "If": 1}
    assert info["nodes"] == 3 and info["subgraph_nodes"] == 2 and info["control_flow"] == ["If"]
    assert any("one branch runs per call" in n for n in info["macs_notes"])


def test_dim_names_are_checked_with_a_did_you_mean(tmp_path, fast):
    model = dynamic_seq_onnx(tmp_path / "dyn.onnx")
    for cmd in (["inspect", model], ["bench", model, "-p", fast]):
        assert_clean_error(run_cli(*cmd, "--dim", "hieght=32"), 2,
                           "no symbolic axis or scalar input named 'hieght'",
                           "did you mean 'height'?", "batch, height, width")


def test_bench_at_size_1_fails_with_the_dim_to_pass_not_a_runtime_log(tmp_path, fast, capfd):
    model = dynamic_seq_onnx(tmp_path / "dyn.onnx")
    r = run_cli("bench", model, "-p", fast)
    error, hint = assert_clean_error(r, 2, "symbolic axes height, width at the default size 1",
                                     "Concat", "--dim height=32 --dim width=32")
    assert "compactor bench" not in hint  # not "run the command you just ran"
    err = capfd.readouterr()
    _no_runtime_log(r.output + err.err + err.out)
    ok = run_cli("bench", model, "-p", fast, "--dim", "height=32", "--dim", "width=32",
                 "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["model"]["dims"] == {"batch": 1, "height": 32, "width": 32}


def test_bench_feeds_a_scalar_input_and_a_state_with_batch_on_axis_1(tmp_path, fast):
    model = vad_onnx(tmp_path / "vad.onnx")
    fast.write_text(fast.read_text().replace("batch_sizes: [1]", "batch_sizes: [1, 4]"))
    r = run_cli("bench", model, "-p", fast, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out["latency_ms"]) == {"1", "4"}, out["latency_ms"]
    assert out["model"]["dims"] == {"B": 1}
    assert any("scalar input 'sr' (int64) fed 1; set it with --dim sr=N" in n
               for n in out["notes"]), out["notes"]
    assert out["model"]["macs"] == 576 * 128 + 128
    # --dim sets a scalar input's value
    r = run_cli("bench", model, "-p", fast, "--dim", "sr=16000", "--json")
    assert r.exit_code == 0, r.output
    assert any("'sr' (int64) fed 16000" in n for n in json.loads(r.output)["notes"])


def test_random_feeds_put_the_batch_on_the_state_axis_named_like_it():
    from compactor.measure.bench import batch_axes, random_feeds

    specs = [("input", ["B", 576], np.float32), ("state", [2, "B", 128], np.float32),
             ("sr", [], np.int64), ("h", [2, "batch_size", 8], np.float32),
             ("table", [5, 3], np.float32)]
    assert batch_axes(specs) == {"input": 0, "state": 1, "sr": None, "h": 1, "table": None}
    feeds, used = random_feeds(specs, 8, {})
    assert feeds["state"].shape == (2, 8, 128) and feeds["h"].shape == (2, 8, 8)
    assert feeds["sr"].shape == () and feeds["sr"].dtype == np.int64 and feeds["sr"] == 1
    assert feeds["table"].shape == (5, 3) and used == {"B": 8, "batch_size": 8}


def test_placeholder_axis_names_are_unnamed_and_set_by_input_and_axis():
    """Paddle writes '?' for every unknown axis (PP-OCR's models): two axes both '?' are not
    one axis, so each is set as <input>_dim<axis>; a -1 size is a dynamic axis too."""
    from compactor.measure.bench import random_feeds
    from compactor.measure.shapes import dynamic_axes

    specs = [("x", [None, 3, "?", "?"], np.float32)]
    assert [(a.key, a.named, a.batch) for a in dynamic_axes(specs)] == [
        ("x_dim0", False, True), ("x_dim2", False, False), ("x_dim3", False, False)]
    feeds, used = random_feeds(specs, 2, {"x_dim2": 48, "x_dim3": 320})
    assert feeds["x"].shape == (2, 3, 48, 320)
    assert used == {"x_dim0": 2, "x_dim2": 48, "x_dim3": 320}
