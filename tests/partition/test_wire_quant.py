"""int8 on the wire with a scale per channel: ``quant_params`` keeps one scale per tensor
unless a scale per channel quantizes calibration samples it was not fitted on much better
(a transformer's hidden state has a few outlier channels that take a single scale's whole
range), and the parts, the feeds and plan.json carry the choice."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from toys.partition_chain import chain_topology, fake_cache, quick_profile

from compactor.partition import graph as graph_mod
from compactor.partition.graph import PER_AXIS_GAIN_DB, PartitionGraph, quant_params
from compactor.partition.multi import ChainOptions, part_model, plan_chain_model, run_parts
from compactor.partition.profile import plain_session, quantized_feeds
from compactor.partition.topology import load_topology
from compactor.partition.wire import sqnr_db


def _outlier_rows(n: int = 64, seed: int = 0) -> np.ndarray:
    """(n, 16, 8): channel 5 of the last axis runs 100x the others."""
    x = np.random.default_rng(seed).standard_normal((n, 16, 8))
    x[..., 5] *= 100.0
    return x.astype(np.float32)


def test_an_outlier_channel_gets_a_scale_per_channel():
    x = _outlier_rows()
    wq = quant_params([x[:32], x[32:]], opset=13)
    assert wq.axis == 2 and wq.scale.shape == (8,) and wq.zero_point.shape == (8,)
    assert wq.channel_gain_db >= PER_AXIS_GAIN_DB
    new = _outlier_rows(seed=1)  # samples it was not fitted on
    one = quant_params([x], opset=12)  # before opset 13: one scale
    assert one.axis is None and one.scale.shape == ()
    got, got_one = (w.dequantize(w.quantize(new)) for w in (wq, one))
    for c in (0, 1, 2, 3, 4, 6, 7):  # one scale rounds the small channels away
        assert sqnr_db(new[..., c], got[..., c]) > 30
        assert sqnr_db(new[..., c], got_one[..., c]) < 10
    assert sqnr_db(new, got) > sqnr_db(new, got_one)
    d = wq.to_dict()
    assert d["granularity"] == "per channel" and d["axis"] == 2 and d["channels"] == 8


def test_alike_channels_and_single_samples_keep_one_scale():
    x = np.random.default_rng(0).standard_normal((64, 16, 8)).astype(np.float32)
    assert quant_params([x], opset=17).axis is None  # nothing to gain
    lone = _outlier_rows(n=1)
    assert quant_params([lone], opset=17).axis is None  # nothing to score a choice on
    assert quant_params([], opset=17).axis is None


def test_ranges_fitted_on_few_samples_are_scored_on_others():
    """Two samples of alike channels: a range per channel fitted on one sample is that
    sample's value, exact on it and wrong on the other; one scale covers both. Scored on
    the samples it was fitted on, a scale per channel would have looked perfect."""
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    wq = quant_params([x[:1], x[1:]], opset=17)
    assert wq.axis is None, wq.to_dict()


def _outlier_model(path):
    """x (n, 8) → MatMul (column 5 of the weights x100) → Relu → MatMul → y (n, 4)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w1[:, 5] *= 100.0
    w2 = rng.standard_normal((8, 4)).astype(np.float32) * 0.1
    w2[5] /= 100.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["s"], name="neg"),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(
        nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_parts_and_feeds_carry_a_scale_per_channel(tmp_path):
    pg = PartitionGraph.load(_outlier_model(tmp_path / "m.onnx"), 64)
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    sess = plain_session(pg.with_outputs(["r"]))
    (r,) = sess.run(["r"], {"x": x})
    scales = {"r": quant_params([r], opset=17)}
    assert scales["r"].axis == 1
    head, tail = part_model(pg, 0, 2, "int8", scales), part_model(pg, 2, 4, "int8", scales)
    q = [n for n in head.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in tail.graph.node if n.op_type == "DequantizeLinear"]
    assert [a.i for a in q[0].attribute if a.name == "axis"] == [1]
    assert [a.i for a in dq[0].attribute if a.name == "axis"] == [1]
    got = run_parts([plain_session(head), plain_session(tail)], {"x": x})["y"]
    ref = plain_session(pg.model).run(None, {"x": x})[0]
    # the head's uint8 is what quantized_feeds makes of the same tensor
    sent = plain_session(head).run(None, {"x": x})[0]
    np.testing.assert_array_equal(sent, quantized_feeds(pg.cut(2), {"r": r}, scales)["r.int8"])
    one = {"r": quant_params([r], opset=12)}
    got_one = run_parts([plain_session(part_model(pg, 0, 2, "int8", one)),
                         plain_session(part_model(pg, 2, 4, "int8", one))], {"x": x})["y"]
    assert sqnr_db(ref, got) > sqnr_db(ref, got_one) + 10


@pytest.mark.parametrize("per_axis", [True, False])
def test_plan_json_says_how_each_tensor_travels(tmp_path, monkeypatch, per_axis):
    if not per_axis:  # as a model before opset 13 would be planned
        monkeypatch.setattr(graph_mod, "PER_AXIS_OPSET", 99)
    model = _outlier_model(tmp_path / "m.onnx")
    quick = quick_profile(tmp_path / "q.yaml")
    # two equal devices on a fast link, 1 ms a node: the stream is fastest split in two
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 2, "1Gbps", "1ms"))
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput", refine=False,
                                                   compress_transfer="int8"),
                         data=[{"x": x}], timing_cache=fake_cache(model, topo))
    comp = json.loads(json.dumps(r.plan["compression"]))
    assert "per tensor or per channel" in comp["mode"]
    (cut,) = comp["cuts"]
    (q,) = cut["quantization"].values()  # h, r or s: each has the outlier column
    assert q["granularity"] == ("per channel" if per_axis else "per tensor"), q
    assert (q["axis"] == 1) if per_axis else q["axis"] is None
    assert q["per_tensor_sqnr_db"] is not None
    if per_axis:
        assert q["channel_gain_db"] >= PER_AXIS_GAIN_DB


