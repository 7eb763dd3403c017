"""Measurements: the stable-median timing loop, the fresh-process worker (latency, cold
start, peak memory), estimates, precision and MACs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from toys import export_cnn_onnx, fast_profile

from compactor.measure.bench import bench, measure_profile, random_feeds
from compactor.measure.estimate import estimate_energy, estimate_latency, estimates_for
from compactor.measure.latency import (
    Latency,
    block_ci,
    measure_latency,
    median_ci,
    relative_ci,
    stability,
)
from compactor.measure.macs import count_macs, macs_by_node
from compactor.measure.precision import precision_summary
from compactor.profiles import Profile, load_profile


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    return export_cnn_onnx(tmp_path_factory.mktemp("cnn") / "cnn.onnx")


@pytest.fixture
def fast(tmp_path) -> Profile:
    return load_profile(str(fast_profile(tmp_path / "fast.yaml")))


def _profile(**fields) -> Profile:
    return Profile.model_validate({"name": "t", "class": "edge", **fields})


# --------------------------------------------------------------------------- timing loop


def test_median_ci_brackets_the_median():
    a = np.sort(np.random.default_rng(0).normal(10.0, 1.0, 2000))
    med, lo, hi = median_ci(a)
    assert lo < med < hi
    # for a normal sample the median's CI is ~ ±1.96 * 1.2533 * sigma / sqrt(n)
    expected = 1.96 * 1.2533 / np.sqrt(2000) / 10.0
    assert relative_ci(a) == pytest.approx(expected, rel=0.35), relative_ci(a)
    assert relative_ci(np.full(50, 3.0)) == 0.0


def test_block_interval_catches_a_host_whose_speed_drifts():
    rng = np.random.default_rng(1)
    steady = rng.normal(1.0, 0.05, 1000)
    # same spread per run, but 30% slower for a stretch in the middle: a neighbour's burst
    phases = np.concatenate([rng.normal(1.0, 0.05, 350), rng.normal(1.3, 0.05, 300),
                             rng.normal(1.0, 0.05, 350)])
    assert block_ci(steady) < 0.01
    iid = relative_ci(np.sort(phases))
    assert block_ci(phases) > 0.05 and block_ci(phases) > 5 * iid, (block_ci(phases), iid)
    assert stability(phases) == block_ci(phases)
    assert block_ci([1.0] * 20) == np.inf  # too few runs for 5 blocks


class _FakeSession:
    """A session whose runs take the given durations on a fake clock."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = itertools.cycle(durations)
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def run(self, _outputs, _feeds):
        self.calls += 1
        self.now += next(self.durations)


def test_timing_stops_once_the_median_is_stable():
    sess = _FakeSession([0.001, 0.00101, 0.00099])
    lat = measure_latency(sess, {}, 1, min_runs=20, min_time_s=0.0, max_time_s=10.0, warmup=3,
                          target_ci=0.02, clock=sess.clock)
    assert lat.stable is True
    assert lat.runs < 40, lat.runs  # stopped soon after min_runs, far from the time cap
    assert lat.ci <= 0.02
    assert lat.p50 == pytest.approx(1.0, abs=0.02)
    assert lat.throughput == pytest.approx(1000.0 / lat.p50)
    assert sess.calls == lat.runs + 3  # warm-up runs are not timed


def test_timing_stops_at_the_cap_when_the_median_will_not_settle():
    # half the runs 1 ms, half 2 ms: the median's CI straddles both modes
    sess = _FakeSession([0.001, 0.002])
    lat = measure_latency(sess, {}, 1, min_runs=5, min_time_s=0.0, max_time_s=0.5, warmup=0,
                          target_ci=0.02, clock=sess.clock)
    assert lat.stable is False
    assert 0.5 <= lat.seconds < 0.51
    assert lat.ci > 0.02


def test_timing_respects_min_runs_and_min_time():
    sess = _FakeSession([0.001])
    lat = measure_latency(sess, {}, 1, min_runs=50, min_time_s=0.2, max_time_s=10.0, warmup=0,
                          clock=sess.clock)
    assert lat.runs >= 200  # 0.2 s of 1 ms runs, though the median was stable at once
    assert lat.stable is True


def test_warm_up_lasts_long_enough_but_at_most_a_tenth_of_the_cap():
    sess = _FakeSession([0.001])
    lat = measure_latency(sess, {}, 1, min_runs=5, min_time_s=0.0, max_time_s=10.0, warmup=2,
                          warmup_s=0.05, clock=sess.clock)
    assert sess.calls - lat.runs == 50  # 50 ms of 1 ms runs, not just 2
    sess = _FakeSession([0.001])
    lat = measure_latency(sess, {}, 1, min_runs=5, min_time_s=0.0, max_time_s=0.2, warmup=0,
                          warmup_s=1.0, clock=sess.clock)
    assert sess.calls - lat.runs == 20  # capped at max_time_s / 10


