"""compare_in_processes: each model alone in a fresh process (compactor's measurement
worker), alternating; paired speed-ups from the ratio within each repeat."""

from __future__ import annotations

import numpy as np
from toys import mlp_data, mlp_onnx

from compactor.profiles import load_profile
from compactor.quantization import timing as timing_mod
from compactor.quantization.candidates import Candidate, build


def test_models_are_timed_alone_in_fresh_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(timing_mod, "PROCESS_RUN_S", 0.05)
    fp32 = mlp_onnx(tmp_path / "mlp.onnx")
    int8 = build(Candidate(mode="dynamic", source=fp32), tmp_path / "int8.onnx", None)
    feeds = {"x": mlp_data(1, seed=0)["x"]}
    t = timing_mod.compare_in_processes({"float": fp32, "c0": int8}, load_profile("host-cpu"),
                                        feeds, 1, tmp_path, repeats=2)
    assert set(t.p50_ms) == {"float", "c0"} and all(v > 0 for v in t.p50_ms.values()), t
    assert t.paired["float"] == 1.0 and t.paired_low["float"] == 1.0, t
    assert np.isfinite(t.paired["c0"]) and t.paired_low["c0"] <= t.paired["c0"], t
    d = t.to_dict()
    assert d["method"] == "each model alone in a fresh process" and d["repeats"] == 2, d
    assert "block_s" not in d, d
    assert not list(tmp_path.glob("job-*")) and not list(tmp_path.glob("feeds-*")), \
        "the worker's job files are removed"
