"""What a partition plan is asked for: the recipe's ``partition:`` section, and the same
settings from ``compactor partition``'s options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compactor.errors import CompactorError
from compactor.partition.units import parse_bandwidth, parse_duration_ms


class PartitionSpec(BaseModel):
    """Plan on-device vs full offload vs a split model between a device and a server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field(min_length=1, description="device profile: a built-in name or a .yaml")
    server: str = Field(min_length=1, description="server profile: a built-in name or a .yaml")
    uplink: str | None = Field(
        default=None, description="uplink bandwidth, e.g. 10Mbps, 1.5MB/s (default: the "
                                  "device profile's network.uplink_mbps)")
    rtt: str | None = Field(
        default=None, description="round-trip time, e.g. 40ms (default: the device "
                                  "profile's network.rtt_ms)")
    objective: Literal["latency", "device-energy"] = "latency"
    keep_input_on_device: bool = Field(
        default=False, description="never send the raw input (privacy): no full offload, "
                                   "no split that sends a model input")
    compress_transfer: Literal["none", "int8"] = Field(
        default="none", description="int8: quantize the tensors sent at the cut (4x fewer "
                                    "bytes for float32)")
    device_slowdown: float | None = Field(
        default=None, gt=0, description="device time = this host's time x this factor")
    device_latency_ms: float | None = Field(
        default=None, gt=0, description="the full model's latency on the real device "
                                        "(from `compactor bench` there); sets the slowdown")
    server_slowdown: float | None = Field(default=None, gt=0)
    server_latency_ms: float | None = Field(default=None, gt=0)
    radio_power_w: float | None = Field(
        default=None, gt=0, description="device radio power while sending (device-energy "
                                        "objective; default: the device's power_w)")
    batch_size: int | None = Field(default=None, ge=1, description="default: the device "
                                                                    "profile's first")
    dims: dict[str, int] = Field(default_factory=dict,
                                 description="sizes of other dynamic input axes")
    max_cut_tensors: int = Field(default=4, ge=1, le=64,
                                 description="largest number of tensors a cut may send")
    refine: int = Field(default=3, ge=0, description="best splits re-timed as real models")

    @field_validator("uplink", mode="before")
    @classmethod
    def _uplink(cls, v: object) -> object:
        if v is not None:
            _check(parse_bandwidth, v, "uplink")
        return v

    @field_validator("rtt", mode="before")
    @classmethod
    def _rtt(cls, v: object) -> object:
        if v is not None:
            _check(parse_duration_ms, v, "rtt")
        return v

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, n in v.items() if n < 1]
        if bad:
            raise ValueError(f"dims {', '.join(bad)} must be positive")
        return v

    @property
    def compress(self) -> str | None:
        return None if self.compress_transfer == "none" else self.compress_transfer


def _check(parse, v, what: str) -> None:
    try:
        parse(v, what)
    except CompactorError as e:  # pydantic reports ValueErrors with the field's path
        raise ValueError(f"{e.message} ({e.hint})" if e.hint else e.message) from None
