"""Foreign graphs that broke the int8 build or its repairs (found on the real-model zoo),
each reproduced on a toy of the same shape:

- magika: a Gemm whose bias is a ``[1, N]`` row made ORT's per-channel static quantizer
  fail ("The truth value of an array with more than one element is ambiguous"), and the
  pass stopped (exit 4) instead of building what it could;
- the PP-OCR recognizer: batches of different widths made ORT's histogram calibration
  (the ``calibration`` repair's entropy and percentile methods) fail;
- subgraphs: the op mix and the int8 summary counted the main graph only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from toys import fake_timer, run_pass, toy_recipe, write_recipe
from toys.foreign import (
    FOREIGN,
    if_weights_onnx,
    row_bias_data,
    row_bias_gemm_onnx,
    text_line_calibration,
    text_line_onnx,
)

from compactor.errors import PassError
from compactor.passes.quantize import _int8_summary
from compactor.quantization import prepare
from compactor.quantization.candidates import Calibration, Candidate, build
from compactor.quantization.modes import QuantFormat


@pytest.fixture
def no_timing(monkeypatch):
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())


def _run(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


# --------------------------------------------------------------------------- row bias


def test_a_row_or_scalar_gemm_bias_becomes_the_vector_it_broadcasts_to(tmp_path):
    src = row_bias_gemm_onnx(tmp_path / "m.onnx")
    record: dict = {}
    dst = prepare.gemm_bias_as_vector(src, tmp_path / "v.onnx", record)
    assert dst != src and record["gemm_bias_as_vector"] == 2
    m = onnx.load(str(dst))
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    biases = [dims[n.input[2]] for n in m.graph.node if n.op_type == "Gemm"]
    assert biases == [[32], [8]], biases
    assert not {"B1", "B2"} & set(dims)  # the old row and scalar are gone
    feed = row_bias_data(5, seed=3)
    np.testing.assert_array_equal(_run(src, feed), _run(dst, feed))
    # a model with nothing to change is returned as it is
    assert prepare.gemm_bias_as_vector(dst, tmp_path / "again.onnx", {}) == dst


@pytest.mark.parametrize("fmt", list(QuantFormat))
def test_per_channel_static_int8_builds_on_a_row_bias_gemm(tmp_path, fmt):
    src = prepare.gemm_bias_as_vector(row_bias_gemm_onnx(tmp_path / "m.onnx"),
                                      tmp_path / "v.onnx", {})
    cal = Calibration([row_bias_data(16, seed=i) for i in range(4)], 64, tmp_path)
    out = build(Candidate(mode="static", source=src, format=fmt, per_channel=True),
                tmp_path / "q.onnx", cal)
    feed = row_bias_data(32, seed=9)
    ref, got = _run(src, feed), _run(out, feed)
    sqnr = 10 * np.log10((ref**2).sum() / max(((ref - got) ** 2).sum(), 1e-30))
    assert sqnr > 20, f"int8 SQNR {sqnr:.1f} dB"


def test_the_pass_quantizes_a_row_bias_gemm_per_channel(tmp_path, no_timing):
    """magika's shape of problem, end to end: it finished with exit 4 before."""
    model = row_bias_gemm_onnx(tmp_path / "m.onnx")
    recipe = toy_recipe(tmp_path, model, row_bias_data)
    rec = run_pass(tmp_path, recipe, model, mode="static").record
    assert rec["gemm_bias_as_vector"] == 2
    assert rec["per_channel"] is True
    built = [c for c in rec["search"]["candidates"] if "build failed" not in c.get("note", "")]
    assert len(built) == len(rec["search"]["candidates"]), rec["search"]["candidates"]


# --------------------------------------------------------------------------- failed builds


def _failing_build(when):
    from compactor.quantization import search

    real = search.build

    def fake(c, dst, calibration, excluded_types=()):
        if when(c):
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous")
        return real(c, dst, calibration, excluded_types)
    return fake


def test_a_candidate_that_fails_to_build_is_logged_and_skipped(tmp_path, monkeypatch,
                                                               no_timing):
    monkeypatch.setattr("compactor.quantization.search.build",
                        _failing_build(lambda c: c.format == QuantFormat.QOPERATOR))
    model = row_bias_gemm_onnx(tmp_path / "m.onnx")
    recipe = toy_recipe(tmp_path, model, row_bias_data)
    rec = run_pass(tmp_path, recipe, model, mode="static", activation_type="uint8",
                   op_types="all").record
    assert rec["format"] == "qdq"
    failed = [c for c in rec["search"]["candidates"] if c.get("note", "").startswith(
        "build failed")]
    assert [c["label"] for c in failed] == ["static QOperator U8S8 per-channel all ops"]
    assert "truth value of an array" in failed[0]["note"]


