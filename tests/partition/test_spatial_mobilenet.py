"""The spatial split on the benchmark's MobileNetV2 (224x224, inverted residual blocks,
exported by torch): the tiled prefix runs through the residual blocks to the last 7x7
stage, and K = 2, 3, 4 tiles at depths in every stage concatenate to the unsplit prefix's
output. Exports a real-sized model, so ``slow``:
``pytest -m slow tests/partition/test_spatial_mobilenet.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from compactor.partition.graph import PartitionGraph
from compactor.partition.profile import plain_session
from compactor.partition.spatial import cut_depths, prefix_heights, tile_model, tiles, windows

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("bench_partition",
                                                  BENCHMARKS / "partition.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path_factory.mktemp("mnv2") / "mobilenetv2-224.onnx"
    return mod._export(mod.mobilenet_v2(), (1, 3, 224, 224), path)


def test_tiles_through_inverted_residual_blocks_are_exact(mobilenet):
    g = PartitionGraph.load(mobilenet, 1)
    wins = windows(g)
    heights = prefix_heights(g, wins)
    depths = cut_depths(g, wins)
    assert len(wins) == g.n_nodes - 3  # up to the global pool: flatten and gemm follow
    assert {heights[d] for d in depths} == {112, 56, 28, 14, 7}
    # per stage its deepest cut (after its last residual Add), and the first after a block
    chosen = sorted({max(d for d in depths if heights[d] == h) for h in (56, 28, 14, 7)}
                    | {next(d for d in depths if any(
                        len(w.src) > 1 for w in wins[:d]))})
    cuts = [g.crossing(d)[0] for d in chosen]
    sess = plain_session(g.with_outputs(cuts))
    names = [o.name for o in sess.get_outputs()]
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    values = dict(zip(names, sess.run(None, {"image": x}), strict=True))
    worst = 0.0
    for depth, cut in zip(chosen, cuts, strict=True):
        want = values[cut]
        for k in (2, 3, 4):
            tl = tiles(heights, wins, depth, k)
            assert any(t.crops for t in tl)  # the skips are cropped
            strips = [plain_session(tile_model(g, depth, t)).run(
                None, {"image": x[:, :, t.in0:t.in1]})[0] for t in tl]
            err = float(np.max(np.abs(np.concatenate(strips, axis=2) - want)))
            worst = max(worst, err / float(np.max(np.abs(want))))
            assert err <= 1e-5 * float(np.max(np.abs(want))), (depth, k, err)
    assert worst <= 1e-5, worst
