"""Measurements on ONNX models in ONNX Runtime: size, params, MACs, latency, host."""
