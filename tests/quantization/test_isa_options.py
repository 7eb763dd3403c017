"""int8 on the host it runs on: without VNNI (AVX2-only x86, e.g. AMD EPYC before Zen 4),
the search does not assume VNNI's settings. It times and scores 7-bit int8 weights, uint8
weights (u8u8) and full 8-bit int8 weights (ONNX Runtime's default, what a by-hand
quantize_dynamic uses), and when the fastest fails the budget, candidates as fast as it are
scored before any repair."""

from __future__ import annotations

import pytest
from toys import fake_timer, mlp_data, mlp_onnx, run_pass, toy_recipe

from compactor.quantization import isa
from compactor.quantization.candidates import Candidate
from compactor.quantization.modes import IntType, QuantMode
from compactor.quantization.search import default_space

AVX2 = ["avx", "avx2", "fma"]
AMX = ["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_without_vnni_three_weight_settings_are_tried(mode):
    choice = isa.choose(isa.detect(AVX2, "x86_64"), mode)
    assert choice.weight_options == ((IntType.INT8, True), (IntType.UINT8, False),
                                     (IntType.INT8, False))
    assert choice.reduce_range is True  # the first, safe, choice
    assert choice.to_dict()["weight_options"] == ["S8 weights 7-bit", "U8 weights",
                                                  "S8 weights"]
    assert "u8u8" in choice.reason and "saturation" in choice.reason


def test_with_vnni_or_a_pinned_setting_one_weight_setting():
    assert isa.choose(isa.detect(AMX, "x86_64"), "dynamic").weight_options == (
        (IntType.INT8, False),)
    pinned = isa.choose(isa.detect(AVX2, "x86_64"), "dynamic", reduce_range=True)
    assert pinned.weight_options == ((IntType.INT8, True),)
    u8 = isa.choose(isa.detect(AVX2, "x86_64"), "static", weight_type="uint8")
    assert u8.weight_options == ((IntType.UINT8, False),)
    assert "weight_options" not in u8.to_dict()


def test_the_space_multiplies_candidates_by_weight_settings(tmp_path):
    base = Candidate(mode=QuantMode.DYNAMIC, source=tmp_path / "m.onnx")
    space = default_space(base, ["qdq"], ["uint8"], "auto",
                          weight_options=isa.NO_VNNI_WEIGHT_OPTIONS)
    labels = [c.label for c in space.candidates()]
    assert len(labels) == 6 == len(set(labels)), labels
    assert "dynamic U8 weights per-channel all ops" in labels
    assert "dynamic S8 weights per-channel 7-bit weights all ops" in labels


def test_avx2_pass_times_every_weight_setting_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr("compactor.measure.host.isa_flags", lambda: AVX2)
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    out = run_pass(tmp_path, toy_recipe(tmp_path, mlp, mlp_data), mlp, mode="dynamic",
                   op_types="compute")
    rec = out.record
    assert rec["isa"]["int8_path"] == "avx2"
    assert len(rec["int8_choice"]["weight_options"]) == 3
    labels = {c["label"] for c in rec["search"]["candidates"]}
    assert labels == {"dynamic S8 weights per-channel 7-bit weights compute ops",
                      "dynamic U8 weights per-channel compute ops",
                      "dynamic S8 weights per-channel compute ops"}, labels
    assert not [w for w in out.warnings if "saturation" in w], out.warnings


def test_a_candidate_as_fast_as_a_failing_fastest_one_is_scored_before_repairs(
        tmp_path, monkeypatch):
    """7-bit weights miss a tight budget (drop ~2.4e-4 here, 8-bit ~1.1e-4); the 8-bit
    candidates, timed as fast, are scored before any repair, and one that holds wins with no
    repair run (before, the fallback repaired the 7-bit one)."""
    monkeypatch.setattr("compactor.measure.host.isa_flags", lambda: AVX2)
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    recipe = toy_recipe(tmp_path, mlp, mlp_data)
    out = run_pass(tmp_path, recipe, mlp, mode="dynamic", op_types="compute",
                   max_accuracy_drop=0.00018, repairs=("fallback",))
    cands = {c["label"]: c for c in out.record["search"]["candidates"]}
    seven = cands["dynamic S8 weights per-channel 7-bit weights compute ops"]
    assert not seven["search"]["ok"], seven
    assert out.record["accuracy_budget"]["met"], out.record["accuracy_budget"]
    assert out.record["reduce_range"] is False, out.record["search"]["chosen"]
    assert out.record["search"]["repairs"] == [], out.record["search"]["repairs"]


def test_avx2_weight_settings_all_build_on_a_fused_transformer(tmp_path, monkeypatch):
    """uint8 and 8-bit int8 weights build as QAttention too (ORT's transformer fusions), and
    stay close to float: none is a dead candidate on an AVX2 host."""
    pytest.importorskip("transformers")
    import numpy as np
    import onnxruntime as ort
    import toys
    from toys import text_arrays

    from compactor.data import Batch
    from compactor.exporting import ExportConfig, export_module
    from compactor.recipe import InputSpec

    def text(n: int, seed: int) -> dict[str, np.ndarray]:
        return text_arrays(n, 12, seed=seed)

    model = toys.build_tiny_bert()
    model.bert.set_attn_implementation("eager")
    arrays = text(4, seed=0)
    specs = [InputSpec(name=k, shape=("batch", "seq"), dtype="int64") for k in arrays]
    bert = tmp_path / "bert.onnx"
    export_module(model, specs, Batch(arrays), bert, ExportConfig(exporter="legacy"),
                  ["embedding"])
    monkeypatch.setattr("compactor.measure.host.isa_flags", lambda: AVX2)
    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    recipe = toy_recipe(tmp_path, bert, text, {"mode": "dynamic"}, calibration=False)
    out = run_pass(tmp_path, recipe, bert, mode="dynamic", transformer_fusion="on",
                   op_types="all", keep_float="never")
    cands = out.record["search"]["candidates"]
    assert len(cands) == 3 and not [c for c in cands if "build failed" in c.get("note", "")]
    x = text(16, seed=5)
    ref = ort.InferenceSession(str(bert)).run(None, x)[0]
    got = ort.InferenceSession(str(out.onnx_path)).run(None, x)[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert float(cos.mean()) > 0.99