def test_when_every_per_channel_candidate_fails_per_tensor_ones_are_tried(
        tmp_path, monkeypatch, no_timing):
    monkeypatch.setattr("compactor.quantization.search.build",
                        _failing_build(lambda c: c.per_channel))
    model = row_bias_gemm_onnx(tmp_path / "m.onnx")
    recipe = toy_recipe(tmp_path, model, row_bias_data)
    out = run_pass(tmp_path, recipe, model, mode="static", activation_type="uint8",
                   op_types="all")
    assert out.record["per_channel"] is False
    notes = {c["label"]: c.get("note", "") for c in out.record["search"]["candidates"]}
    assert all(n.startswith("build failed") for k, n in notes.items() if "per-channel" in k)
    assert any("per-tensor weights were used instead" in w for w in out.warnings), out.warnings


def test_the_pass_fails_only_when_no_candidate_builds_and_says_so(tmp_path, monkeypatch,
                                                                  no_timing):
    monkeypatch.setattr("compactor.quantization.search.build",
                        _failing_build(lambda c: True))
    model = row_bias_gemm_onnx(tmp_path / "m.onnx")
    recipe = toy_recipe(tmp_path, model, row_bias_data)
    with pytest.raises(PassError) as err:
        run_pass(tmp_path, recipe, model, mode="static", activation_type="uint8",
                 op_types="all")
    assert err.value.exit_code == 4
    # two per-channel candidates (QDQ, QOperator), then the same two per-tensor
    assert "none of the 4 int8 candidate(s) could be built" in err.value.message
    assert "truth value of an array" in err.value.message


# --------------------------------------------------------------------------- widths


def test_histogram_calibration_takes_batches_of_different_widths(tmp_path):
    # opset 12, upgraded as the pass does (per-channel int8 needs 13)
    src = prepare.ensure_opset(text_line_onnx(tmp_path / "m.onnx"), tmp_path / "13.onnx", {})
    feeds = [b[0] for b in text_line_calibration()]
    cal = Calibration(feeds, 36, tmp_path)
    assert not cal.uniform
    for method in ("entropy", "percentile"):
        out = build(Candidate(mode="static", source=src, calibration_method=method),
                    tmp_path / f"{method}.onnx", cal)
        x = feeds[3]
        ref, got = _run(src, x), _run(out, x)
        sqnr = 10 * np.log10((ref**2).sum() / max(((ref - got) ** 2).sum(), 1e-30))
        assert sqnr > 15, f"{method}: int8 SQNR {sqnr:.1f} dB"


def test_the_calibration_repair_applies_to_batches_of_different_widths(tmp_path, no_timing):
    """The PP-OCR recognizer's shape of problem: the repair was 'not applied: ValueError:
    setting an array element with a sequence ... inhomogeneous shape'."""
    model = text_line_onnx(tmp_path / "m.onnx")
    recipe = write_recipe(
        tmp_path, model={"onnx": str(model)}, metric="fidelity",
        data={"eval": f"{FOREIGN}:text_line_eval",
              "calibration": f"{FOREIGN}:text_line_calibration"},
        passes=[{"quantize": {}}])
    rec = run_pass(tmp_path, recipe, model, mode="static", search_speed=False,
                   max_accuracy_drop=1e-9, repairs=["calibration"]).record
    tried = {r["repair"]: r for r in rec["search"]["repairs"]}
    assert set(tried) == {"calibration: percentile", "calibration: entropy"}, tried
    assert all("error" not in r and "label" in r for r in tried.values()), tried
    assert "repairs_not_applied" not in rec


# --------------------------------------------------------------------------- subgraphs


def test_the_op_mix_counts_weights_in_if_branches(tmp_path):
    model = onnx.load(str(if_weights_onnx(tmp_path / "m.onnx")))
    mix = prepare.op_mix(model, {"x": (4, 16), "flag": ()})
    assert mix.shares == {"MatMul": 1.0}, mix.to_dict()  # not under "?"
    mode, _ = prepare.choose_mode(mix, has_calibration=True)
    assert mode.value == "dynamic"


def test_the_int8_summary_counts_subgraphs(tmp_path):
    import onnxruntime.quantization as oq

    src = if_weights_onnx(tmp_path / "m.onnx")
    dst = tmp_path / "q.onnx"
    oq.quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"],
                        extra_options={"EnableSubgraph": True})
    summary = _int8_summary(dst)
    # both branches' weights are int8, and their MatMulInteger ops are counted
    assert summary["int8_weight_tensors"] == 2, summary
    assert summary["quantization_ops"].get("MatMulInteger") == 2, summary
