"""Drift monitoring: a re-measured check as Prometheus gauges, in the text exposition
format that node_exporter's textfile collector reads (written with ``prometheus_client``,
atomically: the collector never sees half a file).

Per model, version and profile: latency percentiles measured now and the manifest's, their
ratio (now / at release), peak memory likewise, and every verdict as a gauge labelled with
its status. docs/deploy.md ("Monitoring") has a cron and a systemd-timer example.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactor.errors import ArtifactError, UsageError

if TYPE_CHECKING:
    from compactor.check import CheckResult
    from compactor.manifest import Manifest

QUANTILES = ("p50", "p90", "p99")
# every status a verdict can have; a series per status keeps a dashboard's query simple
STATUSES = ("pass", "fail", "inconclusive", "not measured")


def _gauges(registry: Any) -> dict[str, Any]:
    from prometheus_client import Gauge

    base = ["model", "version", "profile"]
    lat = [*base, "batch_size", "quantile"]

    def g(name: str, doc: str, labels: list[str]) -> Any:
        return Gauge(name, doc, labels, registry=registry)

    return {
        "now": g("compactor_latency_seconds",
                 "latency measured now on this host (ONNX Runtime)", lat),
        "then": g("compactor_manifest_latency_seconds",
                  "latency the manifest recorded at release", lat),
        "ratio": g("compactor_latency_ratio",
                   "latency now / the manifest's (above 1: slower than at release)", lat),
        "rss_now": g("compactor_peak_rss_bytes",
                     "peak resident memory measured now", base),
        "rss_then": g("compactor_manifest_peak_rss_bytes",
                      "peak resident memory the manifest recorded", base),
        "rss_ratio": g("compactor_peak_rss_ratio", "peak memory now / the manifest's", base),
        "verdict": g("compactor_verdict", "1 for the verdict's status, 0 for the others",
                     [*base, "budget", "status"]),
        "passed": g("compactor_check_passed", "1 when every check held", ["model", "version"]),
        "time": g("compactor_check_timestamp_seconds", "when this check ran (Unix time)",
                  ["model", "version"]),
    }


def prometheus_text(result: CheckResult, manifest: Manifest, version: str,
                    model: str | None = None) -> tuple[Any, str]:
    """The registry of gauges for ``result`` (a check with ``remeasure``) and its text."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    g = _gauges(registry)
    model = model or manifest.name
    for t in result.targets:
        labels = {"model": model, "version": version, "profile": t.profile}
        if t.measured is None:
            raise UsageError("--prometheus needs --remeasure: the gauges compare latency "
                             "measured now with the manifest's", "add --remeasure")
        _latency(g, labels, t.measured.get("latency_ms") or {},
                 manifest.final.latency_ms.get(t.profile) or {})
        _memory(g, labels, (t.measured.get("runtime") or {}).get("peak_rss_mb"),
                manifest.final.runtime.get(t.profile))
        for v in t.verdicts:
            for s in {*STATUSES, v.status}:
                g["verdict"].labels(**labels, budget=v.budget, status=s).set(
                    int(v.status == s))
    for v in result.integrity:
        for s in {*STATUSES, v.status}:
            g["verdict"].labels(model=model, version=version, profile="", budget=v.budget,
                                status=s).set(int(v.status == s))
    g["passed"].labels(model=model, version=version).set(int(result.passed))
    g["time"].labels(model=model, version=version).set(time.time())
    return registry, generate_latest(registry).decode("utf-8")


def _latency(g: dict[str, Any], labels: Mapping[str, str], now: Mapping[str, Any],
             then: Mapping[str, Any]) -> None:
    for batch, rec in now.items():
        old = then.get(str(batch))
        for q in QUANTILES:
            if rec.get(q) is None:
                continue
            key = {**labels, "batch_size": str(batch), "quantile": q}
            g["now"].labels(**key).set(rec[q] / 1000)
            if old is not None:
                before = getattr(old, q)
                g["then"].labels(**key).set(before / 1000)
                if before > 0:
                    g["ratio"].labels(**key).set(rec[q] / before)


def _memory(g: dict[str, Any], labels: Mapping[str, str], now_mb: float | None,
            then: Any) -> None:
    then_mb = None if then is None else then.peak_rss_mb
    if now_mb is not None:
        g["rss_now"].labels(**labels).set(now_mb * 1e6)
    if then_mb is not None:
        g["rss_then"].labels(**labels).set(then_mb * 1e6)
    if now_mb is not None and then_mb:
        g["rss_ratio"].labels(**labels).set(now_mb / then_mb)


def write_prometheus(path: Path, result: CheckResult, manifest: Manifest, version: str,
                     model: str | None = None) -> str:
    """Write the gauges to ``path`` atomically (a temporary file renamed over it, as the
    textfile collector needs). Returns the text written."""
    from prometheus_client import write_to_textfile

    registry, text = prometheus_text(result, manifest, version, model)
    if path.is_dir():
        raise UsageError(f"--prometheus {path}: a folder", "give a file name ending in .prom")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), registry)
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}",
                            "check the folder exists and is writable") from e
    return text
