"""The quantizer's string settings as enums, so that code compares members, not strings.

Each is a ``str`` enum whose values are the recipe's words: a member equals its string,
prints as it, and JSON writes it as it, so records and locks read the same as before. The
recipe keeps its ``Literal`` fields (and their ``auto``); the quantize pass resolves them to
these members once, and everything below it takes members.
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    def __str__(self) -> str:
        return self.value


class QuantMode(_Word):
    """How activations get their int8 ranges."""

    STATIC = "static"  # calibrated once, on data.calibration
    DYNAMIC = "dynamic"  # measured on every run (ORT's DynamicQuantizeLinear)


class QuantFormat(_Word):
    """How static int8 is written into the graph."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear pairs around float ops
    QOPERATOR = "qoperator"  # fused QLinear* operators

    @property
    def label(self) -> str:
        return "QDQ" if self is QuantFormat.QDQ else "QOperator"


class IntType(_Word):
    """An 8-bit integer type for activations or weights."""

    UINT8 = "uint8"
    INT8 = "int8"

    @property
    def short(self) -> str:
        return "U8" if self is IntType.UINT8 else "S8"
