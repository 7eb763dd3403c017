"""Metrics: the built-ins on known arrays, a user metric, and each through a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import toys
from toys import assert_clean_error, leftovers, ref, run_cli, write_recipe

from compactor.errors import DataError, RecipeError
from compactor.metrics import BUILTIN, get_metric
from compactor.pipeline import optimize
from compactor.recipe import load_recipe

# --------------------------------------------------------------------------- on arrays


def test_accuracy_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    acc = BUILTIN["accuracy"].compute(logits, np.array([1, 1, 1, 0]), None)
    assert acc == pytest.approx(0.75)
    one_hot = np.eye(2)[[1, 1, 1, 0]]
    assert BUILTIN["accuracy"].compute(logits, one_hot, None) == pytest.approx(0.75)


def test_top5_counts_a_hit_within_the_five_best():
    logits = np.tile(np.arange(10, dtype=np.float64)[::-1], (2, 1))  # class i has rank i
    top5 = BUILTIN["top5"]
    assert top5.compute(logits, np.array([4, 4]), None) == 1.0
    assert top5.compute(logits, np.array([4, 5]), None) == 0.5
    assert BUILTIN["accuracy"].compute(logits, np.array([4, 5]), None) == 0.0
    # Fewer than five classes: every label is in the top five.
    assert top5.compute(np.zeros((3, 3)), np.array([0, 1, 2]), None) == 1.0


def test_mse_is_lower_is_better():
    mse = BUILTIN["mse"]
    got = mse.compute(np.array([[1.0, 2.0]]), np.array([[1.0, 4.0]]), None)
    assert got == pytest.approx(2.0)
    assert mse.higher_is_better is False
    assert mse.drop(baseline=0.1, value=0.3) == pytest.approx(0.2)  # worse: positive
    assert BUILTIN["accuracy"].drop(baseline=0.9, value=0.8) == pytest.approx(0.1)


def test_fidelity_is_cosine_to_the_baseline():
    fid = BUILTIN["fidelity"]
    ref_out = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert fid.compute(ref_out, None, ref_out) == pytest.approx(1.0)
    assert fid.compute(ref_out * 3.0, None, ref_out) == pytest.approx(1.0)
    flipped = ref_out.copy()
    flipped[2] = [0.0, 1.0, 0.0]  # orthogonal: cosine 0 on one of three samples
    assert fid.compute(flipped, None, ref_out) == pytest.approx(2.0 / 3.0)
    with pytest.raises(DataError):
        fid.compute(ref_out[:, :2], None, ref_out)


def test_label_metric_without_labels_names_fidelity():
    with pytest.raises(DataError) as e:
        BUILTIN["accuracy"].compute(np.zeros((2, 3)), None, None)
    assert e.value.exit_code == 3
    assert "fidelity" in e.value.hint


def test_nan_metric_is_a_data_error():
    with pytest.raises(DataError, match="nan"):
        BUILTIN["mse"].compute(np.array([np.nan]), np.array([0.0]), None)


def test_user_metric_from_a_file(tmp_path):
    metric = get_metric(ref("cross_entropy"), tmp_path)
    assert metric.higher_is_better is False
    logits = np.array([[10.0, 0.0], [0.0, 10.0]])
    good = metric.compute(logits, np.array([0, 1]), None)
    bad = metric.compute(logits, np.array([1, 0]), None)
    assert good < 1e-3 < 9.0 < bad, (good, bad)
    assert metric.drop(good, bad) > 0


def test_unknown_user_metric_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as e:
        get_metric(ref("cross_entropi"), tmp_path)
    assert "cross_entropy" in e.value.hint


# --------------------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> Path:
    return toys.export_cnn_onnx(tmp_path_factory.mktemp("onnx") / "cnn.onnx")


RUNS = {
    # metric: (eval data, higher is better)
    "top5": ("cnn_eval_batches", True),
    "mse": ("cnn_logit_batches", False),
    "fidelity": ("cnn_unlabelled_batches", True),
    ref("cross_entropy"): ("cnn_eval_batches", False),
}


@pytest.mark.parametrize("metric", list(RUNS), ids=["top5", "mse", "fidelity", "user"])
def test_metric_in_a_run(tmp_path, cnn_onnx, metric):
    data, higher = RUNS[metric]
    path = write_recipe(
        tmp_path,
        model={"onnx": str(cnn_onnx)},
        data={"calibration": ref("cnn_calibration_batches"), "eval": ref(data)},
        metric=metric,
        passes=[{"quantize": {"mode": "static", "keep_float": "never"}}],  # int8 is tested
        budgets={"max_accuracy_drop": 1000},
    )
    result = optimize(load_recipe(path))
    m = result.manifest
    assert m["metric"]["name"] == metric
    assert m["metric"]["higher_is_better"] is higher
    base, quant = m["stages"]
    assert quant["delta"] == pytest.approx(quant["metric"] - base["metric"])
    # drop is "how much worse": the sign flips for a lower-is-better metric.
    assert quant["drop"] == pytest.approx(-quant["delta"] if higher else quant["delta"])
    (verdict,) = m["targets"][0]["verdicts"]
    assert verdict["measured"] == pytest.approx(quant["drop"]) and verdict["unit"] == metric
    if metric == "top5":
        assert base["metric"] == 1.0
    elif metric == "mse":
        # The targets are the teacher's own logits: only int8 adds error.
        assert base["metric"] < 1e-8, f"baseline mse {base['metric']:.3g}"
        assert quant["metric"] > base["metric"] and quant["drop"] > 0, quant
    elif metric == "fidelity":
        assert base["metric"] == pytest.approx(1.0, abs=1e-9)
        assert quant["metric"] >= 0.95, f"int8 fidelity {quant['metric']:.4f}"


def test_accuracy_without_labels_exits_3(tmp_path, cnn_onnx):
    path = write_recipe(
        tmp_path,
        model={"onnx": str(cnn_onnx)},
        data={"eval": ref("cnn_unlabelled_batches")},
        metric="accuracy",
    )
    result = run_cli("optimize", path)
    assert_clean_error(result, 3, "needs labels", "fidelity")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []



# --------------------------------------------------------------------------- untrusted fidelity


def test_fidelity_on_one_value_per_sample_sees_flipped_decisions():
    from compactor.data import PerBatch
    from compactor.metrics import fidelity_caveat

    ref_p = np.array([[0.9], [0.1], [0.8], [0.2]])
    fid = BUILTIN["fidelity"]
    assert fid.compute(ref_p, None, ref_p) == pytest.approx(1.0)
    half = np.full_like(ref_p, 0.5)  # every decision at the threshold: a cosine says 1.0
    assert fid.compute(half, None, ref_p) == pytest.approx(0.0, abs=1e-9)
    flipped = 1.0 - ref_p
    value = fid.compute(flipped, None, ref_p)
    assert value < 0, f"fidelity {value:.3f} for every decision flipped"
    assert fidelity_caveat(PerBatch.of([ref_p])) is not None
    assert "same value" in fidelity_caveat(PerBatch.of([np.ones((4, 3))]))
    assert fidelity_caveat(PerBatch.of([np.arange(12.0).reshape(4, 3)])) is None


def test_int8_that_flips_a_probability_head_warns_and_scores_below_one(tmp_path, monkeypatch):
    from toys import fake_timer, toy_recipe
    from toys.probability import probability_data, probability_onnx

    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    model = probability_onnx(tmp_path / "vad.onnx")
    recipe = toy_recipe(tmp_path, model, probability_data,
                        quantize={"mode": "static", "keep_float": "never", "op_types": "all",
                                  "repairs": []})
    result = optimize(load_recipe(recipe))
    base, final = result.stages[0], result.stages[-1]
    assert final.record["outcome"] == "int8"
    x = probability_data(64, seed=1)["x"]
    import onnxruntime as ort

    (want,) = ort.InferenceSession(str(model)).run(None, {"x": x})
    (got,) = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"x": x})
    agree = float(((want > 0.5) == (got > 0.5)).mean())
    assert agree < 0.8, f"the toy must flip decisions; agreement {agree:.2f}"
    assert final.metric < 0.5, f"fidelity {final.metric:.3f} with {agree:.0%} agreement"
    (w,) = [w for w in final.warnings if "fidelity cannot be trusted" in w]
    assert "'p'" in w and "[16, 1]" in w and "outputs: {p: agreement}" in w, w
    assert not [w for w in base.warnings if "fidelity" in w], base.warnings


# --------------------------------------------------------------------------- every output


def _outputs(**arrays):
    from compactor.data import Outputs

    return Outputs.of(list(arrays), [list(arrays.values())])


def test_fidelity_scores_each_unit_group_of_a_detector_output():
    """One cosine over [B, 4+C, N] is the pixels' alone: int8 scores collapsed to 0 / 1.27
    still give ~0.9999. Fidelity finds the two unit groups and takes the worse."""
    from toys.heads import detector_arrays

    from compactor.metrics import cosine_per_sample, mixed_units

    ref_out, bad = detector_arrays()
    naive = float(cosine_per_sample(bad, ref_out).mean())
    assert naive > 0.999, f"the trap: one cosine says {naive:.5f}"
    groups = mixed_units(ref_out)
    assert groups is not None and groups.axis == 1
    assert groups.groups == ((0, 1, 2, 3), tuple(range(4, 10))), groups
    fid = BUILTIN["fidelity"].compute(bad, None, ref_out)
    assert fid < 0.9, f"fidelity {fid:.4f} on collapsed class scores"
    zeroed = ref_out.copy()
    zeroed[:, 4:] = 0.0  # one int8 step over 0..640 rounds every score to 0
    assert BUILTIN["fidelity"].compute(zeroed, None, ref_out) == pytest.approx(0.0)
    assert float(cosine_per_sample(np.zeros((2, 3)), np.zeros((2, 3))).min()) == 1.0
    good = ref_out.copy()
    good[:, :4] += 0.5  # half a pixel: a sound int8
    good[:, 4:] += 0.002
    assert BUILTIN["fidelity"].compute(good, None, ref_out) > 0.99
    # embeddings-like outputs of one scale are one group: the plain per-sample cosine
    emb = np.random.default_rng(0).standard_normal((8, 32))
    assert mixed_units(emb) is None


def test_detection_agreement_is_f1_of_matched_boxes():
    from toys.heads import detector_arrays

    from compactor.metrics import detection_agreement

    ref_out, bad = detector_arrays(batch=8)
    det = detection_agreement()
    assert det.compute(ref_out, None, ref_out) == pytest.approx(1.0)
    jitter = ref_out.copy()
    jitter[:, :4] += 2.0  # two pixels: every box still matches at IoU 0.5
    assert det.compute(jitter, None, ref_out) == pytest.approx(1.0)
    f1 = det.compute(bad, None, ref_out)
    assert f1 < 0.8, f"detection F1 {f1:.3f} with collapsed scores"
    # channels last ([B, N, 4+C]) and corner boxes give the same answer
    last = detection_agreement(layout="channels_last")
    assert last.compute(np.swapaxes(bad, 1, 2), None, np.swapaxes(ref_out, 1, 2)) == \
        pytest.approx(f1)
    assert detection_agreement(box_format="xyxy").compute(ref_out, None, ref_out) == 1.0


def test_agreement_and_topk_agreement():
    from compactor.metrics import agreement, topk_agreement

    p = np.array([[0.9], [0.1], [0.8], [0.2]])
    half = np.full_like(p, 0.45)
    assert BUILTIN["agreement"].compute(half, None, p) == pytest.approx(0.5)
    assert agreement(threshold=0.05).compute(half, None, p) == pytest.approx(1.0)
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    swapped = np.array([[1.0, 3.0, 0.0], [0.0, 1.0, 2.0]])  # top-1 moved to second place
    assert BUILTIN["agreement"].compute(swapped, None, logits) == 0.0
    assert topk_agreement(k=2).compute(swapped, None, logits) == 1.0
    assert topk_agreement(k=1).compute(swapped, None, logits) == 0.0


def test_a_metric_sees_every_output_and_reports_the_worst():
    from compactor.metrics import get_metric as gm
    from compactor.recipe import MetricSpec

    ref_out = _outputs(p=np.array([[0.9], [0.1], [0.8], [0.2]]),
                       emb=np.random.default_rng(1).standard_normal((4, 16)))
    flipped = _outputs(p=1.0 - ref_out["p"].joined(), emb=ref_out["emb"].joined())
    fid = gm("fidelity", Path("."))
    scores = {s.output: s.value for s in fid.score_outputs(flipped, None, ref_out)}
    assert scores["emb"] == pytest.approx(1.0) and scores["p"] < 0
    assert fid.score(flipped, None, ref_out) == pytest.approx(scores["p"])
    per = gm(MetricSpec.model_validate(
        {"name": "fidelity", "outputs": {"p": {"name": "agreement", "threshold": 0.5}}}),
        Path("."))
    scores = {s.output: (s.metric, s.value) for s in per.score_outputs(flipped, None, ref_out)}
    assert scores == {"p": ("agreement(threshold=0.5)", 0.0), "emb": ("fidelity", 1.0)}
    only = gm(MetricSpec(name="fidelity", outputs=("emb",)), Path("."))
    assert only.score(flipped, None, ref_out) == pytest.approx(1.0)
    # labels describe one output: accuracy scores the first alone
    assert [n for n, _ in gm("accuracy", Path(".")).plan(["a", "b"])] == ["a"]


@pytest.mark.parametrize("spec, shapes, fragments", [
    ({"outputs": {"boxes": "fidelity"}}, {"box": ((4, 4),)}, ["'boxes'", "did you mean 'box'"]),
    ({"name": "detection_agreement", "outputs": ["box"]}, {"box": ((4, 4),)},
     ["'box'", "[4, 4]", "detection_agreement"]),
    ({"outputs": {"p": "topk_agreement"}}, {"p": ((4, 1),)}, ["'p'", "[4, 1]", "classes"]),
])
def test_a_metric_on_a_missing_output_or_the_wrong_shape_is_a_usage_error(spec, shapes,
                                                                         fragments):
    from compactor.recipe import MetricSpec

    metric = get_metric(MetricSpec.model_validate(spec), Path("."))
    with pytest.raises(RecipeError) as e:
        metric.plan(list(shapes), shapes)
    assert e.value.exit_code == 2
    text = f"{e.value.message} {e.value.hint}"
    for f in fragments:
        assert f in text, text


@pytest.mark.parametrize("metric, fragment", [
    ({"name": "agreement", "k": 3}, "takes no parameter k"),
    ({"name": "fidelity", "threshold": 0.5}, "takes no parameter threshold"),
    ({"outputs": ["a"]}, "needs the metric's name"),
    ({"outputs": {"a": {"name": "agreemnt"}}}, "agreement"),
    ({"name": "topk_agreement", "k": 0}, "greater than or equal to 1"),
    ({"name": "detection_agreement", "layout": "nchw"}, "channels_first"),
])
def test_bad_metric_configs_are_recipe_errors(tmp_path, cnn_onnx, metric, fragment):
    import yaml

    from compactor.recipe import parse_recipe

    text = yaml.safe_dump({"version": 1, "name": "t", "model": {"onnx": str(cnn_onnx)},
                           "data": {"eval": "e.npz"}, "metric": metric})
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, base_dir=tmp_path)
    assert e.value.exit_code == 2
    assert fragment in f"{e.value.message} {e.value.hint}", e.value.message


def test_metric_forms_round_trip_through_the_lock(tmp_path, cnn_onnx):
    import yaml

    from compactor.recipe import parse_recipe

    for metric in ("fidelity", {"name": "fidelity", "outputs": ["a", "b"]},
                   {"outputs": {"p": {"name": "agreement", "threshold": 0.3}, "b": "fidelity"}},
                   {"name": "detection_agreement", "iou": 0.6}):
        text = yaml.safe_dump({"version": 1, "name": "t", "model": {"onnx": str(cnn_onnx)},
                               "data": {"eval": "e.npz"}, "metric": metric})
        r = parse_recipe(text, base_dir=tmp_path)
        again = parse_recipe(r.to_yaml(), base_dir=tmp_path)
        assert again.metric == r.metric
        assert "null" not in yaml.safe_dump(r.to_dict()["metric"])


# --------------------------------------------------------------------------- through a run


def _heads_recipe(tmp_path, metric="fidelity", budgets=None):
    from toys.heads import heads_data, three_heads_onnx

    model = three_heads_onnx(tmp_path / "heads.onnx")
    np.savez(tmp_path / "eval.npz", **heads_data(64, seed=1))
    np.savez(tmp_path / "calib.npz", **heads_data(64, seed=2))
    return write_recipe(tmp_path, budgets=budgets, model={"onnx": str(model)},
                        data={"eval": "eval.npz", "calibration": "calib.npz",
                              "batch_size": 16},
                        metric=metric, passes=[{"quantize": {}}])


def _swap_quantize(monkeypatch, model: Path):
    """The quantize pass replaced by one that ships ``model``: a stage with a known head."""
    from compactor.passes.quantize import QuantizePass

    def run(self, stage, ctx):
        return stage.derive("quantize", kind="onnx", onnx_path=model)

    monkeypatch.setattr(QuantizePass, "run", run)


def test_a_head_worse_than_a_constant_fails_the_run(tmp_path, monkeypatch):
    import json

    from toys.heads import three_heads_onnx

    path = _heads_recipe(tmp_path, budgets={"max_accuracy_drop": 10})
    _swap_quantize(monkeypatch, three_heads_onnx(tmp_path / "broken.onnx", broken="box"))
    result = run_cli("optimize", path)
    assert result.exit_code == 1, result.output
    assert "WORSE THAN A CONSTANT" in result.output, result.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    final = m["stages"][-1]
    assert final["outputs"]["box"]["broken"] is True
    assert final["outputs"]["box"]["mse"] > final["outputs"]["box"]["constant_mse"]
    assert final["outputs"]["face"]["broken"] is False
    assert final["outputs"]["landmarks"]["broken"] is False
    (v,) = [v for v in m["targets"][0]["verdicts"] if v["budget"].startswith("outputs.")]
    assert v["budget"] == "outputs.box.constant_predictor" and v["status"] == "fail"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "output `box` (16×4)" in report and "worse than a constant" in report, report


def test_every_output_is_scored_and_a_good_stage_passes(tmp_path, monkeypatch):
    from toys.heads import three_heads_onnx

    path = _heads_recipe(tmp_path, budgets={"max_accuracy_drop": 0.05})
    _swap_quantize(monkeypatch, three_heads_onnx(tmp_path / "nudged.onnx", nudged="box"))
    result = optimize(load_recipe(path))
    final = result.stages[-1]
    scored = {o.name: o for o in final.outputs}
    assert set(scored) == {"face", "box", "landmarks"}
    assert all(o.metric for o in scored.values()), scored
    assert final.metric == pytest.approx(min(o.value for o in scored.values()))
    assert scored["box"].value < 1.0 and not scored["box"].broken
    assert not final.checks or all(c.passed for c in final.checks)
    assert result.manifest["passed"] is True
    # face is [B, 1]: fidelity there cannot be trusted, and the run says so by name
    assert any("'face'" in w and "cannot be trusted" in w for w in final.warnings)


def test_a_metric_naming_a_missing_output_exits_2_before_any_pass(tmp_path, monkeypatch):
    path = _heads_recipe(tmp_path, metric={"outputs": {"boxes": "fidelity"}})
    result = run_cli("optimize", path)
    assert_clean_error(result, 2, "'boxes'", "did you mean 'box'")
    assert not (tmp_path / "out").exists()


def test_a_task_metric_on_the_wrong_shape_exits_2(tmp_path):
    path = _heads_recipe(tmp_path, metric={"outputs": {"landmarks": "detection_agreement"}})
    result = run_cli("optimize", path)
    assert_clean_error(result, 2, "'landmarks'", "[16, 5, 2]")


def test_agreement_on_a_probability_head_fails_int8_that_flips_decisions(tmp_path,
                                                                         monkeypatch):
    from toys import fake_timer, toy_recipe
    from toys.probability import probability_data, probability_onnx

    monkeypatch.setattr("compactor.passes.quantize._timer", fake_timer())
    model = probability_onnx(tmp_path / "vad.onnx")
    recipe = toy_recipe(tmp_path, model, probability_data,
                        quantize={"mode": "static", "keep_float": "never", "op_types": "all",
                                  "repairs": [], "max_accuracy_drop": 1.0},
                        metric={"outputs": {"p": {"name": "agreement", "threshold": 0.5}}},
                        budgets={"max_accuracy_drop": 0.05})
    result = run_cli("optimize", recipe)
    assert result.exit_code == 1, result.output
    import json

    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["metric"]["name"] == "agreement(threshold=0.5)[p]"
    assert m["stages"][-1]["outputs"]["p"]["value"] < 0.8


def test_the_constant_predictor_check_is_three_valued():
    from compactor.data import PerBatch
    from compactor.metrics import constant_predictor_check

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(256, 4))
    def check(out):
        return constant_predictor_check(PerBatch.of([out]), PerBatch.of([ref]))

    good = check(ref + 0.1 * rng.normal(size=ref.shape))
    assert good.status == "pass" and good.ratio < 0.05 and good.high < 1
    bad = check(-ref)  # the wrong sign: 4x the constant's error
    assert bad.status == "fail" and bad.low > 1 and bad.broken
    # an unrelated head of the same spread as the baseline's mean: 1x, within noise
    edge = check(ref.mean(axis=0) + 0.05 * rng.normal(size=ref.shape))
    assert edge.status == "inconclusive" and edge.low <= 1 < edge.high, edge
    assert check(np.zeros((256, 4))) is not None
    assert constant_predictor_check(PerBatch.of([np.ones((8, 2))]),
                                    PerBatch.of([np.ones((8, 2))])) is None


def test_the_constant_predictor_check_sees_scores_beside_pixels():
    """Over the whole [B, 4+C, N] tensor the pixels' variance hides collapsed scores; the
    check judges each unit group and reports the worst."""
    from toys.heads import detector_arrays

    from compactor.data import PerBatch
    from compactor.metrics import constant_predictor_check

    ref_out, bad = detector_arrays(batch=64)
    zeroed = ref_out.copy()
    zeroed[:, 4:] = 0.0
    for out in (bad, zeroed):
        c = constant_predictor_check(PerBatch.of([out]), PerBatch.of([ref_out]))
        assert c.status == "fail" and c.part == "channels 4-9 of axis 1", c
    fine = ref_out.copy()
    fine[:, :4] += 0.5
    assert constant_predictor_check(PerBatch.of([fine]), PerBatch.of([ref_out])).status == \
        "pass"


def test_no_unit_groups_where_there_is_one_unit():
    """Probabilities, [B, F] features with a nearly dead channel and [B, C, H, W] maps
    with dark columns are one unit: plain cosine, no group of noise to score."""
    from compactor.metrics import mixed_units

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(1000, 0.01), size=8)
    feats = np.maximum(rng.normal(size=(8, 64)), 0)
    feats[:, 0] *= 1e-3
    maps = rng.normal(size=(4, 8, 16, 16))
    maps[..., :3] *= 1e-4
    for a in (probs, feats, maps):
        assert mixed_units(a) is None, a.shape
    int8ish = feats.copy()
    int8ish[:, 0] = 0.0  # the nearly dead channel rounded away
    assert BUILTIN["fidelity"].compute(int8ish, None, feats) > 0.999
