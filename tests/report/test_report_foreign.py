"""Both reports say which compute-heavy nodes stayed float (an LSTM, a branch MatMul) and
which repairs could not apply, instead of "every Conv/MatMul/Gemm is int8"."""

from __future__ import annotations

from compactor.manifest import FloatNode, Manifest, PrecisionRecord, StageRecord
from compactor.report.html import _precision
from compactor.report.markdown import _precision_facts, quantize_section

SKIPPED = [{"repair": "fallback", "reason": "ranking the nodes by sensitivity failed: x"}]


def _final(heavy: list[FloatNode]) -> StageRecord:
    return StageRecord.model_construct(
        name="quantize", record={"repairs_not_applied": SKIPPED},
        precision=PrecisionRecord(quantized=True, int8_ops={"QLinearConv": 1},
                                  float_heavy_nodes=heavy, int8_macs_share=0.02),
        warnings=["repair 'fallback' could not apply: ranking failed"])


def test_an_lstm_that_stayed_float_is_named_in_both_reports():
    final = _final([FloatNode(node="lstm", op="LSTM", macs=30720, macs_share=0.98)])
    (md,) = _precision_facts(final, str)
    assert "stayed float: lstm (LSTM)" in md and "every" not in md, md
    html = _precision(Manifest.model_construct(stages=[final]))
    assert "lstm" in html and "LSTM" in html and "runs in int8" not in html


def test_all_int8_wording_names_recurrent_ops_too():
    (md,) = _precision_facts(_final([]), str)
    assert "every compute-heavy node (Conv/MatMul/Gemm/LSTM/GRU/RNN) is int8" in md


def test_repairs_that_could_not_apply_are_in_both_reports():
    md = "\n".join(quantize_section({"search": {"chosen": "x"},
                                     "repairs_not_applied": SKIPPED}))
    assert "repair **fallback** could not apply: ranking the nodes by sensitivity" in md
    html = _precision(Manifest.model_construct(stages=[_final([])]))
    assert "Repairs that could not apply" in html and "ranking the nodes by" in html
