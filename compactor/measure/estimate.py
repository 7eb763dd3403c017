"""Estimates from a profile's peak figures, for targets this host cannot measure.

A roofline lower bound: the time to do the model's multiply-accumulates at the profile's
peak throughput (int8 MACs at the int8 peak, float MACs at the fp16 or fp32 peak), or to
read its weights and inputs/outputs once at its memory bandwidth, whichever is longer.
Real kernels reach a fraction of peak, so real latency is higher. Energy per inference is
latency × the profile's power. Every figure here is labelled an estimate wherever it is
shown.
"""

from __future__ import annotations

from typing import Any

from compactor.profiles import Profile

LABEL = "estimate"


def estimate_latency(
    profile: Profile,
    *,
    macs: int | None,
    int8_share: float | None,
    weight_bytes: int,
    io_bytes: int = 0,
    float_precision: str = "fp32",
) -> dict[str, Any] | None:
    """A roofline lower bound on batch-1 latency in ms, with what it rests on; None when the
    profile has no peak figures."""
    e = profile.estimates
    if float_precision == "fp16" and e.peak_gflops_fp16:
        float_peak, float_name = e.peak_gflops_fp16, "fp16"
    else:
        float_peak, float_name = e.peak_gflops_fp32, "fp32"
    terms: list[tuple[float, str]] = []
    if macs is not None:
        share = int8_share or 0.0
        int8_macs, float_macs = macs * share, macs * (1.0 - share)
        if int8_macs and not e.peak_gops_int8:
            float_macs, int8_macs = macs, 0.0  # no int8 figure: assume it runs as float
        compute_ms = 0.0
        parts = []
        if int8_macs:
            compute_ms += 2 * int8_macs / (e.peak_gops_int8 * 1e9) * 1e3
            parts.append(f"{_si(int8_macs)} int8 MACs at {e.peak_gops_int8:g} GOPS")
        if float_macs:
            if not float_peak:
                compute_ms = None  # type: ignore[assignment]
            else:
                compute_ms += 2 * float_macs / (float_peak * 1e9) * 1e3
                parts.append(f"{_si(float_macs)} {float_name} MACs at {float_peak:g} GFLOPS")
        if compute_ms is not None and parts:
            terms.append((compute_ms, "compute: " + " + ".join(parts)))
    if e.memory_bandwidth_gbs:
        nbytes = weight_bytes + io_bytes
        terms.append((nbytes / (e.memory_bandwidth_gbs * 1e9) * 1e3,
                      f"memory: {nbytes / 1e6:.2f} MB at {e.memory_bandwidth_gbs:g} GB/s"))
    if not terms:
        return None
    ms, bound = max(terms)
    return {
        "label": LABEL,
        "latency_ms": ms,
        "kind": "roofline lower bound (peak figures; real kernels reach a fraction of peak)",
        "bound_by": bound.split(":")[0],
        "basis": "; ".join(t for _, t in terms),
    }


def estimate_energy(profile: Profile, latency_ms: float | None, basis: str) -> dict | None:
    """Energy per inference in millijoules: latency × the profile's power."""
    if latency_ms is None or not profile.estimates.power_w:
        return None
    return {
        "label": LABEL,
        "energy_mj": latency_ms * profile.estimates.power_w,
        "basis": f"{basis} × {profile.estimates.power_w:g} W",
    }


def estimates_for(profile: Profile, *, macs: int | None, int8_share: float | None,
                  weight_bytes: int, io_bytes: int, measured_p50_ms: float | None,
                  quantized: bool) -> dict[str, Any]:
    """Everything estimated for one (model, profile): latency when not measured, energy."""
    float_precision = "fp16" if profile.preferred_precision == "fp16" and not quantized \
        else "fp32"
    lat = estimate_latency(profile, macs=macs, int8_share=int8_share,
                           weight_bytes=weight_bytes, io_bytes=io_bytes,
                           float_precision=float_precision)
    out: dict[str, Any] = {}
    if lat is not None:
        out["latency"] = lat
    if measured_p50_ms is not None:
        energy = estimate_energy(profile, measured_p50_ms, "p50 measured on this host")
    elif lat is not None:
        energy = estimate_energy(profile, lat["latency_ms"], "estimated latency")
    else:
        energy = None
    if energy is not None:
        out["energy"] = energy
    return {"label": LABEL, **out} if out else {}


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
