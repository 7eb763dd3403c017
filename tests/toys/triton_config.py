"""Triton's own ModelConfig parser, for the configs `compactor package --triton` writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def parse_config(text: str):
    """``config.pbtxt`` text parsed by Triton's ModelConfig message (tritonclient ships
    it; loaded by file so the grpc client itself is not needed)."""
    import tritonclient
    from google.protobuf import text_format

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return text_format.Parse(text, mod.ModelConfig())
