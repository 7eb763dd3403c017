"""config.pbtxt from a manifest: Triton's own parser reads it, dims and dtypes follow the
model, and the batching follows the measured curve and the latency budget."""

from __future__ import annotations

import json

import pytest
from toys.triton_config import parse_config

from compactor.deploy.triton import (
    MIN_THROUGHPUT_GAIN,
    choose_target,
    config_pbtxt,
    derive_batching,
)
from compactor.errors import UsageError
from compactor.manifest import Manifest, load_manifest


def _curve(manifest: Manifest, points: dict[int, tuple[float, float]],
           p99_limit: float | None = 50.0) -> Manifest:
    """``manifest`` with its cloud target measured as ``{batch: (p99 ms, throughput)}``."""
    m = json.loads(json.dumps(manifest.to_dict()))
    prof = m["targets"][0]["profile"]
    m["stages"][-1]["latency_ms"][prof] = {
        str(b): {"batch_size": b, "p50": p99 * 0.8, "p90": p99 * 0.9, "p99": p99, "mean": p99,
                 "std": 0.1, "min": p99 * 0.7, "runs": 10, "throughput": tput}
        for b, (p99, tput) in points.items()}
    m["targets"][0]["budgets"] = ({"max_latency_ms": {"p99": p99_limit}}
                                  if p99_limit is not None else {})
    m["targets"][0]["settings"]["limits"] = {}
    return Manifest.model_validate(m)


def _batching(manifest: Manifest):
    return derive_batching(manifest, choose_target(manifest, None))


def test_the_config_parses_with_tritons_model_config(artifact):
    manifest = load_manifest(artifact)
    target = choose_target(manifest, None)
    batching = derive_batching(manifest, target)
    cfg = parse_config(config_pbtxt(manifest, "digits", target, batching, [3], instances=2))
    assert cfg.name == "digits" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == batching.max_batch_size >= 1
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("image", [1, 16, 16])]
    assert cfg.input[0].data_type == 11  # TYPE_FP32
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [10])]
    assert list(cfg.version_policy.specific.versions) == [3]
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == 2  # KIND_CPU
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"


def test_preferred_sizes_follow_the_throughput_gains_within_the_budget(artifact):
    # 4 pays (+150%), 8 pays (+30%), 16 adds 5% only, 32 breaks the 50 ms p99 budget
    m = _curve(load_manifest(artifact),
               {1: (2.0, 500), 4: (5.0, 1250), 8: (9.0, 1625), 16: (18.0, 1700),
                32: (60.0, 1800)})
    b = _batching(m)
    assert b.preferred == (4, 8)
    assert b.max_batch_size == 16  # the largest measured size within the budget
    assert b.max_queue_delay_us == int((50.0 - 9.0) * 1000)  # budget - p99 at batch 8
    cfg = parse_config(config_pbtxt(m, "x", m.targets[0], b, [1]))
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 41000
    assert 0 < MIN_THROUGHPUT_GAIN < 1


def test_a_preferred_size_that_leaves_no_queueing_time_is_dropped(artifact):
    m = _curve(load_manifest(artifact), {1: (2.0, 500), 4: (20.0, 1000), 8: (50.0, 1500)},
               p99_limit=50.0)
    b = _batching(m)
    assert b.preferred == (4,) and b.max_queue_delay_us == 30000
    assert any("leaves no queueing time" in r for r in b.reasons), b.reasons


def test_batching_that_does_not_raise_throughput_is_not_enabled(artifact):
    m = _curve(load_manifest(artifact), {1: (2.0, 500), 4: (8.0, 510), 16: (31.0, 520)})
    b = _batching(m)
    assert not b.dynamic and b.max_batch_size == 16
    cfg = parse_config(config_pbtxt(m, "x", m.targets[0], b, [1]))
    assert not cfg.HasField("dynamic_batching")
    assert "only add latency" in config_pbtxt(m, "x", m.targets[0], b, [1])


def test_no_batch_size_within_the_budget(artifact):
    m = _curve(load_manifest(artifact), {1: (80.0, 12), 4: (200.0, 20)})
    b = _batching(m)
    assert (b.max_batch_size, b.dynamic) == (1, False)
    assert "no measured batch size keeps p99 ≤ 50 ms" in b.reasons[0]


def test_without_a_latency_budget_the_queue_delay_is_zero(artifact):
    m = _curve(load_manifest(artifact), {1: (2.0, 500), 8: (8.0, 1000)}, p99_limit=None)
    b = _batching(m)
    assert b.preferred == (8,) and b.max_queue_delay_us == 0
    assert any("no latency budget" in r for r in b.reasons)


def test_a_model_without_a_batch_axis_gets_max_batch_size_0(unbatched_artifact):
    m = load_manifest(unbatched_artifact)
    b = _batching(m)
    assert (b.max_batch_size, b.dynamic) == (0, False)
    text = config_pbtxt(m, "fixed", m.targets[0], b, [1])
    assert "# max_batch_size 0: input 'x' has no batch axis" in text
    cfg = parse_config(text)
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 16]  # the full shape: Triton adds no batch axis


def test_dynamic_axes_are_minus_one_and_unknown_profiles_are_named(artifact):
    m = json.loads(json.dumps(load_manifest(artifact).to_dict()))
    m["model"]["inputs"][0]["shape"] = ["batch", 1, "h", "w"]
    manifest = Manifest.model_validate(m)
    target = choose_target(manifest, None)
    cfg = parse_config(config_pbtxt(manifest, "x", target, derive_batching(manifest, target),
                                    [1]))
    assert list(cfg.input[0].dims) == [1, -1, -1]
    with pytest.raises(UsageError, match="no target with it"):
        choose_target(manifest, "toy-clod")
