"""What machine the measurements were taken on."""

from __future__ import annotations

import logging
import os
import platform
import sys
from importlib import metadata

log = logging.getLogger(__name__)

# What a probe that cannot read the host records, so a report says so instead of leaving
# the figure out.
UNKNOWN = "unknown"

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


def _cpuinfo(prefixes: tuple[str, ...]) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of ``prefixes``; None
    where there is no such line or no readable /proc/cpuinfo (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefixes):
                    return line.split(":", 1)[1].strip()
    except OSError as e:
        log.debug("cannot read /proc/cpuinfo: %s", e)
    return None


def cpu_model() -> str:
    name = _cpuinfo(("model name", "Hardware", "Model"))
    if name is None:
        log.debug("no CPU model in /proc/cpuinfo; using the platform's name for it")
        name = platform.processor() or platform.machine() or UNKNOWN
    return name


def isa_flags() -> list[str]:
    """The ISA_FLAGS this CPU has; empty where they cannot be read (see
    :func:`describe_host`, which records that as unknown)."""
    return _known_isa_flags() or []


def _known_isa_flags() -> list[str] | None:
    line = _cpuinfo(("flags", "Features"))
    if line is None:
        log.debug("no CPU flags in /proc/cpuinfo; the ISA is unknown")
        return None
    have = set(line.split())
    return [f for f in ISA_FLAGS if f in have]


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

    isa = _known_isa_flags()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "isa": [UNKNOWN] if isa is None else isa,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "packages": package_versions(),
    }


def host_busy_seconds() -> float | None:
    """CPU seconds every process on this host has run so far (all cores, from the first
    line of /proc/stat: user+nice+system+irq+softirq+steal), or None where it cannot be
    read. Sampled around a measurement, minus the measuring process's own CPU time, it says
    how many cores other processes took meanwhile."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    try:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
        steal = int(fields[8]) if len(fields) > 8 else 0
    except ValueError:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (user + nice + system + irq + softirq + steal) / float(hz or 100)
