"""The spatial split's tiled prefix as a DAG: residual blocks and element-wise joins, each
tensor's rows (the hull of its readers'), the crops a skip branch needs, the tiles' exact
concatenation, where the prefix may end, and plans over it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from toys.partition_chain import conv_chain_cnn, peers_topology, quick_profile
from toys.partition_residual import residual_cnn

from compactor.partition.graph import PartitionGraph
from compactor.partition.profile import plain_session
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

# residual_cnn's nodes in order: stem, relu | expand, relu, dw, relu, project, add |
# u, v, sigmoid, mul, add(bias) | down, relu | pool, conv, sum | gap, flatten, fc
AFTER_BLOCK = 8  # the first depth past the inverted residual block
INSIDE_BLOCK = range(3, 8)  # the skip crosses these cuts as well as the branch


@pytest.fixture
def quick(tmp_path):
    return quick_profile(tmp_path / "quick.yaml")


def _prefix_value(g: PartitionGraph, depth: int, x: np.ndarray) -> np.ndarray:
    cut = g.crossing(depth)[0]
    sess = plain_session(g.with_outputs([cut]))
    names = [o.name for o in sess.get_outputs()]
    return sess.run(None, {"image": x})[names.index(cut)]


def test_the_prefix_runs_through_residual_blocks_to_the_global_pool(tmp_path):
    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx"), 1)
    wins = windows(g)
    assert len(wins) == g.n_nodes - 3  # all but global pool, flatten, gemm
    assert cut_depths(g, wins) == [1, 2, AFTER_BLOCK, 12, 13, 14, 15, 18]
    assert not any(wins[d - 1].cut for d in INSIDE_BLOCK)
    assert wins[7].src == (1, 6)  # the Add reads the skip (stem relu) and the projection
    assert prefix_heights(g, wins)[-1] == 8  # the stride-2 conv halves the rows


@pytest.mark.parametrize("size", [16, 23])
def test_tiles_of_a_residual_prefix_are_exact(tmp_path, size):
    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx", size=size), 2)
    wins = windows(g)
    heights = prefix_heights(g, wins)
    x = np.random.default_rng(0).standard_normal((2, 1, size, size)).astype(np.float32)
    ref = plain_session(g.model).run(None, {"image": x})[0]
    for depth in cut_depths(g, wins):
        want = _prefix_value(g, depth, x)
        rest = plain_session(g.tail(g.cut(depth)))
        rows = heights[depth]
        # one row a tile where the rows are few (the sessions are what takes the time)
        for k in sorted({1, 2, 3, rows // 2 + 1} | ({rows} if rows <= 12 else set())):
            tl = tiles(heights, wins, depth, k)
            sess = [plain_session(tile_model(g, depth, t)) for t in tl]
            strips = [s.run(None, {"image": x[:, :, t.in0:t.in1]})[0]
                      for s, t in zip(sess, tl, strict=True)]
            err = float(np.max(np.abs(np.concatenate(strips, axis=2) - want)))
            assert err < 1e-5, (depth, k, err)
            if k == 3:
                got = run_tiled(g, depth, tl, sess, rest, {"image": x})[0]
                assert np.max(np.abs(got - ref)) < 1e-5, (depth, k)


def test_the_skip_branch_is_cropped_to_the_rows_the_add_needs(tmp_path):
    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx"), 1)
    wins = windows(g)
    heights = prefix_heights(g, wins)
    mid = tiles(heights, wins, AFTER_BLOCK, 3)[1]  # an inner tile: halos on both sides
    a, b = mid.out0, mid.out1
    assert mid.rows[7] == (a, b)  # the Add computes its strip
    assert mid.rows[4] == (a, b)  # the depthwise's output: the 1x1 projection's rows
    assert mid.rows[3] == (a - 1, b + 1)  # its input: one more row each side (3x3)
    assert mid.rows[1] == (a - 1, b + 1)  # the stem's output: the hull of both readers
    assert (mid.in0, mid.in1) == (a - 2, b + 2)  # the stem's own 3x3 halo on the input
    crop = [(c.node, c.slot, c.src, c.lo, c.hi) for c in mid.crops]
    assert crop == [(7, 0, 1, a, b)]  # the Add's skip input: only the strip's rows
    m = tile_model(g, AFTER_BLOCK, mid)
    onnx.checker.check_model(m)
    assert [n.op_type for n in m.graph.node].count("Slice") == 1
    # the first tile: no halo above the map, so the skip needs no crop at the top edge
    first = tiles(heights, wins, AFTER_BLOCK, 3)[0]
    assert first.pads[0] == (1, 0) and first.crops[0].lo == 0


def test_a_tensor_read_by_three_nodes(tmp_path):
    """``Sum(d, maxpool(d), conv(d))``: d is computed over the hull (the pool's and the
    conv's 3x3 halo), and the Sum reads d cropped to its own rows."""
    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx"), 1)
    wins = windows(g)
    heights = prefix_heights(g, wins)
    t = tiles(heights, wins, 18, 2)[1]
    a, b = t.out0, t.out1
    assert t.rows[14] == (a - 1, b)  # the down relu: one row of halo, none past the map
    assert t.pads[15] == (0, 1) and t.pads[16] == (0, 1)  # pool and conv: bottom edge
    assert [(c.node, c.slot, c.lo, c.hi) for c in t.crops if c.node == 17] == [(17, 0, a, b)]


def test_before_opset_10_the_prefix_stays_a_chain(tmp_path):
    """Below opset 10 Slice takes no row inputs: the prefix ends at the first tensor read
    twice (the residual block's skip), as before joins were tiled."""
    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx", opset=9), 1)
    wins = windows(g)
    assert len(wins) == 2 and cut_depths(g, wins) == [1, 2]


def _join_with(tmp_path, const_shape) -> PartitionGraph:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Add", ["c", "k"], ["y"], name="add"),
             helper.make_node("Relu", ["y"], ["z"], name="relu"),
             helper.make_node("GlobalAveragePool", ["z"], ["out"], name="gap")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(rng.standard_normal(const_shape).astype(np.float32),
                                     "k")]
    graph = helper.make_graph(
        nodes, "join", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                      ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 1, 1])],
        initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "j.onnx"))
    return PartitionGraph.load(tmp_path / "j.onnx", 1)


