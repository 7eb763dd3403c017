"""compactor/exporting/ort_format.py: the ORT-format model for mobile targets, converted by
ONNX Runtime and loaded back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from toys import export_cnn_onnx

from compactor.exporting.ort_format import ORT_CONFIG, ORT_MODEL, deployables
from compactor.profiles import load_profile


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    return export_cnn_onnx(tmp_path_factory.mktemp("cnn") / "cnn.onnx")


def test_ort_format_is_converted_by_ort_and_loads_back(cnn, tmp_path):
    files, records = deployables(cnn, [load_profile("mobile"), load_profile("host-cpu")],
                                 tmp_path, {"image": np.ones((1, 1, 16, 16), np.float32)})
    assert set(files) == {ORT_MODEL, ORT_CONFIG}
    assert files[ORT_MODEL].read_bytes()[4:8] == b"ORTM"  # the ORT flatbuffer identifier
    config = files[ORT_CONFIG].read_text()
    assert "ai.onnx;" in config and "Conv" in config and str(tmp_path) not in config
    (rec,) = records
    assert rec["profiles"] == ["mobile"] and "target platform arm" in rec["converter"]
    assert rec["check"]["loaded"] and rec["check"]["max_abs_diff_vs_onnx"] < 1e-4
    assert deployables(cnn, [load_profile("host-cpu")], tmp_path, {}) == ({}, [])
