"""How the multi-device planners time what they predict, on fake timings: the peers'
stream figures (the chosen tiles and rest re-timed as in a stream), the first peer's
order of work in the simulated stream, the warm-up that lasts the profile's warm-up
time, and the chain plan's whole-model stage re-timed in the call that plans it."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from toys.partition_chain import chain_topology, conv_chain_cnn, quick_profile

from compactor.partition import profile as profile_mod
from compactor.partition.cost import transfer_ms
from compactor.partition.graph import PartitionGraph
from compactor.partition.multi import ChainOptions, _side, plan_chain_model
from compactor.partition.profile import HostTimes, TimingSettings, time_ms
from compactor.partition.simulate import ShapedLink, encode
from compactor.partition.simulate_chain import Emulated, _Gatherer
from compactor.partition.spatial import SpatialCost, in_stream
from compactor.partition.topology import load_topology
from compactor.profiles import load_profile

# --------------------------------------------------------------------------- peers' cost


def _cost(tile_ms=(10.0, 12.0, 11.0), rest_ms=20.0, bps=100e6) -> SpatialCost:
    return SpatialCost(depth=3, k=len(tile_ms), tile_ms=tuple(tile_ms), rest_ms=rest_ms,
                       bytes_out=(0, 5000, 5000), bytes_back=(0, 3000, 3000), bps=bps,
                       rtt_ms=2.0, memory=(1, 1, 1))


def test_stream_times_set_the_stream_bottleneck_and_keep_the_links():
    one = _cost()
    assert one.bottleneck_ms == pytest.approx(30.0)  # first peer: its tile + the rest
    s = in_stream(one, (7.0, 9.0, 8.5), 15.0)  # back to back: faster than after a pause
    assert s.bottleneck_ms == pytest.approx(22.0) and s.throughput_rps == pytest.approx(
        1000 / 22.0)
    assert (s.bytes_out, s.bytes_back, s.bps, s.rtt_ms) == (one.bytes_out, one.bytes_back,
                                                            one.bps, one.rtt_ms)
    # a peer's tile slower than the first peer's tile + rest bounds the stream
    assert in_stream(one, (1.0, 30.0, 2.0), 3.0).bottleneck_ms == pytest.approx(30.0)
    # a slow link bounds it: 2 x 5000 bytes out at 1 Mbps
    slow = in_stream(_cost(bps=1e6), (1.0, 1.0, 1.0), 1.0)
    assert slow.bottleneck_ms == pytest.approx(2 * transfer_ms(5000, 1e6))
    with pytest.raises(ValueError, match="2 tile times for 3 tiles"):
        in_stream(one, (1.0, 2.0), 3.0)


# --------------------------------------------------------------------------- the simulation


class _Sleeper:
    """A fake session: each run takes ``ms`` (a sleep: no CPU)."""

    def __init__(self, ms: float):
        self.ms, self.runs = ms, 0

    def get_inputs(self):
        return []

    def run(self, _outputs, _feeds):
        self.runs += 1
        time.sleep(self.ms / 1000.0)
        return [np.zeros((1, 1, 2, 2), np.float32)]


def _loopback() -> tuple[socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    ls.close()
    return a, b


def _peer(sock: socket.socket, ms: float) -> None:
    """A peer that takes ``ms`` per tile and sends back a strip."""
    lk = ShapedLink(sock, 1e9, 0.5)
    while True:
        msg = lk.recv()
        if not msg:
            lk.send(b"")
            return
        time.sleep(ms / 1000.0)
        lk.send(encode({"c": np.zeros((1, 1, 2, 2), np.float32)}))


def test_first_peer_streams_one_tile_and_one_rest_per_reply():
    a, b = _loopback()
    threading.Thread(target=_peer, args=(b, 3.0), daemon=True).start()
    link = ShapedLink(a, 1e9, 0.5)
    own, rest = _Sleeper(4.0), _Sleeper(8.0)
    prof = load_profile("host-cpu")
    g = _Gatherer(Emulated(own, 1.0, prof), Emulated(rest, 1.0, prof), {"x": np.zeros(1)},
                  "c", [link],
                  [encode({"x": np.zeros((1, 1, 2, 2), np.float32)})])
    n = 12
    done = g.stream(n)
    link.send(b"")
    link.recv()
    a.close()
    assert len(done) == n and rest.runs == n
    assert own.runs == n + 1  # one tile ahead: every gap between replies holds a tile
    rate = (n - 1) / (done[-1] - done[0])
    # the device's rate is one tile + one rest per request (sleeps only overshoot)
    assert rate <= 1000.0 / 12.0 * 1.05
    assert len(g.compute["tile"]) == n + 1 and min(g.compute["tile"]) >= 4.0 * 0.9


# --------------------------------------------------------------------------- emulation


class _ColdAfterIdle:
    """A fake session like a small CNN on a real host: ``hot`` ms when it ran less than a
    millisecond ago, ``cold`` ms after an idle gap (a sleep: no CPU)."""

    def __init__(self, hot: float, cold: float, spike_every: int = 0):
        self.hot, self.cold, self.spike_every = hot, cold, spike_every
        self.last, self.runs = 0.0, 0

    def get_inputs(self):
        return []

    def run(self, _outputs, _feeds):
        self.runs += 1
        ms = self.hot if time.perf_counter() - self.last < 1e-3 else self.cold
        if self.spike_every and self.runs % self.spike_every == 0:
            ms = 200.0  # the host stalled
        time.sleep(ms / 1000.0)
        self.last = time.perf_counter()
        return []


def _quick():
    return load_profile("host-cpu").model_copy(update={"timing": load_profile(
        "host-cpu").timing.model_copy(update={"warmup": 2, "min_runs": 10, "min_time_s": 0.0,
                                              "max_time_s": 0.5, "warmup_s": 0.0})})


def test_emulated_device_takes_its_slowdown_times_the_steady_time_however_cold():
    """Each run takes slowdown x this host's back-to-back time, measured in the device's
    process first: not slowdown x the run's own time, which after the emulation's sleep is
    the cold one (here 2.5x the steady time)."""
    dev = Emulated(_ColdAfterIdle(hot=2.0, cold=5.0), 10.0, _quick())
    for _ in range(6):
        dev.run({})
        time.sleep(0.005)  # idle between requests: every emulated run starts cold
    assert dev.host_ms == pytest.approx(2.0, rel=0.5)  # steady, not cold
    expect = 10.0 * dev.host_ms
    assert all(expect * 0.98 <= ms <= expect + 5.0 for ms in dev.compute_ms)
    assert dev.overruns == 0
    assert dev.summary()["runs"] == 6


def test_emulated_overrun_keeps_its_own_length_and_this_host_is_only_timed():
    dev = Emulated(_ColdAfterIdle(hot=1.0, cold=1.0, spike_every=3), 4.0, _quick())
    for _ in range(6):
        dev.run({})
    assert dev.overruns >= 1 and max(dev.compute_ms) >= 200.0
    plain = Emulated(_ColdAfterIdle(hot=1.0, cold=6.0), 1.0, _quick())
    for _ in range(3):
        plain.run({})
        time.sleep(0.005)
    assert plain.host_ms is None and min(plain.compute_ms) >= 6.0 * 0.9  # as it ran


def _pauses(monkeypatch, module) -> list[float]:
    """The pauses ``module``'s profile_segments calls are given, as they happen."""
    seen: list[float] = []
    real = module.profile_segments

    def spy(*a, pause_s, **k):
        seen.append(pause_s)
        return real(*a, pause_s=pause_s, **k)

    monkeypatch.setattr(module, "profile_segments", spy)
    return seen