def test_latency_round_trips_and_reads_older_records():
    lat = Latency(1, 1.0, 2.0, 3.0, 1.5, 0.1, 0.9, 10, 1000.0, ci=0.01, stable=True)
    assert Latency.from_dict(lat.to_dict()) == lat
    old = {k: v for k, v in lat.to_dict().items() if k not in ("ci", "stable", "seconds")}
    assert Latency.from_dict({**old, "future_field": 1}).ci is None


# --------------------------------------------------------------------------- the worker


def test_fresh_process_measures_each_batch_size(cnn, tmp_path):
    prof = load_profile(str(fast_profile(tmp_path / "fast.yaml")))
    prof = prof.model_copy(update={"batch_sizes": (1, 4)})
    seen = []
    feeds = {bs: {"image": np.zeros((bs, 1, 16, 16), np.float32)} for bs in (1, 4)}
    m = measure_profile(cnn, prof, feeds, on_batch=seen.append)
    assert m.measured and sorted(m.latency) == [1, 4] and len(seen) == 2
    for bs, lat in m.latency.items():
        assert lat.batch_size == bs and lat.runs >= 5 and lat.p50 > 0
        assert lat.p50 <= lat.p90 <= lat.p99
        assert lat.ci is not None and lat.stable is not None and lat.cpu_share is not None
        assert lat.throughput == pytest.approx(bs * 1000.0 / lat.p50, rel=1e-3)
    rt = m.runtime
    assert rt["session_create_ms"] > 0 and rt["first_run_ms"] > 0
    assert rt["providers"][0] == "CPUExecutionProvider" and rt["threads"] == 1
    assert 0 < rt["runtime_rss_mb"] <= rt["peak_rss_mb"] < 1024, rt


def test_peak_memory_is_the_workers_own(cnn, fast):
    """The worker is forked from this process; its peak must not include our memory."""
    ballast = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MB, touched
    try:
        m = measure_profile(cnn, fast, {1: {"image": np.zeros((1, 1, 16, 16), np.float32)}})
    finally:
        del ballast
    assert m.runtime["peak_rss_mb"] < 250, m.runtime


def test_missing_execution_provider_is_not_measured(cnn):
    prof = _profile(execution_providers=["CUDAExecutionProvider"])
    m = measure_profile(cnn, prof, {1: {"image": np.zeros((1, 1, 16, 16), np.float32)}})
    assert not m.measured and m.latency == {}
    assert m.notes == ["not measured: CUDAExecutionProvider not available on this host"]


def test_a_missing_preferred_provider_falls_back_with_a_note(cnn, fast):
    prof = fast.model_copy(
        update={"execution_providers": ("XnnpackExecutionProvider", "CPUExecutionProvider")})
    m = measure_profile(cnn, prof, {1: {"image": np.zeros((1, 1, 16, 16), np.float32)}})
    assert m.measured
    assert any("XnnpackExecutionProvider not available" in n and "CPUExecutionProvider" in n
               for n in m.notes), m.notes


def test_random_feeds_fill_symbolic_axes():
    specs = [("ids", ["batch", "seq"], np.int64), ("x", [None, 3], np.float32),
             ("fixed", [2, 2], np.bool_)]
    feeds, used = random_feeds(specs, 8, {"seq": 16})
    assert feeds["ids"].shape == (8, 16) and feeds["ids"].dtype == np.int64
    assert feeds["x"].shape == (8, 3) and feeds["fixed"].shape == (2, 2)
    assert used == {"batch": 8, "seq": 16, "x_dim0": 8}


def test_bench_reports_everything_for_one_profile(cnn, fast):
    r = bench(cnn, fast)
    assert r["measured"] and r["profile"] == "fast"
    assert r["model"]["macs"] == count_macs(onnx.load(str(cnn)), {"image": (1, 1, 16, 16)})
    assert set(r["latency_ms"]) == {"1"} and r["memory"]["peak_rss_mb"] > 0
    assert r["batching"] is None  # one batch size: nothing to choose
    assert r["estimates"] == {}  # a host profile has no peak figures or power
    assert r["host"]["onnxruntime"]


# --------------------------------------------------------------------------- estimates


