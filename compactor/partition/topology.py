"""A topology file: the devices a model may run across, and the links between them.

Two kinds::

    kind: chain                      # phone → gateway → cloud (the default)
    devices:
      - {name: phone, profile: edge-cpu, slowdown: 4}
      - {name: gateway, profile: edge-cpu, latency_ms: 30}
      - {name: cloud, profile: host-cpu, memory_mb: 8192}
    links:
      - {from: phone, to: gateway, bandwidth: 20Mbps, rtt: 5ms}
      - {from: gateway, to: cloud, bandwidth: 100Mbps, rtt: 30ms}

    kind: peers                      # boards on one network that cooperate
    devices: [...]                   # the first holds the input and gathers the tiles
    link: {bandwidth: 50Mbps, rtt: 2ms}

A chain's links must join each device to the next one, in the order the devices are
listed: a missing link, a link back to an earlier device (a cycle) or one that skips a
device is an error. Each device's memory is its profile's ``limits.memory_mb`` unless the
topology gives ``memory_mb``.

Loaded like a recipe: bounded YAML (:mod:`compactor.yamlsafe`), pydantic with unknown keys
refused, every error naming the file and the field (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compactor.errors import RecipeError, did_you_mean
from compactor.partition.config import _check
from compactor.partition.units import parse_bandwidth, parse_duration_ms


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DeviceEntry(_Strict):
    name: str = Field(min_length=1)
    profile: str = Field(min_length=1, description="a built-in profile name or a .yaml")
    slowdown: float | None = Field(default=None, gt=0,
                                   description="this device's time = this host's time x it")
    latency_ms: float | None = Field(default=None, gt=0,
                                     description="the full model's p50 measured there")
    memory_mb: float | None = Field(default=None, gt=0,
                                    description="default: the profile's limits.memory_mb")


class LinkEntry(_Strict):
    source: str | None = Field(default=None, alias="from")
    to: str | None = None
    bandwidth: str
    rtt: str

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bw(cls, v: object) -> object:
        _check(parse_bandwidth, v, "bandwidth")
        return v

    @field_validator("rtt", mode="before")
    @classmethod
    def _rtt(cls, v: object) -> object:
        _check(parse_duration_ms, v, "rtt")
        return v


class TopologyFile(_Strict):
    kind: Literal["chain", "peers"] = "chain"
    devices: list[DeviceEntry] = Field(min_length=1, max_length=16)
    links: list[LinkEntry] = Field(default_factory=list)
    link: LinkEntry | None = None


@dataclass(frozen=True)
class Hop:
    """The link between device ``index`` and device ``index + 1`` (or, for peers, between
    the first device and any other)."""

    index: int
    bps: float
    rtt_ms: float
    source: str
    to: str


@dataclass(frozen=True)
class Device:
    name: str
    profile: object  # compactor.profiles.Profile
    slowdown: float | None
    latency_ms: float | None
    memory_mb: float | None
    memory_source: str


@dataclass(frozen=True)
class Topology:
    kind: str
    devices: tuple[Device, ...]
    hops: tuple[Hop, ...]  # chain: len(devices) - 1; peers: one shared link
    path: Path | None = None

    @property
    def n(self) -> int:
        return len(self.devices)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": str(self.path) if self.path else None,
                "devices": [{"name": d.name, "profile": d.profile.name,
                             "memory_mb": d.memory_mb, "memory_source": d.memory_source,
                             "slowdown": d.slowdown, "latency_ms": d.latency_ms}
                            for d in self.devices],
                "links": [{"from": h.source, "to": h.to, "uplink_bps": h.bps,
                           "rtt_ms": h.rtt_ms} for h in self.hops]}


def load_topology(path: Path) -> Topology:
    """Read and check a topology file; every problem is a RecipeError (exit 2)."""
    from compactor.yamlsafe import load_yaml_file

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"topology file not found: {path}", "check the path")
    raw = load_yaml_file(path, "topology")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a topology must be a YAML mapping",
                          "see docs/partition.md, 'Several devices'")
    try:
        parsed = TopologyFile.model_validate(raw)
    except ValidationError as e:
        raise _field_error(path, e) from None
    return build_topology(parsed, path)


def _field_error(path: Path, e: ValidationError) -> RecipeError:
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = _allowed(err["loc"][:-1])
        close = did_you_mean(key, allowed)
        return RecipeError(f"{path}: unknown key {loc!r}",
                           (close + " " if close else "") + f"allowed keys: "
                           f"{', '.join(allowed)}")
    msg = err["msg"].removeprefix("Value error, ")
    return RecipeError(f"{path}: {loc}: {msg}", "see docs/partition.md, 'Several devices'")


def _allowed(loc: tuple) -> list[str]:
    if loc and loc[0] == "devices":
        return list(DeviceEntry.model_fields)
    if loc and loc[0] in ("links", "link"):
        return ["from", "to", "bandwidth", "rtt"]
    return list(TopologyFile.model_fields)


def build_topology(t: TopologyFile, path: Path | None = None) -> Topology:
    """The checked topology: profiles loaded, names resolved, the chain's links in order."""
    from compactor.profiles import load_profile

    where = str(path) if path else "topology"
    base = path.parent if path else None
    names = [d.name for d in t.devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"{where}: device name {dup[0]!r} is used twice",
                          "give each device its own name")
    devices = []
    for i, d in enumerate(t.devices):
        if d.slowdown is not None and d.latency_ms is not None:
            raise RecipeError(f"{where}: devices[{i}] ({d.name}): give slowdown or "
                              "latency_ms, not both", "latency_ms sets the slowdown")
        try:
            prof = load_profile(d.profile, base)
        except RecipeError as e:
            raise RecipeError(f"{where}: devices[{i}] ({d.name}): {e.message}", e.hint) from None
        mem, src = d.memory_mb, "topology"
        if mem is None:
            mem, src = prof.limits.memory_mb, f"profile {prof.name} limits.memory_mb"
        devices.append(Device(d.name, prof, d.slowdown, d.latency_ms, mem,
                              src if mem is not None else "no limit"))
    hops = _peer_hops(t, where) if t.kind == "peers" else _chain_hops(t, names, where)
    return Topology(t.kind, tuple(devices), tuple(hops), path)


