"""int8 on the wire across a chain of devices (``compactor partition --topology CHAIN.yaml
--compress-transfer int8``): where the Q/DQ nodes go, the bytes costed, a bandwidth where
int8 makes a split pay, the measured effect on the outputs, the simulation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from toys.partition_chain import (
    chain_topology,
    conv_chain_cnn,
    fake_cache,
    peers_topology,
    quick_profile,
    skip_chain_onnx,
)

from compactor.errors import EXIT_OK, EXIT_USAGE, UsageError
from compactor.partition.graph import QUANT_SUFFIX, PartitionGraph, quant_params
from compactor.partition.multi import (
    ChainOptions,
    part_model,
    plan_chain_model,
    run_parts,
)
from compactor.partition.profile import plain_session
from compactor.partition.simulate import message_bytes
from compactor.partition.topology import load_topology
from compactor.partition.wire import sqnr_db


@pytest.fixture
def quick(tmp_path: Path) -> Path:
    return quick_profile(tmp_path / "quick.yaml")


def _ops(m) -> list[str]:
    return [n.op_type for n in m.graph.node]


def _run_files(paths, feeds) -> dict:
    return run_parts([plain_session(str(p)) for p in paths], feeds)


def test_parts_quantize_and_dequantize_exactly_at_the_inner_cuts(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32)
    # three equal devices on fast links, 1 ms a node: the stream is fastest spread over all
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "1Gbps", "1ms"))
    out = tmp_path / "out"
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput", refine=False,
                                                   compress_transfer="int8"),
                         out_dir=out, timing_cache=fake_cache(model, topo))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["compress_transfer"] == "int8"
    ch = plan["choice"]
    assert len(ch["devices_computing"]) == 3, ch["description"]
    g = PartitionGraph.load(model, 1)
    parts = sorted(out.glob("part*.onnx"))
    assert len(parts) == 3
    first, mid, last = (onnx.load(str(p)) for p in parts)
    a, b = r.choice.cuts[0], r.choice.cuts[1]
    sent_a = [t.name for t in g.cut(a).tensors]
    sent_b = [t.name for t in g.cut(b).tensors]
    # the first part takes the model's float input as it is, and ends in QuantizeLinear
    assert [i.name for i in first.graph.input] == ["image"]
    assert "DequantizeLinear" not in _ops(first)
    assert _ops(first).count("QuantizeLinear") == len(sent_a)
    assert [o.name for o in first.graph.output] == [t + QUANT_SUFFIX for t in sent_a]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.UINT8
               for o in first.graph.output)
    # the middle part: uint8 in, uint8 out
    assert [i.name for i in mid.graph.input] == [t + QUANT_SUFFIX for t in sent_a]
    assert _ops(mid)[: len(sent_a)] == ["DequantizeLinear"] * len(sent_a)
    assert _ops(mid)[-len(sent_b):] == ["QuantizeLinear"] * len(sent_b)
    # the last part dequantizes what it receives and returns the model's float outputs
    assert [i.name for i in last.graph.input] == [t + QUANT_SUFFIX for t in sent_b]
    assert "QuantizeLinear" not in _ops(last)
    assert [o.name for o in last.graph.output] == ["logits"]
    assert last.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # the written int8 parts in sequence are the model up to int8 noise on the wire
    x = np.random.default_rng(1).standard_normal((16, 1, 32, 32)).astype(np.float32)
    ref = plain_session(str(model)).run(None, {"image": x})[0]
    got = _run_files(parts, {"image": x})["logits"]
    assert sqnr_db(ref, got) > 25, f"SQNR {sqnr_db(ref, got):.1f} dB"
    # the float parts were verified exactly; the int8 effect measured on held-out batches
    assert plan["verification"]["passed"] and plan["verification"]["max_abs_error"] < 1e-5
    comp = plan["compression"]
    assert comp["sqnr_db"] > 25, comp
    assert comp["evaluated_on"] == "batches not used for the scales"
    assert comp["calibration_batches"] == 4 and comp["evaluated_samples"] == 4
    assert comp["top1_agreement"] >= 0.75 and set(comp["outputs"]) == {"logits"}
    assert [c["position"] for c in comp["cuts"]] == [a, b]
    for c in comp["cuts"]:
        assert c["bytes_float"] == 4 * c["bytes_int8"] and c["bytes_ratio"] == 4.0
    assert [st["sent_as"] for st in ch["stages"]] == ["int8", "int8", "as computed"]


def test_int8_sends_a_quarter_of_the_bytes_at_the_same_cuts(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32)
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "1Gbps", "1ms"))
    cache = fake_cache(model, topo)
    fp = plan_chain_model(model, topo, ChainOptions(objective="throughput", refine=False),
                          timing_cache=cache)
    q8 = plan_chain_model(model, topo, ChainOptions(objective="throughput", refine=False,
                                                    compress_transfer="int8"),
                          timing_cache=cache)
    assert fp.choice.cuts == q8.choice.cuts and len(fp.choice.stages) == 3
    g = PartitionGraph.load(model, 1)
    for f, q in zip(fp.choice.stages[:-1], q8.choice.stages[:-1], strict=True):
        ratio = q.bytes_forward / f.bytes_forward
        assert 0.25 <= ratio < 0.3, ratio  # a message's few framing bytes stay
        assert 4 * g.cut(q.end).wire_bytes("int8") == g.cut(q.end).wire_bytes()
        assert q.bytes_forward == message_bytes(g.cut(q.end).wire_tensors("int8"))
        assert q.forward_ms < f.forward_ms
    assert fp.plan["compress_transfer"] == "none" and "compression" not in fp.plan


def test_a_bandwidth_where_int8_makes_a_split_pay(tmp_path, quick):
    # a phone 10x slower than the gateway on a 64 kbps link, 1 ms a node here: in float,
    # every cut (or the input) takes longer to send than the phone takes to finish alone;
    # at a quarter of the bytes, sending the pooled feature map pays
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 2, "64kbps", "1ms",
                                        slowdowns=[10, 1]))
    cache = fake_cache(model, topo)
    fp = plan_chain_model(model, topo, ChainOptions(refine=False), timing_cache=cache)
    q8 = plan_chain_model(model, topo, ChainOptions(refine=False, compress_transfer="int8"),
                          timing_cache=cache)
    assert fp.choice.computing == [0], fp.plan["choice"]["description"]
    assert q8.choice.computing == [0, 1], q8.plan["choice"]["description"]
    assert 0 < q8.choice.cuts[0] < fp.choice.cuts[-1]
    assert q8.choice.latency_ms < 0.9 * fp.choice.latency_ms
    # the same split in float: its 4x bytes make it slower than the phone alone (the
    # segment sums are float either way, so only the bytes on the link differ)
    g = PartitionGraph.load(model, 1)
    cut = g.cut(q8.choice.cuts[0])
    extra_ms = (message_bytes(cut.wire_tensors()) - message_bytes(cut.wire_tensors("int8"))
                ) * 8 / 64e3 * 1e3
    assert q8.choice.latency_ms + extra_ms > fp.choice.latency_ms
    assert q8.plan["compression"]["sqnr_db"] > 25


def test_a_cut_at_0_sends_the_raw_input(tmp_path, quick):
    # a fast link and a slow phone: the phone forwards the input, which is never quantized
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 2, "1Mbps", "1ms",
                                        slowdowns=[10, 1]))
    cache = fake_cache(model, topo)
    q8 = plan_chain_model(model, topo, ChainOptions(refine=False, compress_transfer="int8"),
                          out_dir=tmp_path / "o", timing_cache=cache)
    fp = plan_chain_model(model, topo, ChainOptions(refine=False), timing_cache=cache)
    assert q8.choice.cuts[0] == 0 and q8.choice.computing == [1]
    g = PartitionGraph.load(model, 1)
    assert q8.choice.stages[0].bytes_forward == message_bytes(g.cut(0).wire_tensors())
    assert q8.choice.latency_ms == pytest.approx(fp.choice.latency_ms, abs=0.5)
    comp = q8.plan["compression"]
    assert comp["cuts"] == [] and "raw input" in comp["note"]
    assert comp["links"][0]["int8"] is False
    (part,) = (tmp_path / "o").glob("part*.onnx")
    assert "QuantizeLinear" not in _ops(onnx.load(str(part)))
    assert "DequantizeLinear" not in _ops(onnx.load(str(part)))


def test_a_part_passes_a_uint8_skip_tensor_on_untouched(tmp_path):
    pg = PartitionGraph.load(skip_chain_onnx(tmp_path / "s.onnx"), 2)
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    full = plain_session(pg.model)
    sess = plain_session(pg.with_outputs(["a", "b", "c"]))
    vals = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}),
                    strict=True))
    scales = {t: quant_params([vals[t]]) for t in ("a", "b", "c")}
    mid = part_model(pg, 2, 3, "int8", scales)  # Abs only; 'a' crosses both ends
    assert {i.name for i in mid.graph.input} == {"b.int8", "a.int8"}
    assert {o.name for o in mid.graph.output} == {"c.int8", "a.int8"}
    assert [n.input[0] for n in mid.graph.node if n.op_type == "QuantizeLinear"] == ["c"]
    parts = [plain_session(part_model(pg, a, b, "int8", scales))
             for a, b in ((0, 2), (2, 3), (3, 4))]
    got = run_parts(parts, {"x": x})
    ref = full.run(None, {"x": x})[0]
    assert sqnr_db(ref, got["y"]) > 35, sqnr_db(ref, got["y"])
    # the uint8 'a' leaves the middle part exactly as it came in
    first = run_parts(parts[:1], {"x": x})
    through = run_parts(parts[1:2], first)
    assert np.array_equal(through["a.int8"], first["a.int8"])


def test_simulate_runs_a_three_device_int8_chain_with_a_forwarder(tmp_path, quick):
    # the middle device is 50x slower: a stream is fastest with the ends computing halves
    # and the middle forwarding the uint8 message untouched
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "1Gbps", "1ms",
                                        slowdowns=[1, 50, 1]))
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput", refine=False,
                                                   compress_transfer="int8"),
                         simulate=True, simulate_requests=3,
                         timing_cache=fake_cache(model, topo))
    st = r.choice.stages
    assert len(st) == 3 and st[1].end == st[1].start and r.choice.computing == [0, 2], \
        r.plan["choice"]["description"]
    assert 0 < st[0].end < r.choice.cuts[-1]
    sim = r.plan["simulate"]
    assert sim["processes"] == 3 and len(sim["runs_ms"]) == 3
    assert sim["latency_ms"]["p50"] > 0 and sim["throughput_rps"] > 0
    assert r.plan["compression"]["sqnr_db"] > 25
    assert [x["int8"] for x in r.plan["compression"]["links"]] == [True, True]


def test_labelled_data_gives_accuracy_with_and_without_int8(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 2, "64kbps", "1ms",
                                        slowdowns=[10, 1]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    r = plan_chain_model(model, topo, ChainOptions(refine=False, compress_transfer="int8"),
                         data=[{"image": x}], targets=y, timing_cache=fake_cache(model, topo))
    comp = r.plan["compression"]
    assert comp["cuts"], r.plan["choice"]["description"]
    # scales from the first 32 samples (half the data, at most 64), the effect on the rest
    assert comp["calibration_batches"] == 20 and comp["evaluated_samples"] == 20
    ref = plain_session(str(model)).run(None, {"image": x[20:]})[0]
    assert comp["accuracy_float"] == pytest.approx(float(np.mean(ref.argmax(1) == y[20:])))
    assert comp["accuracy_drop"] == pytest.approx(
        comp["accuracy_float"] - comp["accuracy_int8_transfer"])


def test_cli_int8_chain(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = chain_topology(tmp_path / "t.yaml", quick, 3, "64kbps", "1ms")
    r = invoke("partition", model, "--topology", topo, "--compress-transfer", "int8",
               "--refine", "0", "-o", tmp_path / "o", "--json")
    assert r.exit_code == EXIT_OK, r.output
    plan = json.loads(r.stdout)
    assert plan["compress_transfer"] == "int8" and "compression" in plan
    r = invoke("partition", model, "--topology", topo, "--compress-transfer", "int8",
               "--refine", "0", "-o", tmp_path / "o")
    assert r.exit_code == EXIT_OK, r.output
    assert "int8 on the wire" in r.stdout and "int8 transfer" in r.stdout


def test_int8_on_peers_is_a_usage_error(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=8)
    topo = peers_topology(tmp_path / "p.yaml", quick, 2)
    r = invoke("partition", model, "--topology", topo, "--compress-transfer", "int8")
    assert r.exit_code == EXIT_USAGE, r.output
    assert "is for a chain of devices" in r.stderr and "peers topology" in r.stderr
    assert "leave --compress-transfer out" in r.stderr


def test_int8_needs_opset_10(tmp_path, quick, invoke):
    model = conv_chain_cnn(tmp_path / "m9.onnx", opset=9)
    topo = chain_topology(tmp_path / "t.yaml", quick, 3)
    r = invoke("partition", model, "--topology", topo, "--compress-transfer", "int8",
               "--refine", "0")
    assert r.exit_code == EXIT_USAGE, r.output
    assert "needs ONNX opset 10 or later (the model has opset 9)" in r.stderr
    assert "re-export" in r.stderr
    with pytest.raises(UsageError, match="opset 10"):
        plan_chain_model(model, load_topology(topo), ChainOptions(compress_transfer="int8"))


def test_chain_options_refuse_an_unknown_compression():
    with pytest.raises(UsageError, match="unknown compress_transfer 'fp8'"):
        ChainOptions(compress_transfer="fp8")


def test_refine_times_the_chosen_int8_parts_as_they_run(tmp_path, quick):
    model = conv_chain_cnn(tmp_path / "m.onnx", size=32)
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 3, "1Gbps", "1ms"))
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput",
                                                   compress_transfer="int8"),
                         timing_cache=fake_cache(model, topo, per_node_ms=5.0))
    ch = r.plan["choice"]
    computing = [st for st in ch["stages"] if st["nodes"][1] > st["nodes"][0]]
    assert len(computing) >= 2, ch["description"]
    direct = r.plan["timing"]["direct_ms"]
    for st in computing:
        # each chosen part timed for real (Q/DQ included), far below the fake 5 ms a node
        assert st["compute_source"] == "measured"
        assert f"0:{st['nodes'][0]}-{st['nodes'][1]}" in direct
        assert 0 < st["compute_ms"] < 5.0 * (st["nodes"][1] - st["nodes"][0])
        assert st["compute_stream_ms"] > 0


def _fake_part_time(qdq_ms: float):
    """A part's "measured" time: 1 ms a node, ``qdq_ms`` a QuantizeLinear/DequantizeLinear
    (the segment sums of ``fake_cache`` are 1 ms a node too)."""
    def time_ms(model, *_a, **_k):
        ops = [n.op_type for n in model.graph.node]
        qdq = sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops)
        return (len(ops) - qdq) * 1.0 + qdq * qdq_ms
    return time_ms


@pytest.mark.parametrize("bandwidth, qdq_ms, slower", [("1Gbps", 3.0, True),
                                                       ("64kbps", 0.0, False)])
def test_int8_is_compared_with_float_on_the_wire(tmp_path, quick, monkeypatch, bandwidth,
                                                 qdq_ms, slower):
    """A fast link with costly Q/DQ: the float plan wins and a note says int8 does not pay;
    a slow link: int8 wins, no note. Both plans' parts are timed alike (here, faked)."""
    from compactor.partition import multi

    monkeypatch.setattr(multi, "time_ms", _fake_part_time(qdq_ms))
    model = conv_chain_cnn(tmp_path / "m.onnx")
    topo = load_topology(chain_topology(tmp_path / "t.yaml", quick, 2, bandwidth, "1ms"))
    r = plan_chain_model(model, topo, ChainOptions(objective="throughput",
                                                   compress_transfer="int8"),
                         timing_cache=fake_cache(model, topo))
    fp = r.plan["compression"]["float_plan"]
    assert set(fp) == {"description", "latency_ms", "bottleneck_ms", "throughput_rps"}
    notes = [n for n in r.plan["notes"] if "int8 on the wire does not pay" in n]
    if slower:
        assert fp["bottleneck_ms"] < r.plan["choice"]["bottleneck_ms"], (fp, r.plan["choice"])
        assert notes and "leave --compress-transfer out" in notes[0], r.plan["notes"]
        assert notes[0] in r.notes
    else:
        assert fp["bottleneck_ms"] >= r.plan["choice"]["bottleneck_ms"] * 0.95, fp
        assert not notes, notes
