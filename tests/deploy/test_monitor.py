"""check --remeasure --prometheus: gauges for node_exporter's textfile collector, labelled
by model, version and profile; read back with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from toys import assert_clean_error, run_cli


def _samples(path):
    from prometheus_client.parser import text_string_to_metric_families

    return [s for fam in text_string_to_metric_families(path.read_text(encoding="utf-8"))
            for s in fam.samples]


def _value(samples, name, **labels):
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_a_repository_version_remeasured_as_prometheus_gauges(artifact, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("package", artifact, "--triton", repo, "--name", "digits").exit_code == 0
    prom = tmp_path / "textfile" / "compactor.prom"
    r = run_cli("check", repo, "--remeasure", "--prometheus", prom)
    assert r.exit_code in (0, 5), r.output  # 5: a latency verdict undecided on a busy host
    samples = _samples(prom)
    key = {"model": "digits", "version": "1", "profile": "toy-cloud", "batch_size": "1",
           "quantile": "p99"}
    now = _value(samples, "compactor_latency_seconds", **key)
    then = _value(samples, "compactor_manifest_latency_seconds", **key)
    assert now > 0 and then > 0
    assert _value(samples, "compactor_latency_ratio", **key) == pytest.approx(now / then)
    assert {s.labels["batch_size"] for s in samples
            if s.name == "compactor_latency_seconds"} == {"1", "4", "16"}
    rss = _value(samples, "compactor_peak_rss_bytes", model="digits", version="1",
                 profile="toy-cloud")
    assert rss > 1e6
    # every verdict is one series per status, 1 on the status it has
    size = [s for s in samples if s.name == "compactor_verdict"
            and s.labels["budget"] == "max_size_mb"]
    assert sorted(s.labels["status"] for s in size if s.value == 1) == ["pass"]
    assert {s.labels["status"] for s in size} >= {"pass", "fail", "inconclusive"}
    assert _value(samples, "compactor_check_passed", model="digits", version="1") == 1
    assert not [p for p in prom.parent.iterdir() if p != prom]  # written by rename, no temp


def test_a_drifted_host_shows_as_a_ratio_above_one(edited, tmp_path):
    """A manifest that recorded 100x faster latencies than this host gives: ratio ≫ 1."""
    def fast_at_release(m: dict) -> None:
        for rec in m["stages"][-1]["latency_ms"]["toy-cloud"].values():
            for q in ("p50", "p90", "p99", "mean", "min"):
                rec[q] /= 100

    prom = tmp_path / "drift.prom"
    r = run_cli("check", edited(fast_at_release), "--remeasure", "-t", "toy-cloud",
                "--prometheus", prom)
    assert r.exit_code in (0, 1, 5), r.output
    ratio = _value(_samples(prom), "compactor_latency_ratio", version="", batch_size="1",
                   quantile="p50")
    assert ratio > 10, ratio


def test_prometheus_needs_remeasure(artifact, tmp_path):
    prom = tmp_path / "x.prom"
    assert_clean_error(run_cli("check", artifact, "--prometheus", prom), 2, "--remeasure")
    assert not prom.exists()


def test_a_tampered_version_reports_its_integrity_gauge_and_exits_1(artifact, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("package", artifact, "--triton", repo).exit_code == 0
    with open(repo / "toy" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    prom = tmp_path / "t.prom"
    r = run_cli("check", repo / "toy", "--remeasure", "--prometheus", prom)
    assert_clean_error(r, 1, "modified after compactor wrote it")
    samples = _samples(prom)
    assert _value(samples, "compactor_verdict", budget="integrity.model.onnx",
                  status="fail") == 1
    assert _value(samples, "compactor_check_passed", model="toy", version="1") == 0
