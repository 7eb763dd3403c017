"""compactor partition across several devices: the chain planner's dynamic programme
against brute force (fake timings), memory limits, topology files and their bad input,
exact spatial tiles, the written parts, and the multi-process simulation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from toys.partition_chain import (
    chain_topology,
    conv_chain_cnn,
    peers_topology,
    quick_profile,
    skip_chain_onnx,
)

from compactor.errors import EXIT_OK, EXIT_USAGE, RecipeError, UsageError
from compactor.partition.chain import MIB, ChainCosts, no_fit_error, plan_chain
from compactor.partition.cost import transfer_ms
from compactor.partition.graph import PartitionGraph
from compactor.partition.multi import ChainOptions, part_model, plan_chain_model
from compactor.partition.profile import HostTimes, plain_session
from compactor.partition.spatial import (
    SpatialOptions,
    cut_depths,
    plan_spatial_model,
    prefix_heights,
    run_tiled,
    tile_model,
    tiles,
    windows,
)
from compactor.partition.topology import load_topology

# --------------------------------------------------------------------------- fake costs


def fake_costs(n_nodes: int = 8, n_dev: int = 3, seed: int = 0, limits=None,
               bps=(1e6, 1e7), rtt=(10.0, 30.0)) -> ChainCosts:
    """Per node and device a compute time; per cut a message size; per node weights."""
    rng = np.random.default_rng(seed)
    node_ms = rng.uniform(1, 10, (n_dev, n_nodes)) * np.array([[4.0], [2.0], [1.0]])[:n_dev]
    cum = np.concatenate([np.zeros((n_dev, 1)), np.cumsum(node_ms, axis=1)], axis=1)
    weights = rng.integers(1, 5, n_nodes) * MIB
    wcum = np.concatenate([[0], np.cumsum(weights)])
    sizes = {p: int(rng.integers(1_000, 200_000)) for p in range(n_nodes)}
    act = {**sizes, n_nodes: 400}
    return ChainCosts(list(range(n_nodes + 1)),
                      lambda d, a, b: float(cum[d, b] - cum[d, a]), sizes, 400,
                      lambda a, b: int(wcum[b] - wcum[a]), act,
                      limits or [None] * n_dev, list(bps)[: n_dev - 1],
                      list(rtt)[: n_dev - 1])


def brute(c: ChainCosts, objective: str, max_computing: int | None = None):
    """Every assignment of cut positions, costed from the definition in chain.py."""
    n, nd = c.n, c.n_devices
    best = None
    for last in range(nd):
        for cuts in itertools.combinations_with_replacement(c.positions[:-1], last):
            bounds = [0, *cuts, n]
            ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
            if sum(b > a for a, b in ranges) > (max_computing or nd):
                continue
            if not all(c.fits(d, a, b) for d, (a, b) in enumerate(ranges)):
                continue
            lat, bott = 0.0, 0.0
            for d, (a, b) in enumerate(ranges):
                comp = c.compute_ms(d, a, b) if b > a else 0.0
                lat += comp
                bott = max(bott, comp)
                if d < last:
                    fwd = transfer_ms(c.send_bytes[b], c.bps[d])
                    back = transfer_ms(c.out_bytes, c.bps[d])
                    lat += fwd + c.rtt_ms[d] + back
                    bott = max(bott, fwd, back)
            key = (lat, bott) if objective == "latency" else (bott, lat)
            if best is None or key < best[0]:
                best = (key, tuple(cuts))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_chain_dp_matches_brute_force(seed, objective):
    c = fake_costs(seed=seed)
    got = plan_chain(c, objective)
    want = brute(c, objective)
    key = (got.latency_ms, got.bottleneck_ms) if objective == "latency" else (
        got.bottleneck_ms, got.latency_ms)
    assert key == pytest.approx(want[0], rel=1e-9), (got.cuts, want)


def test_chain_cost_terms_add_up():
    c = fake_costs(seed=3)
    p = plan_chain(c, "latency")
    terms = sum(s.compute_ms + s.forward_ms + s.rtt_ms + s.back_ms for s in p.stages)
    assert p.latency_ms == pytest.approx(terms)
    assert p.throughput_rps == pytest.approx(1000.0 / p.bottleneck_ms)
    assert p.stages[-1].end == c.n and p.stages[0].start == 0
    for s, nxt in zip(p.stages, p.stages[1:], strict=False):
        assert s.end == nxt.start and s.bytes_forward == c.send_bytes[s.end]


def test_throughput_objective_balances_the_stages():
    # three equal devices on fast links: latency keeps it on one, throughput spreads it
    c = fake_costs(seed=1, bps=(1e10, 1e10), rtt=(0.1, 0.1))
    c = ChainCosts(c.positions, lambda d, a, b: float(b - a), c.send_bytes, c.out_bytes,
                   c.weight_bytes, c.act_bytes, c.mem_limit, c.bps, c.rtt_ms)
    lat, thr = plan_chain(c, "latency"), plan_chain(c, "throughput")
    assert len(lat.computing) == 1
    assert len(thr.computing) == 3 and thr.bottleneck_ms == pytest.approx(3.0)
    assert thr.throughput_rps > 2.5 * lat.throughput_rps


def test_baselines_single_and_two_devices():
    c = fake_costs(seed=2)
    for k in (1, 2):
        p = plan_chain(c, "latency", max_computing=k)
        assert len(p.computing) <= k
        assert (p.latency_ms,) == pytest.approx((brute(c, "latency", k)[0][0],))
    assert plan_chain(c, "latency").latency_ms <= plan_chain(c, "latency", 2).latency_ms


def test_memory_limits_steer_the_plan():
    free = fake_costs(seed=4)
    unconstrained = plan_chain(free, "latency")
    # every device except the last can hold 6 MiB: the weights (8 nodes, 1-4 MiB each)
    # must spread out
    limited = fake_costs(seed=4, limits=[6 * MIB, 6 * MIB, None])
    p = plan_chain(limited, "latency")
    assert p is not None
    for s in p.stages:
        assert limited.fits(s.device, s.start, s.end)
    assert brute(limited, "latency")[0][0] == pytest.approx(p.latency_ms)
    assert p.latency_ms >= unconstrained.latency_ms


def test_no_assignment_fits_names_the_memory_needed():
    c = fake_costs(seed=5, limits=[1 * MIB, 1 * MIB, 1 * MIB])
    assert plan_chain(c, "latency") is None
    err = no_fit_error(c, ["a", "b", "c"])
    assert isinstance(err, UsageError) and err.exit_code == EXIT_USAGE
    # the least any plan asks of its busiest device, found by brute force
    need = min(max(c.memory(d, a, b) for d, (a, b) in enumerate(zip(
        [0, *cuts], [*cuts, c.n], strict=True)))
        for k in range(3) for cuts in itertools.combinations_with_replacement(
            c.positions[:-1], k))
    assert f"{need / MIB:.1f} MB" in err.message, err.message
    assert "at least" in err.hint


# --------------------------------------------------------------------------- topology


@pytest.fixture
def quick(tmp_path: Path) -> Path:
    return quick_profile(tmp_path / "quick.yaml")


def _topo(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "topo.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_topology_loads_in_order(tmp_path, quick):
    t = load_topology(chain_topology(tmp_path / "t.yaml", quick, 4, "20Mbps", "8ms",
                                     memory_mb=[64, None, None, None]))
    assert [d.name for d in t.devices] == ["d0", "d1", "d2", "d3"]
    assert [h.bps for h in t.hops] == [20e6] * 3 and t.hops[0].rtt_ms == 8.0
    assert t.devices[0].memory_mb == 64 and t.devices[1].memory_mb is None
    edge = load_topology(_topo(tmp_path, "devices: [{name: a, profile: edge-cpu}]\n"))
    assert edge.devices[0].memory_mb == 2048  # from the profile's limits.memory_mb


@pytest.mark.parametrize("text,message,hint", [
    ("devices: [{name: a, profile: edge-cpuu}]\n", "unknown profile 'edge-cpuu'",
     "did you mean 'edge-cpu'"),
    ("devices: [{name: a, profile: host-cpu}, {name: b, profile: host-cpu}]\n"
     "links: [{from: a, to: bb, bandwidth: 1Mbps, rtt: 1ms}]\n",
     "unknown device 'bb'", "did you mean 'b'"),
    ("devices: [{name: a, profile: host-cpu}, {name: b, profile: host-cpu},"
     " {name: c, profile: host-cpu}]\n"
     "links: [{from: a, to: b, bandwidth: 1Mbps, rtt: 1ms}]\n",
     "no link from 'b' to 'c'", "add"),
    ("devices: [{name: a, profile: host-cpu}, {name: b, profile: host-cpu}]\n"
     "links: [{from: a, to: b, bandwidth: 1Mbps, rtt: 1ms},"
     " {from: b, to: a, bandwidth: 1Mbps, rtt: 1ms}]\n",
     "a chain has no cycle", "order"),
    ("devices: [{name: a, profile: host-cpu}, {name: b, profile: host-cpu}]\n"
     "links: [{from: a, to: a, bandwidth: 1Mbps, rtt: 1ms}]\n", "(a cycle)", "order"),
    ("devices: [{name: a, profile: host-cpu}]\nlnks: []\n", "unknown key 'lnks'",
     "did you mean 'links'"),
    ("devices: [{name: a, profile: host-cpu}, {name: b, profile: host-cpu}]\n"
     "links: [{from: a, to: b, bandwidth: 1Mbq, rtt: 1ms}]\n", "unknown unit 'Mbq'", ""),
    ("devices: [{name: a, profile: host-cpu}, {name: a, profile: host-cpu}]\n",
     "used twice", ""),
])
def test_bad_topologies(tmp_path, text, message, hint):
    with pytest.raises(RecipeError) as e:
        load_topology(_topo(tmp_path, text))
    assert message in e.value.message and hint in (e.value.hint or ""), str(e.value)
    assert e.value.exit_code == EXIT_USAGE and "topo.yaml" in e.value.message


def test_bad_topology_on_the_command_line(tmp_path, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx")
    r = invoke("partition", model, "--topology", _topo(
        tmp_path, "devices: [{name: a, profile: edge-cpuu}]\n"))
    assert r.exit_code == EXIT_USAGE and "did you mean 'edge-cpu'" in r.stderr, r.output
    r = invoke("partition", model, "--device", "host-cpu", "--server", "host-cpu",
               "--objective", "throughput")
    assert r.exit_code == EXIT_USAGE and "needs --topology" in r.stderr
    r = invoke("partition", model)
    assert r.exit_code == EXIT_USAGE and "--device and --server are required" in r.stderr


# --------------------------------------------------------------------------- a real plan


def fake_times(graph: PartitionGraph, positions: list[int], per_node_ms: float) -> HostTimes:
    segs = [per_node_ms * (b - a) for a, b in zip(positions[:-1], positions[1:], strict=True)]
    return HostTimes(positions, sum(segs), segs, 0.0)


def _cache(model: Path, topo, batch: int = 1, per_node_ms: float = 1.0) -> dict:
    """A timing cache of fake host times, so the plan is decided by known numbers."""
    g = PartitionGraph.load(model, batch)
    pos = [0, *g.candidates(4)[0], g.n_nodes]
    from compactor.partition.multi import _side

    key = _side(topo.devices[0]).timing_key()
    return {(str(model.resolve()), batch, tuple(pos), key): fake_times(g, pos, per_node_ms)}


def test_chain_plan_writes_exact_parts_and_every_term(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32)
    # three equal devices on fast links, 1 ms a node: a stream is fastest spread over all
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "1Gbps", "1ms"))
    out = tmp_path / "out"
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput", refine=False),
                         out_dir=out, timing_cache=_cache(model, topo))
    plan = json.loads((out / "plan.json").read_text())
    ch = plan["choice"]
    assert len(ch["devices_computing"]) == 3
    assert ch["throughput_rps"] > 2 * plan["best_single_device"]["throughput_rps"]
    assert ch["latency_ms"] == pytest.approx(sum(
        s["compute_ms"] + s["serialize_ms"] + s["forward_ms"] + s["rtt_ms"] + s["back_ms"]
        for s in ch["stages"]),
        abs=1e-3)
    assert plan["best_two_devices"]["bottleneck_ms"] >= ch["bottleneck_ms"] - 1e-9
    assert plan["verification"]["passed"] and plan["verification"]["max_abs_error"] < 1e-5
    parts = sorted(out.glob("part*.onnx"))
    assert len(parts) == len([s for s in ch["stages"] if s["nodes"][1] > s["nodes"][0]])
    assert (out / "chart.svg").read_text().startswith("<svg")
    # the written parts, run in sequence, are the model
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 32)).astype(np.float32)
    vals = {"image": x}
    for p in parts:
        s = plain_session(str(p))
        vals = dict(zip([o.name for o in s.get_outputs()],
                        s.run(None, {i.name: vals[i.name] for i in s.get_inputs()}),
                        strict=True))
    ref = plain_session(str(model)).run(None, {"image": x})[0]
    assert np.max(np.abs(vals["logits"] - ref)) < 1e-5
    assert r.choice.latency_ms == pytest.approx(ch["latency_ms"], abs=1e-3)


def test_chain_plan_under_memory_limits_fails_clearly(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32, channels=32)
    topo_path = chain_topology(tmp_path / "t.yaml", quick, 3, memory_mb=[0.01, 0.01, 0.01])
    r = invoke("partition", model, "--topology", topo_path, "--refine", "0")
    assert r.exit_code == EXIT_USAGE, r.output
    assert "fits no assignment" in r.stderr and "needs" in r.stderr and "MB" in r.stderr


def test_chain_simulation_runs_every_part_in_its_own_process(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "100Mbps", "2ms",
                                        slowdowns=[30, 3, 1]))
    r = plan_chain_model(model, topo, ChainOptions(refine=False), simulate=True,
                         simulate_requests=3, timing_cache=_cache(model, topo))
    sim = r.plan["simulate"]
    assert sim["processes"] == len(r.choice.stages)
    assert len(sim["runs_ms"]) == 3 and sim["latency_ms"]["p50"] > 0
    assert sim["throughput_rps"] > 0 and math.isfinite(sim["error_latency"])
    assert set(sim["compute_ms_p50"]) == {topo.devices[s.device].name
                                          for s in r.choice.stages}


def test_cli_topology_json(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = chain_topology(tmp_path / "t.yaml", quick, 3, "50Mbps", "5ms")
    r = invoke("partition", model, "--topology", topo, "--objective", "throughput",
               "--refine", "0", "-o", tmp_path / "o", "--json")
    assert r.exit_code == EXIT_OK, r.output
    plan = json.loads(r.stdout)
    assert plan["objective"] == "throughput" and plan["choice"]["throughput_rps"] > 0
    r = invoke("partition", model, "--topology", topo, "--refine", "0", "-o", tmp_path / "o")
    assert r.exit_code == EXIT_OK and "best single device" in r.stdout, r.output


# --------------------------------------------------------------------------- peers


@pytest.mark.parametrize("size", [16, 23])
def test_tiles_are_exact_for_every_k(tmp_path, size):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=size)
    g = PartitionGraph.load(model, 2)
    wins = windows(g)
    assert len(wins) >= 6  # conv relu conv relu pool conv(s2) relu conv relu
    heights = prefix_heights(g, wins)
    x = np.random.default_rng(0).standard_normal((2, 1, size, size)).astype(np.float32)
    ref = plain_session(g.model).run(None, {"image": x})[0]
    for depth in (1, 5, len(wins)):
        rest = plain_session(g.tail(g.cut(depth)))
        rows = heights[depth]
        for k in sorted({1, 2, 3, rows // 2 + 1, rows}):  # incl. one row a tile
            tl = tiles(heights, wins, depth, k)
            assert tl[0].out0 == 0 and tl[-1].out1 == heights[depth]
            sess = [plain_session(tile_model(g, depth, t)) for t in tl]
            got = run_tiled(g, depth, tl, sess, rest, {"image": x})[0]
            assert np.max(np.abs(got - ref)) < 1e-5, (depth, k)


def test_more_tiles_than_rows_is_a_usage_error(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=8)
    g = PartitionGraph.load(model, 1)
    wins = windows(g)
    heights = prefix_heights(g, wins)
    with pytest.raises(UsageError, match="cannot split a feature map of"):
        tiles(heights, wins, len(wins), heights[len(wins)] + 1)
    # --peers K is refused only when no prefix has K rows: the shallowest has the most
    most = max(heights[d] for d in cut_depths(g, wins))
    topo = peers_topology(tmp_path / "p.yaml", quick, most + 1)
    r = invoke("partition", model, "--topology", topo, "--peers", str(most + 1))
    assert r.exit_code == EXIT_USAGE and "cannot split a feature map" in r.stderr, r.output
    assert f"at most {most} peers" in r.stderr


def test_spatial_plan_and_simulation(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32)
    topo = load_topology(peers_topology(tmp_path / "p.yaml", quick, 3))
    out = tmp_path / "o"
    r = plan_spatial_model(model, topo, SpatialOptions(peers=3, max_depth=4), out_dir=out,
                           simulate=True, simulate_requests=3)
    ch = r.plan["choice"]
    assert ch["peers"] == 3 and len(ch["tiles"]) == 3
    assert r.plan["verification"]["passed"]
    assert r.plan["verification"]["max_abs_error"] < 1e-5
    assert len(list(out.glob("tile*.onnx"))) == 3 and (out / "rest.onnx").is_file()
    sim = r.plan["simulate"]
    assert sim["processes"] == 3 and len(sim["runs_ms"]) == 3
    assert sim["throughput_rps"] > 0 and math.isfinite(sim["error_throughput"])
    # the stream's rate from the tiles and rest re-timed back to back; the error against it
    assert len(ch["tile_stream_ms"]) == 3 and ch["rest_stream_ms"] > 0
    assert ch["bottleneck_ms"] == pytest.approx(max(
        ch["tile_stream_ms"][0] + ch["rest_stream_ms"], *ch["tile_stream_ms"][1:],
        sum(transfer_ms(b, ch["uplink_bps"]) for b in ch["bytes_out"]),
        sum(transfer_ms(b, ch["uplink_bps"]) for b in ch["bytes_back"])), abs=1e-3)
    assert sim["error_throughput"] == pytest.approx(
        sim["throughput_rps"] / ch["throughput_rps"] - 1, rel=1e-3)
    assert set(sim["compute_ms_p50"]) == {"tile0", "rest", "tile1", "tile2"}
    # the planner's own choice considers every K and depth
    alts = r.plan["alternatives"]
    assert {a["peers"] for a in alts} == {1, 3}  # one device alone: the baseline
    free = plan_spatial_model(model, topo, SpatialOptions(max_depth=2))
    assert {(a["peers"], a["depth"]) for a in free.plan["alternatives"]} == {
        (k, d) for k in (1, 2, 3) for d in (1, 2)}


def test_a_model_without_a_conv_prefix_is_refused(tmp_path, quick, invoke):
    from toys.onnx_graphs import mlp_onnx

    model = mlp_onnx(tmp_path / "mlp.onnx")
    topo = peers_topology(tmp_path / "p.yaml", quick, 2)
    r = invoke("partition", model, "--topology", topo)
    assert r.exit_code == EXIT_USAGE and "no convolutional prefix" in r.stderr, r.output


def test_part_model_passes_a_skip_tensor_through(tmp_path):
    """A chain stage that a residual skip crosses whole forwards the skip tensor."""
    pg = PartitionGraph.load(skip_chain_onnx(tmp_path / "s.onnx"), 2)
    mid = part_model(pg, 2, 3)  # Abs only; 'a' crosses both ends
    assert {i.name for i in mid.graph.input} == {"b", "a"}
    assert {o.name for o in mid.graph.output} == {"c", "a"}
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    vals = {"x": x}
    for a, b in ((0, 2), (2, 3), (3, 4)):
        s = plain_session(part_model(pg, a, b))
        vals = dict(zip([o.name for o in s.get_outputs()],
                        s.run(None, {i.name: vals[i.name] for i in s.get_inputs()}),
                        strict=True))
    assert np.allclose(vals["y"], np.abs(-np.maximum(x, 0)) + np.maximum(x, 0))


def test_cli_peers(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=8)
    topo = peers_topology(tmp_path / "p.yaml", quick, 2)
    r = invoke("partition", model, "--topology", topo, "--peers", "2", "-o", tmp_path / "o")
    assert r.exit_code == EXIT_OK, r.output
    assert "best single device: all on p0" in r.stdout and "max abs error" in r.stdout
    assert (tmp_path / "o" / "tile1-p1.onnx").is_file()


def test_peers_k_beyond_the_deepest_prefix_plans_a_shallower_one(tmp_path, quick):
    """--peers K with more peers than the deepest prefix's rows plans the depths that have K
    rows, not an error."""
    model = conv_chain_cnn(tmp_path / "m.onnx", size=16)
    g = PartitionGraph.load(model, 1)
    wins = windows(g)
    heights = prefix_heights(g, wins)
    depths = cut_depths(g, wins)
    k = heights[depths[-1]] + 1
    assert k <= heights[depths[0]], "the toy needs a shallow prefix with more rows"
    topo = load_topology(peers_topology(tmp_path / "p.yaml", quick, k))
    r = plan_spatial_model(model, topo, SpatialOptions(peers=k))
    ch = r.plan["choice"]
    assert ch["peers"] in (1, k) and heights[ch["depth"]] >= ch["peers"]
    assert any(c["peers"] == k for c in r.plan["alternatives"]), "K was planned somewhere"
