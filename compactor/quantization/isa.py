"""Which int8 instructions this CPU has, and the int8 settings they call for.

ONNX Runtime's x86 int8 kernels multiply uint8 activations by int8 weights (u8s8). Without
VNNI, the AVX2/AVX-512 path (``vpmaddubsw``) adds pairs of u8*s8 products into int16, which
saturates when both are large: weights quantized to 7 bits (``reduce_range``) avoid it, as
do uint8 weights (u8u8). With AVX-512 VNNI, AVX-VNNI or AMX the products accumulate in int32
and full 8-bit weights are safe. ARM's dot-product instructions (``asimddp``, ``i8mm``) take
signed activations natively.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from compactor.quantization.modes import IntType, QuantMode

_ARM_MACHINES = ("aarch64", "arm64", "armv8l", "armv7l")


@dataclass(frozen=True)
class Int8ISA:
    """The int8 instructions of this CPU, summarized as the best int8 path it offers."""

    machine: str
    flags: tuple[str, ...]
    path: str  # amx | avx512_vnni | avx_vnni | avx512 | avx2 | arm_i8mm | arm_dotprod | arm | basic
    no_saturation: bool  # 8-bit products accumulate in int32 (VNNI, AMX, ARM dot product)

    @property
    def arm(self) -> bool:
        return self.path.startswith("arm")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags)}


def detect(flags: Iterable[str] | None = None, machine: str | None = None) -> Int8ISA:
    """This CPU's int8 path, from ``compactor.measure.host.isa_flags()`` (or ``flags``)."""
    if flags is None:
        from compactor.measure.host import isa_flags

        flags = isa_flags()
    have = tuple(flags)
    s = set(have)
    machine = (machine or platform.machine() or "unknown").lower()
    arm = machine in _ARM_MACHINES or bool(s & {"asimddp", "i8mm", "asimd"})
    if arm:
        path = "arm_i8mm" if "i8mm" in s else "arm_dotprod" if "asimddp" in s else "arm"
        return Int8ISA(machine, have, path, path != "arm")
    if s & {"amx_int8"}:
        path = "amx"
    elif "avx512_vnni" in s:
        path = "avx512_vnni"
    elif "avx_vnni" in s:
        path = "avx_vnni"
    elif "avx512bw" in s or "avx512f" in s:
        path = "avx512"
    elif "avx2" in s:
        path = "avx2"
    else:
        path = "basic"
    return Int8ISA(machine, have, path, path in ("amx", "avx512_vnni", "avx_vnni"))


@dataclass(frozen=True)
class Int8Choice:
    """Activation types worth timing (in preference order), the reduce_range setting, and
    why; ``warning`` when a pinned setting risks saturation on this CPU."""

    activation_types: tuple[IntType, ...]
    reduce_range: bool
    reason: str
    warning: str | None = None
    # (weight type, reduce_range) pairs worth timing, the first the preferred one; empty:
    # only (the recipe's weight_type, ``reduce_range``)
    weight_options: tuple[tuple[IntType, bool], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out = {"activation_types": [a.value for a in self.activation_types],
               "reduce_range": self.reduce_range, "reason": self.reason}
        if len(self.weight_options) > 1:
            out["weight_options"] = [_weights_label(w, rr) for w, rr in self.weight_options]
        if self.warning:
            out["warning"] = self.warning
        return out


def choose(isa: Int8ISA, mode: QuantMode | str, activation_type: str = "auto",
           reduce_range: bool | str = "auto", weight_type: IntType | str = IntType.INT8
           ) -> Int8Choice:
    """Int8 settings for ``isa``. ``"auto"`` values are chosen; pinned ones are kept (with a
    warning when they risk u8s8 saturation here)."""
    options: tuple[tuple[IntType, bool], ...] = ()
    if isa.no_saturation:
        acts = (IntType.INT8, IntType.UINT8) if isa.arm else (IntType.UINT8, IntType.INT8)
        rr = False
        why = (f"{isa.path}: 8-bit products accumulate in int32 without saturation, so "
               "weights keep all 8 bits; " + ("signed activations suit ARM's dot product"
                                              if isa.arm else "u8s8 and s8s8 are both timed"))
    elif isa.arm:
        acts, rr = (IntType.UINT8,), False
        why = "ARM without dot-product instructions: u8s8, full 8-bit weights"
    else:
        acts = (IntType.UINT8,)
        rr = weight_type == IntType.INT8
        why = (f"{isa.path} without VNNI: u8s8 products saturate in int16 (vpmaddubsw), so "
               + ("weights are quantized to 7 bits (reduce_range)" if rr else
                  "uint8 weights (u8u8) are used as given, which avoids it")
               + "; signed activations are not tried (slower without VNNI)")
        if rr and reduce_range == "auto":
            options = NO_VNNI_WEIGHT_OPTIONS
            why += ("; also timed and scored: uint8 weights (u8u8, full 8 bits, no "
                    "saturation) and full 8-bit int8 weights (ONNX Runtime's default: the "
                    "accuracy check on this host measures what saturation costs)")
    if mode == QuantMode.DYNAMIC:
        acts = (IntType.UINT8,)  # ORT's dynamic quantization has uint8 activations only
    warning = None
    if activation_type != "auto":
        acts = (IntType(activation_type),)
        why += f"; activation_type pinned to {activation_type}"
    if reduce_range != "auto":
        if (reduce_range is False and not isa.no_saturation and not isa.arm
                and weight_type == IntType.INT8 and IntType.UINT8 in acts):
            warning = (f"reduce_range: false on a CPU without VNNI ({isa.path}) risks u8s8 "
                       "saturation and silent accuracy loss; leave it 'auto'")
        rr = bool(reduce_range)
        why += f"; reduce_range pinned to {str(rr).lower()}"
        options = ()
    return Int8Choice(acts, rr, why, warning, options or ((IntType(weight_type), rr),))


# x86 without VNNI: 7-bit int8 weights first (no saturation), then uint8 weights (u8u8:
# no saturation at full 8 bits, a different kernel) and full 8-bit int8 weights (ORT's
# default; the accuracy check measures what saturation costs on the host itself)
NO_VNNI_WEIGHT_OPTIONS = ((IntType.INT8, True), (IntType.UINT8, False), (IntType.INT8, False))


def _weights_label(weight_type: IntType, reduce_range: bool) -> str:
    return f"{IntType(weight_type).short} weights" + (" 7-bit" if reduce_range else "")
