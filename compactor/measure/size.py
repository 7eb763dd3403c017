"""Model size on disk and parameter counts, read from the ONNX file itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def model_files(path: Path) -> list[Path]:
    """The ONNX file plus any external-data files it references."""
    import onnx

    files = [path]
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                files.append(path.parent / entry.value)
    return files


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in model_files(path) if f.exists())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def param_count(model) -> int:
    """Elements of weight tensors (initializers and constants of 2+ elements), in the main
    graph and every subgraph (``If`` branches, ``Loop``/``Scan`` bodies).

    Scales and zero points of a quantized model are scalars or per-channel vectors and are
    counted like any other tensor; shape constants (int64) are not parameters.
    """
    import onnx
    from onnx import TensorProto

    from compactor.measure.macs import all_graphs

    weight_types = {
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.DOUBLE,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT4,
        TensorProto.UINT4,
    }
    total = 0
    tensors = []
    for g in all_graphs(model.graph):
        tensors += list(g.initializer)
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        tensors.append(a.t)
    for t in tensors:
        if t.data_type in weight_types:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            if n >= 2:
                total += n
    del onnx
    return total
