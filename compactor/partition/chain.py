"""Where to cut a model across a chain of N devices (phone → gateway → cloud): the
dynamic programme over the model's cut positions.

Device ``d`` runs the nodes ``[c_d, c_{d+1})`` of the model's topological order, with
``0 = c_0 <= c_1 <= ... <= c_N = n``; the input starts on device 0 and the outputs return
to it. A device whose range is empty forwards what it receives. The chain ends at the last
device that computes (the devices after it are not used). The costs, all in ms:

- latency of one request: every used device's compute, plus for each link ``d`` before
  the last device: the tensors at ``c_{d+1}`` sent forward (``bytes / bandwidth``), its
  round trip, and the model's outputs sent back (``out_bytes / bandwidth``, the downlink
  taken as fast as the uplink);
- pipelined throughput of a stream of requests: bounded by the slowest stage or link
  direction, ``1000 / max(compute_d, forward_d, back_d)`` requests per second (a link's
  RTT delays a request but does not limit the rate);
- memory on device ``d``: the weights of its nodes plus the tensors it receives and sends
  (the activations at its cuts); a device over its limit cannot take that range.

Everything here is plain numbers (:class:`ChainCosts`), so the programme is tested with
fake timings; :mod:`compactor.partition.multi` fills them in by measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from compactor.errors import UsageError
from compactor.partition.cost import transfer_ms

MIB = 1024 * 1024
_EPS = 1e-9


@dataclass(frozen=True)
class ChainCosts:
    """The figures one chain plan is chosen from.

    ``positions``: the valid cut positions, sorted, first 0 and last ``n``.
    ``compute_ms(d, a, b)``: device ``d``'s time for the nodes ``[a, b)`` (0 when a == b).
    ``send_bytes[p]``: the message sent at cut ``p`` (< n), as it goes on the wire (with
    int8 on the wire, an inner cut's float32 tensors at one byte an element; the raw input
    at 0). ``out_bytes``: the reply.
    ``weight_bytes(a, b)`` and ``act_bytes[p]`` (raw bytes crossing ``p``; ``act_bytes[n]``
    is the outputs) size each device's memory; ``mem_limit[d]`` is in bytes or None.
    ``bps``/``rtt_ms``: link ``d`` joins device ``d`` to ``d + 1``.
    """

    positions: Sequence[int]
    compute_ms: Callable[[int, int, int], float]
    send_bytes: dict[int, int]
    out_bytes: int
    weight_bytes: Callable[[int, int], int]
    act_bytes: dict[int, int]
    mem_limit: Sequence[float | None]
    bps: Sequence[float]
    rtt_ms: Sequence[float]
    serial_ms: Mapping[int, float] | None = None  # encode + decode of the message at a cut

    @property
    def n_devices(self) -> int:
        return len(self.mem_limit)

    @property
    def n(self) -> int:
        return self.positions[-1]

    def memory(self, d: int, a: int, b: int) -> int:
        if a == b:  # forwards what it receives
            return self.act_bytes.get(a, 0)
        return self.weight_bytes(a, b) + self.act_bytes.get(a, 0) + self.act_bytes.get(b, 0)

    def fits(self, d: int, a: int, b: int) -> bool:
        lim = self.mem_limit[d]
        return lim is None or self.memory(d, a, b) <= lim

    def forward_ms(self, d: int, b: int) -> float:
        return transfer_ms(self.send_bytes[b], self.bps[d])

    def back_ms(self, d: int) -> float:
        return transfer_ms(self.out_bytes, self.bps[d])

    def serialize_ms(self, a: int, b: int) -> float:
        """A computing device's messaging work: what it sends at ``b`` (the reply at n),
        encoded there and decoded at the other end, counted once, on its side."""
        if b <= a or not self.serial_ms:
            return 0.0
        return self.serial_ms.get(b, 0.0)


@dataclass(frozen=True)
class Stage:
    device: int
    start: int
    end: int
    compute_ms: float
    memory_bytes: int
    forward_ms: float = 0.0  # over the link to the next device (0 for the last)
    rtt_ms: float = 0.0
    back_ms: float = 0.0
    bytes_forward: int = 0
    serialize_ms: float = 0.0

    @property
    def busy_ms(self) -> float:
        return self.compute_ms + self.serialize_ms

    def to_dict(self) -> dict:
        return {"device": self.device, "nodes": [self.start, self.end],
                "compute_ms": round(self.compute_ms, 4),
                "serialize_ms": round(self.serialize_ms, 4),
                "memory_mb": round(self.memory_bytes / MIB, 3),
                "forward_ms": round(self.forward_ms, 4), "rtt_ms": self.rtt_ms,
                "back_ms": round(self.back_ms, 4), "bytes_forward": self.bytes_forward}


@dataclass(frozen=True)
class ChainPlan:
    cuts: tuple[int, ...]  # c_1 .. c_{last}: where each used device's range ends
    stages: tuple[Stage, ...]  # the used devices, in order

    @property
    def latency_ms(self) -> float:
        return sum(s.busy_ms + s.forward_ms + s.rtt_ms + s.back_ms for s in self.stages)

    @property
    def bottleneck_ms(self) -> float:
        return max(max(s.busy_ms, s.forward_ms, s.back_ms) for s in self.stages)

    @property
    def throughput_rps(self) -> float:
        b = self.bottleneck_ms
        return 1000.0 / b if b > 0 else math.inf

    @property
    def computing(self) -> list[int]:
        return [s.device for s in self.stages if s.end > s.start]

    def describe(self, names: Sequence[str]) -> str:
        parts = []
        for s in self.stages:
            what = f"nodes {s.start}..{s.end - 1}" if s.end > s.start else "forwards"
            parts.append(f"{names[s.device]}: {what}")
        return "; ".join(parts)

    def to_dict(self, names: Sequence[str]) -> dict:
        return {"cuts": list(self.cuts), "description": self.describe(names),
                "devices_used": [names[s.device] for s in self.stages],
                "devices_computing": [names[d] for d in self.computing],
                "latency_ms": round(self.latency_ms, 4),
                "bottleneck_ms": round(self.bottleneck_ms, 4),
                "throughput_rps": round(self.throughput_rps, 4),
                "stages": [dict(s.to_dict(), name=names[s.device]) for s in self.stages]}


def plan_chain(c: ChainCosts, objective: str = "latency",
               max_computing: int | None = None) -> ChainPlan | None:
    """The best plan under ``objective`` (``latency`` or ``throughput``; throughput ties go
    to the lower latency), with at most ``max_computing`` devices that compute. None when no
    assignment fits the memory limits."""
    if objective == "throughput":
        bound = _search(c, "bottleneck", max_computing, math.inf)
        if bound is None:
            return None
        return _search(c, "latency", max_computing, bound[0] * (1 + 1e-9) + _EPS)[1]
    found = _search(c, "latency", max_computing, math.inf)
    return found[1] if found else None


def _stage_cost(c: ChainCosts, d: int, a: int, b: int, last: bool) -> tuple[float, ...]:
    comp = (c.compute_ms(d, a, b) if b > a else 0.0) + c.serialize_ms(a, b)
    if last:
        return comp, 0.0, 0.0, 0.0
    return comp, c.forward_ms(d, b), c.rtt_ms[d], c.back_ms(d)


def _search(c: ChainCosts, measure: str, max_computing: int | None,
            cap: float) -> tuple[float, ChainPlan] | None:
    """Dynamic programme over (device, cut position, devices computing so far). ``measure``
    is summed (latency) or maxed (bottleneck); any stage or link term above ``cap`` is
    ruled out."""
    pos, n, nd = list(c.positions), c.n, c.n_devices
    kmax = min(max_computing or nd, nd)
    # best[(d, p, k)] = (value, back-pointer): the cut-p tensors are on device d
    best: dict[tuple[int, int, int], tuple[float, tuple | None]] = {(0, 0, 0): (0.0, None)}
    done: list[tuple[float, tuple]] = []
    for d in range(nd):
        for p in pos:
            for k in range(kmax + 1):
                here = best.get((d, p, k))
                if here is None:
                    continue
                for q in (x for x in pos if x >= p):
                    k2 = k + (q > p)
                    last = q == n
                    if k2 > kmax or (not last and d == nd - 1) or not c.fits(d, p, q):
                        continue
                    terms = _stage_cost(c, d, p, q, last)
                    if max(terms[0], terms[1], terms[3]) > cap:
                        continue
                    step = sum(terms) if measure == "latency" else max(
                        terms[0], terms[1], terms[3])
                    val = here[0] + step if measure == "latency" else max(here[0], step)
                    key = (d, p, k)
                    if last:
                        if k2 > 0:
                            done.append((val, (key, q)))
                        continue
                    nxt = (d + 1, q, k2)
                    if nxt not in best or val < best[nxt][0] - _EPS:
                        best[nxt] = (val, (key, q))
    if not done:
        return None
    val, tail = min(done, key=lambda x: x[0])
    return val, _rebuild(c, best, tail)


def _rebuild(c: ChainCosts, best: dict, tail: tuple) -> ChainPlan:
    steps = []  # (d, p, q) from the last stage back
    key, q = tail
    while key is not None:
        d, p, _ = key
        steps.append((d, p, q))
        back = best[key][1]
        if back is None:
            break
        key, q = back
    steps.reverse()
    stages = []
    for i, (d, p, q) in enumerate(steps):
        comp, fwd, rtt, bk = _stage_cost(c, d, p, q, i == len(steps) - 1)
        ser = c.serialize_ms(p, q)
        stages.append(Stage(d, p, q, comp - ser, c.memory(d, p, q), fwd, rtt, bk,
                            0 if i == len(steps) - 1 else c.send_bytes[q], ser))
    return ChainPlan(tuple(s.end for s in stages), tuple(stages))


def smallest_memory_needed(c: ChainCosts) -> tuple[float, int]:
    """The least any plan asks of its most loaded device (bytes), and the plan's device
    count: what a device would need to hold when none of the assignments fits."""
    unlimited = ChainCosts(c.positions, c.compute_ms, c.send_bytes, c.out_bytes,
                           c.weight_bytes, c.act_bytes, [None] * c.n_devices, c.bps,
                           c.rtt_ms)  # no serialization: only memory matters here
    mem = ChainCosts(unlimited.positions, lambda d, a, b: float(unlimited.memory(d, a, b)),
                     c.send_bytes, c.out_bytes, c.weight_bytes, c.act_bytes,
                     unlimited.mem_limit, [math.inf] * c.n_devices, [0.0] * c.n_devices)
    found = _search(mem, "bottleneck", None, math.inf)
    assert found is not None  # without limits every chain of cuts is allowed
    return found[0], len(found[1].stages)


def no_fit_error(c: ChainCosts, names: Sequence[str]) -> UsageError:
    need, used = smallest_memory_needed(c)
    limits = ", ".join(f"{nm} {lim / MIB:.1f} MB" for nm, lim in zip(names, c.mem_limit,
                                                                          strict=True)
                       if lim is not None)
    return UsageError(
        f"the model fits no assignment to the {len(names)} devices under their memory "
        f"limits ({limits}): the most even split still needs {need / MIB:.1f} MB on one "
        f"device (weights plus the activations at its cuts), over {used} devices",
        f"use a device with at least {need / MIB:.1f} MB (memory_mb in the topology or "
        "limits.memory_mb in its profile), or add devices to the chain",
    )
