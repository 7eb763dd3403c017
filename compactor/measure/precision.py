"""Which nodes of a model run in int8 and which stayed in float.

A node counts as int8 when it is an integer operator (QLinearConv, MatMulInteger, ...) or,
in QDQ form, when its data input and (for Conv/MatMul/Gemm) its weight come from
DequantizeLinear nodes: that is the pattern ONNX Runtime fuses into an int8 kernel.
Subgraphs (``If`` branches, ``Loop``/``Scan`` bodies) are included, their nodes keyed as
:func:`compactor.measure.macs.iter_nodes` keys them. Recurrent ops (LSTM/GRU/RNN) count as
compute-heavy: static int8 leaves them float, and the summary names them when it does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from compactor.measure.macs import _HEAVY, all_graphs, iter_nodes

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
INT8_OPS = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QAttention", "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QEmbedLayerNormalization",
}
# Ops that only move or reshape data: not worth listing as "stayed in float".
_CHEAP = {
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Shape",
    "Gather", "Concat", "Slice", "Split", "Cast", "Constant", "ConstantOfShape", "Expand",
}


def node_precisions(model) -> list[tuple[str, str, str]]:
    """``(node key, op type, "int8" | "float" | "qdq")`` for every node of the graph."""
    producer = {}
    for g in all_graphs(model.graph):  # a subgraph reads outer-scope values too
        for node in g.node:
            for o in node.output:
                producer[o] = node.op_type
    out = []
    for key, node in iter_nodes(model.graph):
        op = node.op_type
        if op in QDQ_OPS:
            kind = "qdq"
        elif op in INT8_OPS:
            kind = "int8"
        else:
            data = [x for x in node.input[:1] if x]
            if op in _HEAVY and len(node.input) > 1:
                data.append(node.input[1])
            kind = "int8" if data and all(
                producer.get(x) == "DequantizeLinear" for x in data) else "float"
        out.append((key, op, kind))
    return out


def precision_summary(model, macs: dict[str, int] | None = None) -> dict[str, Any]:
    """Op counts by precision, and the compute-heavy nodes that stayed float (with their
    share of the model's MACs when ``macs`` from :func:`macs_by_node` is given)."""
    nodes = node_precisions(model)
    int8 = Counter(op for _, op, k in nodes if k == "int8")
    flt = Counter(op for _, op, k in nodes if k == "float" and op not in _CHEAP)
    total = sum(macs.values()) if macs else 0
    heavy_float = []
    int8_macs = 0
    for key, op, kind in nodes:
        m = (macs or {}).get(key)
        if kind == "int8" and m:
            int8_macs += m
        if kind == "float" and op in _HEAVY:
            entry: dict[str, Any] = {"node": key, "op": op}
            if m is not None and total:
                entry["macs"] = m
                entry["macs_share"] = round(m / total, 4)
            heavy_float.append(entry)
    heavy_float.sort(key=lambda e: -e.get("macs", 0))
    return {
        "quantized": bool(int8),
        "int8_ops": dict(sorted(int8.items())),
        "float_ops": dict(sorted(flt.items())),
        "float_heavy_nodes": heavy_float,
        "int8_macs_share": round(int8_macs / total, 4) if total else None,
    }
