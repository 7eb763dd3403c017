"""The cost of running a model as device part + network + server part.

Latency of one request (Neurosurgeon's model, with the reply counted)::

    device_ms + bytes_up / uplink + rtt + server_ms + bytes_back / downlink

``bytes_back`` is the model's output, which returns to the device; the downlink is taken
to be as fast as the uplink (the reply is small next to what goes up). On-device has no
network terms at all.

Device energy (the ``device-energy`` objective): the device's compute power for its part,
plus its radio power while sending and receiving. Waiting (the round trip, the server's
time) is not counted: the device may sleep then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

MS_PER_BYTE_AT_1BPS = 8000.0  # bytes * 8 bits / (bits/s) * 1000 ms


@dataclass(frozen=True)
class Link:
    uplink_bps: float
    rtt_ms: float
    source: str = ""

    def with_uplink(self, bps: float) -> Link:
        return Link(bps, self.rtt_ms, self.source)


@dataclass(frozen=True)
class Power:
    device_w: float
    radio_w: float
    radio_source: str = ""


def transfer_ms(nbytes: int, bps: float) -> float:
    return nbytes * MS_PER_BYTE_AT_1BPS / bps


@dataclass(frozen=True)
class Cost:
    """One option's figures; every term in milliseconds (energy in joules)."""

    option: str  # "on-device", "offload" or "split@K"
    kind: str
    description: str
    device_ms: float
    upload_ms: float
    rtt_ms: float
    server_ms: float
    download_ms: float
    bytes_up: int
    bytes_down: int
    device_source: str = "measured"
    server_source: str = "measured"
    device_energy_j: float | None = None

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.upload_ms + self.rtt_ms + self.server_ms + self.download_ms

    @property
    def fixed_ms(self) -> float:
        """The part that does not depend on bandwidth."""
        return self.device_ms + self.rtt_ms + self.server_ms

    @property
    def network_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def value(self, objective: str) -> float:
        if objective == "device-energy":
            return self.device_energy_j if self.device_energy_j is not None else math.inf
        return self.total_ms

    def at(self, link: Link, power: Power | None = None) -> Cost:
        """The same option over another link."""
        return make_cost(self.option, self.kind, self.description, self.device_ms,
                         self.server_ms, self.bytes_up, self.bytes_down, link, power,
                         self.device_source, self.server_source)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_ms"] = self.total_ms
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def make_cost(option: str, kind: str, description: str, device_ms: float, server_ms: float,
              bytes_up: int, bytes_down: int, link: Link, power: Power | None,
              device_source: str = "measured", server_source: str = "measured") -> Cost:
    local = kind == "on-device"
    up = 0.0 if local else transfer_ms(bytes_up, link.uplink_bps)
    down = 0.0 if local else transfer_ms(bytes_down, link.uplink_bps)
    energy = None
    if power is not None:
        energy = (power.device_w * device_ms + power.radio_w * (up + down)) / 1000.0
    return Cost(option, kind, description, device_ms, up, 0.0 if local else link.rtt_ms,
                server_ms, down,
                0 if local else bytes_up, 0 if local else bytes_down,
                device_source, server_source, energy)


def best(costs: Sequence[Cost], objective: str) -> Cost:
    """The cheapest option; ties go to the lower latency, then to the earlier option."""
    return min(costs, key=lambda c: (c.value(objective), c.total_ms))


def crossovers(costs: Sequence[Cost], lo_bps: float, hi_bps: float,
               objective: str = "latency", power: Power | None = None,
               points: int = 400) -> list[dict]:
    """Uplink bandwidths in [lo, hi] where the best option changes, with the options on
    each side. Every option's cost is affine in 1/bandwidth, so each change is solved
    exactly between the two options a log-spaced scan finds on either side of it."""
    if not costs:
        return []
    grid = [lo_bps * (hi_bps / lo_bps) ** (i / (points - 1)) for i in range(points)]
    def winner(bps: float) -> Cost:
        return best([c.at(Link(bps, c.rtt_ms), power) for c in costs], objective)

    out = []
    prev = winner(grid[0])
    for bps in grid[1:]:
        cur = winner(bps)
        if cur.option != prev.option:
            x = _solve(prev, cur, objective, power)
            out.append({"uplink_bps": x if x is not None else bps,
                        "from": prev.option, "to": cur.option})
            prev = cur
    return out


def _solve(a: Cost, b: Cost, objective: str, power: Power | None) -> float | None:
    """The bandwidth where options ``a`` and ``b`` cost the same."""
    if objective == "device-energy" and power is not None:
        ka = power.radio_w * a.network_bytes * MS_PER_BYTE_AT_1BPS / 1000.0
        kb = power.radio_w * b.network_bytes * MS_PER_BYTE_AT_1BPS / 1000.0
        fa, fb = power.device_w * a.device_ms / 1000.0, power.device_w * b.device_ms / 1000.0
    else:
        ka = a.network_bytes * MS_PER_BYTE_AT_1BPS
        kb = b.network_bytes * MS_PER_BYTE_AT_1BPS
        fa, fb = a.fixed_ms, b.fixed_ms
    if fa == fb:
        return None
    x = (ka - kb) / (fb - fa)
    return x if x > 0 else None


def latency_curve(c: Cost, bandwidths: Sequence[float]) -> list[float]:
    return [c.at(Link(bps, c.rtt_ms)).total_ms for bps in bandwidths]