def _peer_hops(t: TopologyFile, where: str) -> list[Hop]:
    if t.link is None or t.links:
        raise RecipeError(f"{where}: a peers topology takes one shared 'link' "
                          "(bandwidth, rtt), not 'links'",
                          "write link: {bandwidth: 50Mbps, rtt: 2ms}")
    if len(t.devices) < 2:
        raise RecipeError(f"{where}: a peers topology needs at least two devices", None)
    lk = t.link
    return [Hop(0, parse_bandwidth(lk.bandwidth), parse_duration_ms(lk.rtt),
                t.devices[0].name, "peers")]


def _chain_hops(t: TopologyFile, names: list[str], where: str) -> list[Hop]:
    """One link from each device to the next; anything else is named as the problem."""
    if t.link is not None:
        raise RecipeError(f"{where}: a chain topology lists its 'links' (from, to, bandwidth, "
                          "rtt), not one 'link'", "or set kind: peers")
    by_pair: dict[tuple[str, str], LinkEntry] = {}
    for j, lk in enumerate(t.links):
        for end, val in (("from", lk.source), ("to", lk.to)):
            if val is None:
                raise RecipeError(f"{where}: links[{j}].{end} is missing",
                                  "each link names the devices it joins: from, to")
            if val not in names:
                close = did_you_mean(val, names)
                raise RecipeError(f"{where}: links[{j}].{end}: unknown device {val!r}",
                                  (close + " " if close else "") + f"devices: {', '.join(names)}")
        assert lk.source is not None and lk.to is not None  # checked just above
        a, b = names.index(lk.source), names.index(lk.to)
        if b <= a:
            raise RecipeError(
                f"{where}: links[{j}] goes from {lk.source!r} back to {lk.to!r}: a chain "
                "has no cycle" if b < a else f"{where}: links[{j}] joins {lk.source!r} to "
                "itself (a cycle)",
                "list the devices in the order a request flows and link each to the next")
        if b != a + 1:
            raise RecipeError(f"{where}: links[{j}] skips from {lk.source!r} to {lk.to!r}",
                              "a chain links each device to the next one in the list")
        if (lk.source, lk.to) in by_pair:
            raise RecipeError(f"{where}: two links from {lk.source!r} to {lk.to!r}", None)
        by_pair[(lk.source, lk.to)] = lk
    hops = []
    for i in range(len(names) - 1):
        lk = by_pair.get((names[i], names[i + 1]))
        if lk is None:
            raise RecipeError(f"{where}: no link from {names[i]!r} to {names[i + 1]!r}",
                              "a chain needs a link between each device and the next: add "
                              f"{{from: {names[i]}, to: {names[i + 1]}, bandwidth: 10Mbps, "
                              "rtt: 20ms}")
        hops.append(Hop(i, parse_bandwidth(lk.bandwidth), parse_duration_ms(lk.rtt),
                        names[i], names[i + 1]))
    return hops
