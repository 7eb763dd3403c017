"""compactor/quantization/modes.py: the quantizer's settings as str enums, resolved once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from compactor.quantization.candidates import Candidate
from compactor.quantization.modes import IntType, QuantFormat, QuantMode
from compactor.quantization.prepare import OpMix, resolve_mode


def test_members_read_and_write_as_the_recipe_words():
    for member, word in (
        (QuantMode.STATIC, "static"),
        (QuantMode.DYNAMIC, "dynamic"),
        (QuantFormat.QDQ, "qdq"),
        (QuantFormat.QOPERATOR, "qoperator"),
        (IntType.UINT8, "uint8"),
        (IntType.INT8, "int8"),
    ):
        assert member == word and str(member) == word and f"{member}" == word
        assert json.dumps({"k": member}) == json.dumps({"k": word})
        assert type(member)(word) is member


def test_candidate_takes_the_words_and_holds_members():
    c = Candidate(
        mode="static",
        source=Path("m.onnx"),
        format="qoperator",
        activation_type="int8",
        weight_type="uint8",
    )
    assert c.mode is QuantMode.STATIC and c.format is QuantFormat.QOPERATOR
    assert c.activation_type is IntType.INT8 and c.weight_type is IntType.UINT8
    assert c.label.startswith("static QOperator S8U8 per-channel")
    assert c.replace(format="qdq").format is QuantFormat.QDQ
    # the record keeps plain strings (YAML-safe), as before the enums
    assert all(
        type(v) is str
        for k, v in c.settings().items()
        if k in ("mode", "format", "activation_type", "weight_type")
    )
    with pytest.raises(ValueError):
        Candidate(mode="auto", source=Path("m.onnx"))  # auto is resolved before this


def test_candidate_key_is_what_it_was_with_strings():
    c = Candidate(mode=QuantMode.DYNAMIC, source=Path("m.onnx"), exclude=("a",))
    as_words = tuple(v.value if hasattr(v, "value") else v for v in dataclasses.astuple(c))
    assert c.key == hashlib.sha1(repr(as_words).encode()).hexdigest()[:10]


def test_resolve_mode_once():
    transformer = OpMix({"MatMul": 0.9, "Gemm": 0.1}, "MACs", softmax=2)
    cnn = OpMix({"Conv": 0.95, "Gemm": 0.05}, "MACs", softmax=0)
    assert resolve_mode("static", transformer, True) == (QuantMode.STATIC, "set in the recipe")
    assert resolve_mode("dynamic", cnn, True)[0] is QuantMode.DYNAMIC
    mode, why = resolve_mode("auto", transformer, True)
    assert mode is QuantMode.DYNAMIC and "MatMul-dominated" in why
    assert resolve_mode("auto", cnn, True)[0] is QuantMode.STATIC
    mode, why = resolve_mode("auto", cnn, False)
    assert mode is QuantMode.DYNAMIC and "no data.calibration" in why
