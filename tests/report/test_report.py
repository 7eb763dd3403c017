"""report.html and report.md, rendered into an artifact: self-contained, complete, labelled."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import toys
from toys import write_cnn_npz

from compactor.manifest import Manifest
from compactor.pipeline import optimize
from compactor.recipe import load_recipe
from compactor.report.html import render_html
from compactor.report.markdown import render_markdown

PHONE = """\
name: phone
class: mobile
intra_op_threads: 1
batch_sizes: [1, 4]
format: ort
preferred_precision: int8
limits: {memory_mb: 1024, model_size_mb: 50, latency_ms: 1000}
estimates: {power_w: 3, peak_gflops_fp32: 77, peak_gops_int8: 307, memory_bandwidth_gbs: 15}
timing: {warmup: 1, min_runs: 5, min_time_s: 0, max_time_s: 0.2}
"""
GPU = """\
name: gpu
class: cloud
execution_providers: [CUDAExecutionProvider]
preferred_precision: fp16
estimates: {power_w: 70, peak_gflops_fp32: 8000, peak_gflops_fp16: 65000,
            peak_gops_int8: 100000, memory_bandwidth_gbs: 300}
"""


def size_limit(cnn: Path, passes: list[dict]) -> float:
    """A size budget that fails on the real model, yet not before the passes run."""
    return round(toys.size_floor_mb(cnn, passes) * 1.01, 5)


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """int8 artifact, one node kept float; targets: a phone wanting .ort (measured, with a
    failing size budget), a GPU this host cannot measure."""
    folder = tmp_path_factory.mktemp("report")
    cnn = toys.export_cnn_onnx(folder / "cnn.onnx")
    write_cnn_npz(folder / "eval.npz", n=64)
    write_cnn_npz(folder / "calib.npz", n=32, seed=2, labels=False)
    (folder / "phone.yaml").write_text(PHONE, encoding="utf-8")
    (folder / "gpu.yaml").write_text(GPU, encoding="utf-8")
    # keep_float: never: int8 of this toy times slower than float; its report is what is tested
    passes = [{"quantize": {"mode": "static", "exclude_op_types": ["Gemm"],
                             "keep_float": "never"}}]
    recipe = toys.write_recipe(
        folder, model={"onnx": str(cnn)},
        data={"eval": "eval.npz", "calibration": "calib.npz", "batch_size": 32},
        passes=passes,
        targets=[
            {"profile": "phone.yaml",
             "budgets": {"max_size_mb": size_limit(cnn, passes), "max_latency_ms": {"p90": 1000},
                         "max_accuracy_drop": 0.5}},
            {"profile": "gpu.yaml", "budgets": {"max_latency_ms": {"p50": 5}}},
        ],
    )
    result = optimize(load_recipe(recipe))
    assert not result.passed  # the size budget is set to fail
    return result.artifact


@pytest.fixture(scope="module")
def manifest(art) -> dict:
    return json.loads((art / "manifest.json").read_text())


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "link", "img"):  # void elements
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()


def test_html_report_is_one_self_contained_file(art):
    html = (art / "report.html").read_text(encoding="utf-8")
    p = _Tags()
    p.feed(html)
    assert p.open == [], p.open  # every element closed, in order
    names = {t for t, _ in p.tags}
    assert "script" not in names and "link" not in names and "img" not in names
    for _, attrs in p.tags:
        for k, v in attrs.items():
            assert not (k in ("src", "href") and v and "://" in v), (k, v)
    # the only URL is the SVG namespace, which is never fetched
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert names >= {"svg", "table", "style"}


def test_html_report_has_every_part(art, manifest):
    html = (art / "report.html").read_text(encoding="utf-8")
    for s in manifest["stages"]:
        assert f"<b>{s['name']}</b>" in html
    for title in ("Stages", "Targets", "Accuracy vs latency", "Size", "What stayed in float",
                  "Deployables", "Host"):
        assert f"<h2>{title}</h2>" in html
    assert "a budget failed" in html and '<span class="pill bad">FAIL</span>' in html
    assert html.count('aria-label="accuracy vs') == 2  # a chart per target profile
    assert "budget: p90 ≤ 1000 ms (off the chart →)" in html  # the phone chart's region
    limit = manifest["targets"][0]["budgets"]["max_size_mb"]
    assert f"max_size_mb {limit:g}" in html  # the size budget line
    assert "batching hint" in html and "throughput" in html
    assert manifest["host"]["cpu"] in html
    # the node kept float is named, with its share of the MACs
    heavy = manifest["stages"][-1]["precision"]["float_heavy_nodes"]
    assert heavy and all(n["op"] == "Gemm" for n in heavy)
    assert heavy[0]["node"] in html
    assert "model.ort" in html and "loaded back and run" in html


def test_what_was_not_measured_is_labelled_an_estimate(art, manifest):
    html = (art / "report.html").read_text(encoding="utf-8")
    final = manifest["stages"][-1]
    assert final["latency_ms"]["gpu"] is None
    est = final["estimates"]["gpu"]
    assert est["label"] == "estimate" and est["latency"]["latency_ms"] > 0
    assert est["energy"]["label"] == "estimate"
    assert "not measured" in html and '<span class="est">estimate ≥' in html
    assert "(est.)" in html  # hollow estimate points in the GPU chart
    gpu = next(t for t in manifest["targets"] if t["profile"] == "gpu")
    (v,) = gpu["verdicts"]
    assert v["status"] == "not measured" and v["estimate"] == pytest.approx(
        est["latency"]["latency_ms"])
    assert any("fp16" in n for n in gpu["notes"])  # the GPU's precision advice
    md = (art / "report.md").read_text(encoding="utf-8")
    assert "not measured (estimate ≥" in md and "energy ≈" in md


def test_target_results_in_the_manifest(manifest):
    phone = next(t for t in manifest["targets"] if t["profile"] == "phone")
    status = {v["budget"]: v["status"] for v in phone["verdicts"]}
    assert status["max_size_mb"] == "fail" and status["limits.memory_mb"] == "pass"
    assert status["limits.model_size_mb"] == "pass"
    assert phone["budgets"]["max_size_mb"] < 0.15  # just above the int8 floor
    assert phone["batching"]["batch_size"] in (1, 4)
    rt = manifest["stages"][-1]["runtime"]["phone"]
    assert rt["peak_rss_mb"] > 0 and rt["session_create_ms"] > 0
    (d,) = manifest["deployables"]
    assert d["format"] == "ort" and d["profiles"] == ["phone"] and d["check"]["loaded"]


def test_ort_files_are_in_the_artifact_and_load(art, manifest):
    import onnxruntime as ort

    from compactor.measure.size import sha256

    for name, f in manifest["deployables"][0]["files"].items():
        assert sha256(art / name) == f["sha256"]
    sess = ort.InferenceSession(str(art / "model.ort"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "image"


def test_markdown_report_for_a_pull_request(art, manifest):
    md = (art / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# compactor: toy — ❌ a budget failed")
    assert "| phone | max_size_mb |" in md and "❌ FAIL" in md
    assert "batching hint" in md and "stayed float" in md
    assert render_markdown(Manifest.model_validate(manifest)) == md


def test_html_renders_manifests_without_the_newer_fields(manifest):
    """An older manifest (no estimates, precision, batching or budgets) still renders."""
    old = json.loads(json.dumps(manifest))
    for s in old["stages"]:
        for k in ("estimates", "precision"):
            s.pop(k, None)
    for t in old["targets"]:
        t.pop("batching", None)
        t.pop("budgets", None)
    old.pop("deployables", None)
    html = render_html(Manifest.model_validate(old))
    assert "Not recorded for this artifact" in html and "<svg" in html