def test_an_emulated_device_is_planned_on_its_steady_time(tmp_path: Path, monkeypatch):
    """The planner times the segments of an emulated device back to back and those of a
    device that is this host after a request's pause, in two timing groups."""
    from compactor.partition import multi

    seen = _pauses(monkeypatch, multi)
    quick = quick_profile(tmp_path / "q.yaml")
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "100Mbps", "1ms",
                                        slowdowns=[1, 4, 4]))
    r = plan_chain_model(model, topo, ChainOptions(refine=False))
    assert sorted(seen) == [0.0, profile_mod.PAUSE_S]
    assert [s.pause_s for s in _sides(topo)] == [profile_mod.PAUSE_S, 0.0, 0.0]
    assert len(r.plan["timing"]["groups"]) == 2


def _sides(topo):
    return [_side(d) for d in topo.devices]


# --------------------------------------------------------------------------- warm-up


def test_time_ms_warms_up_for_the_warmup_time(monkeypatch):
    fake = _Sleeper(2.0)
    monkeypatch.setattr(profile_mod, "make_session", lambda *_a, **_k: fake)
    prof = load_profile("host-cpu")
    t = TimingSettings(warmup=1, min_runs=5, min_time_s=0.0, max_time_s=3.0, warmup_s=0.05)
    time_ms(None, prof, {}, t, pause_s=0.0)
    # >= 50 ms of 2 ms runs warming up (a sleep may overshoot), then 5 timed; a count
    # alone warmed up once
    assert fake.runs >= 15 + 5
    # a warm-up time beyond a third of the time cap stops at the cap
    fake.runs = 0
    t0 = time.perf_counter()
    time_ms(None, prof, {}, TimingSettings(1, 5, 0.0, 0.15, warmup_s=10.0), pause_s=0.0)
    assert time.perf_counter() - t0 < 0.5 and fake.runs < 60
    # the full settings carry the profile's warm-up time, at most a tenth of its time cap
    full = TimingSettings.of(prof, quick=False)
    assert full.warmup_s == pytest.approx(min(prof.timing.warmup_s,
                                              prof.timing.max_time_s / 10))
    assert TimingSettings.of(prof, quick=True).warmup_s == 0.0