def test_a_join_with_a_constant_of_several_rows_ends_the_prefix(tmp_path):
    """A per-channel constant is the same on every row: each tile adds it whole. One with
    rows (a positional map) would have to be cut per tile: the prefix stops before it."""
    assert len(windows(_join_with(tmp_path, (1, 4, 1, 1)))) == 3
    assert len(windows(_join_with(tmp_path, (1, 4, 8, 8)))) == 1


def test_tiles_at_a_depth_inside_a_block_are_refused(tmp_path):
    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx"), 1)
    wins = windows(g)
    with pytest.raises(ValueError, match="more than its output crosses"):
        tiles(prefix_heights(g, wins), wins, 5, 2)


def test_plan_over_a_residual_prefix(tmp_path, quick):
    model = residual_cnn(tmp_path / "r.onnx", size=16)
    topo = load_topology(peers_topology(tmp_path / "p.yaml", quick, 2))
    r = plan_spatial_model(model, topo, SpatialOptions(peers=2, max_depth=13),
                           out_dir=tmp_path / "o")
    plan = r.plan
    assert plan["model"]["tileable_depth"] == 18
    # every depth the prefix may end at, up to max_depth (cut back to the last such)
    assert {a["depth"] for a in plan["alternatives"]} == {1, 2, AFTER_BLOCK, 12, 13}
    assert plan["verification"]["passed"] and plan["verification"]["max_abs_error"] < 1e-5
    ch = plan["choice"]
    assert len(ch["tiles"]) == 2
    for t in ch["tiles"]:
        assert len(t["node_rows"]) == ch["depth"] and len(t["halo_pads"]) == ch["depth"]
        assert t["node_rows"][list(t["node_rows"])[-1]] == t["output_rows"]
    written = json.loads((tmp_path / "o" / "plan.json").read_text(encoding="utf-8"))
    assert written["choice"]["tiles"] == json.loads(json.dumps(ch["tiles"]))


