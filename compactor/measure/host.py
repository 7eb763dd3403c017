"""What machine the measurements were taken on."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimddp",  # ARM dot product
    "i8mm",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("compactor", "onnx", "onnxruntime", "numpy", "torch", "onnxsim", "onnxscript"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe_host() -> dict:
    import onnxruntime as ort

    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "isa": isa_flags(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "packages": package_versions(),
    }