# --------------------------------------------------------------------------- chain refine


def test_chain_refine_retimes_a_whole_model_stage(tmp_path: Path):
    """A plan on one device used the segment timing's whole-model figure (taken first in
    the process, maybe shared by a timing cache): refine now times it directly."""
    quick = quick_profile(tmp_path / "q.yaml")
    model = conv_chain_cnn(tmp_path / "m.onnx")
    # links so slow that nothing but the first device pays
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "10kbps", "50ms"))
    g = PartitionGraph.load(model, 1)
    pos = [0, *g.candidates(4)[0], g.n_nodes]
    segs = [50.0 * (b - a) for a, b in zip(pos[:-1], pos[1:], strict=True)]  # fake: slow
    key = _side(topo.devices[0]).timing_key()
    cache = {(str(model.resolve()), 1, tuple(pos), key): HostTimes(pos, sum(segs), segs, 0.0)}
    out = tmp_path / "o"
    r = plan_chain_model(model, topo, ChainOptions(), out_dir=out, timing_cache=cache)
    plan = json.loads((out / "plan.json").read_text())
    assert r.choice.computing == [0]
    assert plan["timing"]["direct_ms"].keys() == {f"0:0-{g.n_nodes}"}
    direct = plan["timing"]["direct_ms"][f"0:0-{g.n_nodes}"]
    assert direct < sum(segs) / 10  # the toy's real time, not the stale fake figure
    assert plan["choice"]["stages"][0]["compute_source"] == "measured"
    assert plan["choice"]["stages"][0]["compute_ms"] == pytest.approx(direct, rel=1e-3)


def test_two_device_planner_times_an_emulated_device_back_to_back(tmp_path: Path,
                                                                   monkeypatch):
    """The two-device planner uses the same definition: an emulated device's segments are
    timed back to back, this host's after a request's pause; the simulation reports each
    emulated side's steady time."""
    from compactor.partition import planner
    from compactor.partition.config import PartitionSpec
    from compactor.partition.planner import plan_partition

    seen = _pauses(monkeypatch, planner)
    quick = str(quick_profile(tmp_path / "q.yaml"))
    model = conv_chain_cnn(tmp_path / "m.onnx")
    r = plan_partition(model, PartitionSpec(device=quick, server=quick, device_slowdown=3,
                                            uplink="100Mbps", rtt="1ms", refine=1),
                       simulate=True, simulate_requests=3)
    assert sorted(seen) == [0.0, profile_mod.PAUSE_S]
    for sim in r.plan["simulate"]:
        emu = sim["emulation"]
        assert "server" not in emu  # the server is this host: its runs are only timed
        if sim["device_ms_p50"] > 0:  # the device computed: emulated at 3x its steady time
            assert emu["device"]["slowdown"] == 3 and emu["device"]["host_ms"] > 0
            assert sim["device_ms_p50"] >= 3 * emu["device"]["host_ms"] * 0.98