def test_plan_reports_the_crops_of_its_tiles(tmp_path):
    """plan.json names each crop: the node, the tensor it reads, its rows of what the tile
    computed (a plan forced past the residual block by max_depth and a K fixed)."""
    from compactor.partition.spatial import _tile_rows

    g = PartitionGraph.load(residual_cnn(tmp_path / "r.onnx"), 1)
    wins = windows(g)
    t = tiles(prefix_heights(g, wins), wins, AFTER_BLOCK, 2)[1]
    rows = _tile_rows(g, t)
    assert rows["crops"] == [{"node": "b1.add", "tensor": "stem.relu",
                              "rows": [t.out0, t.out1], "of_rows": [t.out0 - 1, t.out1]}]
    assert rows["node_rows"]["b1.dw"] == [t.out0, t.out1]
    assert rows["node_rows"]["b1.expand"] == [t.out0 - 1, t.out1]


def test_a_model_that_is_all_prefix_is_a_usage_error(tmp_path, quick, invoke):
    """One convolution and nothing after it: no rest to gather the strips into."""
    from compactor.errors import EXIT_USAGE

    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "c.onnx"))
    r = invoke("partition", tmp_path / "c.onnx", "--topology",
               peers_topology(tmp_path / "p.yaml", quick, 2))
    assert r.exit_code == EXIT_USAGE and "all convolutional prefix" in r.stderr, r.output


def test_the_model_input_read_twice_is_cropped_too(tmp_path):
    """``Add(image, conv5x5(image))`` → relu → conv: each tile's input carries the 5x5 halo,
    and the Add reads the input cropped to the rows the conv made."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], pads=[2, 2, 2, 2], name="c5"),
             helper.make_node("Add", ["image", "c"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], pads=[2, 2, 2, 2], name="c5b")]
    w = numpy_helper.from_array(rng.standard_normal((1, 1, 5, 5)).astype(np.float32), "w")
    graph = helper.make_graph(
        nodes, "skip-input",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 12, 12])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "s.onnx"))
    g = PartitionGraph.load(tmp_path / "s.onnx", 1)
    wins = windows(g)
    assert cut_depths(g, wins) == [2, 3]
    heights = prefix_heights(g, wins)
    x = rng.standard_normal((1, 1, 12, 12)).astype(np.float32)
    want = _prefix_value(g, 3, x)
    for k in (2, 3, 4):
        tl = tiles(heights, wins, 3, k)
        inner = tl[1]
        assert (inner.in0, inner.in1) == (inner.out0 - 2, min(inner.out1 + 2, 12))
        assert [(c.node, c.slot, c.src) for c in inner.crops] == [(1, 0, -1)]
        strips = [plain_session(tile_model(g, 3, t)).run(
            None, {"image": x[:, :, t.in0:t.in1]})[0] for t in tl]
        assert np.max(np.abs(np.concatenate(strips, axis=2) - want)) < 1e-5, k


def test_the_choice_is_made_among_options_re_timed_with_the_full_settings(tmp_path):
    """Every option is timed quickly; the best few (and the best on one board) are timed
    again with the full settings, and the plan is one of those."""
    from compactor.partition import spatial

    quick = quick_profile(tmp_path / "q.yaml")
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32)
    topo = load_topology(peers_topology(tmp_path / "p.yaml", quick, 3, "1Gbps"))
    r = plan_spatial_model(model, topo, SpatialOptions())
    plan = r.plan
    assert plan["choice"]["timing"] == "full"
    assert plan["best_single_device"]["timing"] == "full"
    full = [c for c in plan["alternatives"] if c["timing"] == "full"]
    assert 1 <= len(full) <= spatial.REFINE + 1
    assert len(plan["alternatives"]) > len(full), "the others keep their quick figures"
    best_full = min(full, key=lambda c: c["latency_ms"])
    assert plan["choice"]["latency_ms"] == pytest.approx(best_full["latency_ms"])