def test_roofline_estimate_and_energy_are_labelled():
    prof = _profile(estimates={"power_w": 5, "peak_gflops_fp32": 10, "peak_gops_int8": 40,
                               "memory_bandwidth_gbs": 2})
    # compute-bound: 50M float MACs = 100 MFLOP at 10 GFLOPS = 10 ms; 1 MB at 2 GB/s = 0.5 ms
    e = estimate_latency(prof, macs=50_000_000, int8_share=0.0, weight_bytes=1_000_000)
    assert e["label"] == "estimate" and e["latency_ms"] == pytest.approx(10.0)
    assert e["bound_by"] == "compute" and "lower bound" in e["kind"]
    # the same MACs in int8 run at the int8 peak
    e8 = estimate_latency(prof, macs=50_000_000, int8_share=1.0, weight_bytes=1_000_000)
    assert e8["latency_ms"] == pytest.approx(2.5)
    # memory-bound: 100 MB of weights
    em = estimate_latency(prof, macs=1000, int8_share=0.0, weight_bytes=100_000_000)
    assert em["bound_by"] == "memory" and em["latency_ms"] == pytest.approx(50.0)
    energy = estimate_energy(prof, 10.0, "x")
    assert energy == {"label": "estimate", "energy_mj": 50.0, "basis": "x × 5 W"}
    assert estimate_latency(_profile(), macs=1, int8_share=0, weight_bytes=1) is None


def test_estimates_use_the_measured_latency_for_energy_when_there_is_one():
    prof = _profile(estimates={"power_w": 2, "peak_gflops_fp32": 10})
    est = estimates_for(prof, macs=10_000_000, int8_share=0.0, weight_bytes=0, io_bytes=0,
                        measured_p50_ms=3.0, quantized=False)
    assert est["energy"]["energy_mj"] == pytest.approx(6.0)
    assert "measured" in est["energy"]["basis"]
    est = estimates_for(prof, macs=10_000_000, int8_share=0.0, weight_bytes=0, io_bytes=0,
                        measured_p50_ms=None, quantized=False)
    assert est["energy"]["energy_mj"] == pytest.approx(2 * est["latency"]["latency_ms"])
    assert "estimated" in est["energy"]["basis"]


def test_fp16_peak_for_a_float_model_on_an_fp16_target():
    prof = _profile(preferred_precision="fp16",
                    estimates={"peak_gflops_fp32": 10, "peak_gflops_fp16": 100})
    est = estimates_for(prof, macs=50_000_000, int8_share=0.0, weight_bytes=0, io_bytes=0,
                        measured_p50_ms=None, quantized=False)
    assert est["latency"]["latency_ms"] == pytest.approx(1.0)
    assert "fp16" in est["latency"]["basis"]


# --------------------------------------------------------------------------- precision


def _qdq_model(quantize_gemm: bool) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ weights) -> Relu -> Flatten -> Gemm, the Gemm int8 or float."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-5, 5, (4, 1, 3, 3)).astype(np.int8), "w_q")
    fc = numpy_helper.from_array(rng.standard_normal((4 * 4 * 4, 2)).astype(np.float32), "fc")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w_dq"]),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
    ]
    inits = [w, fc, s, z]
    if quantize_gemm:
        fcq = numpy_helper.from_array(rng.integers(-5, 5, (64, 2)).astype(np.int8), "fc_q")
        inits.append(fcq)
        nodes += [
            helper.make_node("QuantizeLinear", ["f", "s", "z"], ["f_q"]),
            helper.make_node("DequantizeLinear", ["f_q", "s", "z"], ["f_dq"]),
            helper.make_node("DequantizeLinear", ["fc_q", "s", "z"], ["fc_dq"]),
            helper.make_node("Gemm", ["f_dq", "fc_dq"], ["y"], name="fc"),
        ]
    else:
        nodes.append(helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc"))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_precision_finds_the_heavy_node_that_stayed_float():
    model = _qdq_model(quantize_gemm=False)
    macs = macs_by_node(model, {"x": (1, 1, 4, 4)})
    assert macs == {"conv": 4 * 4 * 4 * 9, "fc": 64 * 2}
    assert count_macs(model, {"x": (1, 1, 4, 4)}) == sum(macs.values())
    p = precision_summary(model, macs)
    assert p["quantized"] and p["int8_ops"] == {"Conv": 1}
    assert [n["node"] for n in p["float_heavy_nodes"]] == ["fc"]
    assert p["float_heavy_nodes"][0]["macs_share"] == pytest.approx(128 / (576 + 128), abs=1e-4)
    assert p["int8_macs_share"] == pytest.approx(576 / (576 + 128), abs=1e-4)
    assert "Relu" in p["float_ops"] and "Flatten" not in p["float_ops"]


def test_precision_of_an_all_int8_and_an_all_float_model():
    p = precision_summary(_qdq_model(quantize_gemm=True))
    assert p["quantized"] and p["float_heavy_nodes"] == []
    assert p["int8_ops"] == {"Conv": 1, "Gemm": 1}
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "f",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "b")])
    p = precision_summary(helper.make_model(g))
    assert not p["quantized"] and p["float_ops"] == {"MatMul": 1}