def test_a_stream_on_a_saturated_host_says_the_host_bounds_it(monkeypatch):
    import os

    from compactor.partition.simulate_chain import _HostLoad

    cores = os.cpu_count() or 1
    load = _HostLoad()
    load.t0, load.t1 = 10.0, 12.0  # 2 s of stream
    load.busy0, load.busy1 = 100.0, 100.0 + 2.0 * cores * 0.95
    f = load.figures()
    assert f["host_bound"] is True and f["stream_host_busy"] == pytest.approx(0.95)
    assert f"{cores} cores were 95% busy" in f["note"]
    load.busy1 = 100.0 + 2.0 * cores * 0.5
    f = load.figures()
    assert f["host_bound"] is False and "note" not in f
    load.busy1 = None  # /proc/stat unreadable: no figure, no claim
    assert load.figures() == {"stream_host_busy": None, "host_bound": None}


def test_refine_out_of_rounds_chooses_among_the_parts_it_timed(tmp_path: Path,
                                                                monkeypatch):
    """When re-timing runs out of rounds before the plan settles, the plan is the best of
    the ranges timed directly: every stage is measured and says so with its direct time,
    and a note says the re-timing did not settle. Segments that flatter every range make
    the re-plan after round 1 lean on untimed ranges."""
    from compactor.partition import multi

    monkeypatch.setattr(multi, "REFINE_ROUNDS", 1)
    quick = quick_profile(tmp_path / "q.yaml")
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "1Gbps", "1ms"))
    g = PartitionGraph.load(model, 1)
    pos = [0, *g.candidates(4)[0], g.n_nodes]
    segs = [1e-4 * (b - a) for a, b in zip(pos[:-1], pos[1:], strict=True)]  # flattering
    key = _side(topo.devices[0]).timing_key()
    cache = {(str(model.resolve()), 1, tuple(pos), key): HostTimes(pos, 1.0, segs, 0.0)}
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput"),
                         timing_cache=cache)
    direct = r.plan["timing"]["direct_ms"]
    assert direct, "round 1 timed the parts it chose"
    for st in r.plan["choice"]["stages"]:
        a, b = st["nodes"]
        if b == a:
            continue
        assert st["compute_source"] == "measured", st
        if (a, b) != (0, g.n_nodes):
            assert st["compute_ms"] == pytest.approx(direct[f"0:{a}-{b}"], rel=1e-3)
    assert any("re-timing did not settle in 1 rounds" in n and "not chosen" in n
               for n in r.notes), r.notes


def test_a_segment_sum_is_scaled_by_the_measured_part_that_overlaps_it_most():
    """A range not timed directly takes its segments' sum times measured / sum of the part
    covering at least half of it; ranges no part covers that much keep the plain sum."""
    from compactor.partition.multi import _Measured

    t = HostTimes([0, 1, 2, 3, 4], 4.0, [1.0, 1.0, 1.0, 1.0], 0.0)
    m = _Measured(None, [], [t], [0, 1, 2, 3, 4], {}, [], 0, groups=[0])
    m.direct[(0, 1, 4)] = 6.0  # the part ran 2x its segments' sum
    assert m.host_ms(0, 1, 4) == (6.0, "measured")
    assert m.host_ms(0, 2, 4) == (pytest.approx(4.0), "segment sum, scaled by a measured part")
    assert m.host_ms(0, 0, 2) == (pytest.approx(4.0), "segment sum, scaled by a measured part")
    assert m.host_ms(0, 0, 1) == (pytest.approx(1.0), "segment sum")  # no overlap
    assert m.host_ms(0, 0, 4) == (4.0, "measured")  # the whole model: its own figure
    m.direct[(1, 0, 1)] = 9.0  # another settings group's measurement does not count
    assert m.host_ms(0, 0, 1) == (pytest.approx(1.0), "segment sum")
