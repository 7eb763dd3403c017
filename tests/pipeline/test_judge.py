"""The judge's relative verdicts: "int8 is SLOWER" from a paired timing only, min_speedup
timed paired at judge time, and the baseline's busy-host note reaching the target."""

from __future__ import annotations

from pathlib import Path

from compactor.measure.latency import Latency
from compactor.metrics import get_metric
from compactor.pipeline.judge import Timer, judge, warn_if_slower
from compactor.profiles import Profile
from compactor.progress import Progress
from compactor.results import StageResult
from compactor.spec import Target
from compactor.verdict import Interval


def stage(name: str, p50: float, path: Path | None, notes: str = "") -> StageResult:
    lat = Latency(1, p50, p50, p50, p50, 0.0, p50, 10, 1000 / p50,
                  quiet={"p50": [p50, p50 * 0.99, p50 * 1.01]}, busy=False)
    return StageResult(name, "onnx", (name,), {}, 0.9, 0.0, 0.0, 1000, 10, None,
                       {"host": {1: lat}}, latency_notes={"host": notes} if notes else {},
                       onnx_path=path)


def test_slower_is_said_only_when_the_paired_timing_resolves_it(tmp_path):
    before, after = stage("export", 1.0, tmp_path / "a"), stage("quantize", 0.5, tmp_path / "b")
    warn_if_slower(before, after, Progress(), lambda *_: Interval(0.8, 0.75, 0.85))
    assert len(after.warnings) == 1 and "SLOWER" in after.warnings[0]
    assert "0.80x" in after.warnings[0] and "timed paired" in after.warnings[0]
    # the stages' own p50s say 2x faster, but only the paired ratio counts; and a ratio
    # whose interval reaches 1 is noise, not slower
    quiet = stage("quantize", 2.0, tmp_path / "b")
    warn_if_slower(before, quiet, Progress(), lambda *_: Interval(0.97, 0.9, 1.05))
    assert quiet.warnings == ()
    warn_if_slower(before, quiet, Progress(), None)  # nothing to pair with: nothing said
    assert quiet.warnings == ()


def test_min_speedup_is_timed_paired_and_the_baseline_busy_note_reaches_the_target(tmp_path):
    (tmp_path / "base.onnx").write_bytes(b"x")
    base = stage("baseline", 4.0, tmp_path / "base.onnx",
                 notes="busy host: the measuring process got 0.9 of the 2 cores")
    final = stage("quantize", 1.0, tmp_path / "final.onnx")
    calls = []

    def paired(ref: Path, model: Path, prof: Profile, seconds: float) -> Interval:
        calls.append((ref.name, model.name, seconds))
        return Interval(2.0, 1.9, 2.1)

    timer = Timer(latency=lambda *_: {}, paired=paired, settle_s=5, pair_s=1.5)
    prof = Profile.model_validate({"name": "host", "class": "host"})
    target = Target.model_validate({"profile": "host", "budgets": {"min_speedup": 3}})
    (t,) = judge([target], [prof], [base, final], get_metric("accuracy", tmp_path), timer)
    (v,) = [v for v in t.verdicts if v.budget == "min_speedup"]
    # 4.0 / 1.0 from the two stages' timings would pass; the paired 2.0x fails
    assert v.status == "fail" and v.measured == 2.0 and (v.low, v.high) == (1.9, 2.1)
    assert calls == [("base.onnx", "final.onnx", 1.5)]
    assert any(n.startswith("baseline: busy host") for n in t.notes), t.notes