def test_cosine_min_is_the_worst_sample():
    from compactor.partition.wire import cosine_min

    ref = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert cosine_min(ref, ref) == pytest.approx(1.0)  # a zero row equal to zero counts 1
    got = np.array([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    assert cosine_min(ref, got) == pytest.approx(np.sqrt(0.5))
    assert cosine_min(ref, -ref + np.array([[0, 0], [0, 0], [1, 0]])) == pytest.approx(-1.0)


def test_the_terminal_line_names_cosine_and_scales_per_channel():
    from compactor.cli.partition_cmd import _cosine, _per_channel

    assert _cosine({"cosine_min": 0.99876}) == ", cosine ≥ 0.9988"
    assert _cosine({"cosine_min": 0.999985}) == ", cosine ≥ 1 − 1.5e-05"  # not "1.0000"
    assert _cosine({}) == ""
    cuts = [{"quantization": {"a": {"axis": 2}, "b": {"axis": None}}},
            {"quantization": {"c": {"axis": 1}}}]
    assert _per_channel(cuts) == ", a scale per channel on 2 of 3 tensors"
    assert _per_channel([{"quantization": {"a": {"axis": None}}}]) == ""


def test_the_ranges_kept_cover_samples_beyond_those_scored():
    from compactor.partition.graph import SCORE_SAMPLES

    x = _outlier_rows(n=SCORE_SAMPLES + 8)
    x[-1, 0, 3] = 40.0  # past the scored samples, in a small channel
    wq = quant_params([x[i:i + 1] for i in range(len(x))], opset=13)
    assert wq.axis == 2
    back = wq.dequantize(wq.quantize(x[-1:]))
    assert back[0, 0, 3] == pytest.approx(40.0, rel=0.01)
