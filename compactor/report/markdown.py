"""report.md: the stage table and verdicts, short enough for a pull-request comment."""

from __future__ import annotations

from typing import Any


def fmt_bytes(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def fmt_count(n: int | None) -> str:
    if n is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_metric(name: str, v: float) -> str:
    return f"{v * 100:.2f}%" if name in ("accuracy", "top5") else f"{v:.4g}"


def fmt_delta(name: str, d: float) -> str:
    return f"{d * 100:+.2f} pt" if name in ("accuracy", "top5") else f"{d:+.4g}"


def stage_rows(manifest: dict[str, Any], combined: bool = False
               ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the stage table, shared by the CLI and the reports.

    ``combined`` puts p50 and p90 of a profile in one column, for narrow terminals."""
    metric = manifest["metric"]["name"]
    profiles = [t["profile"] for t in manifest["targets"]]
    header = ["stage", metric, "Δ", "size", "params", "MACs"]
    for p in profiles:
        header += [f"{p} ms p50/p90"] if combined else [f"{p} p50 ms", f"{p} p90 ms"]
    rows = []
    for s in manifest["stages"]:
        row = [
            s["name"],
            fmt_metric(metric, s["metric"]),
            "—" if s["name"] == "baseline" else fmt_delta(metric, s["delta"]),
            fmt_bytes(s["size_bytes"]),
            fmt_count(s["params"]),
            fmt_count(s["macs"]),
        ]
        for p in profiles:
            lat = (s["latency_ms"].get(p) or {}).get("1")
            if lat is None:
                row += ["not measured"] if combined else ["n/m", "n/m"]
            elif combined:
                row.append(f"{lat['p50']:.3f} / {lat['p90']:.3f}")
            else:
                row += [f"{lat['p50']:.3f}", f"{lat['p90']:.3f}"]
        rows.append(row)
    return header, rows


def verdict_rows(manifest: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in manifest["targets"]:
        for v in t["verdicts"]:
            measured = "not measured" if v["measured"] is None else f"{v['measured']:.4g}"
            mark = {"pass": "✅ pass", "fail": "❌ FAIL", "not measured": "⚪ not measured"}
            rows.append([t["profile"], v["budget"], f"{v['limit']:.4g} {v['unit']}",
                         f"{measured} {v['unit']}" if v["measured"] is not None else measured,
                         mark[v["status"]]])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(manifest: dict[str, Any]) -> str:
    status = "✅ all budgets hold" if manifest["passed"] else "❌ a budget failed"
    host = manifest["host"]
    lines = [
        f"# compactor: {manifest['name']} — {status}",
        "",
        f"Metric **{manifest['metric']['name']}** on {manifest['metric']['eval_samples']} "
        "eval samples; latency is batch 1, measured in ONNX Runtime "
        f"{host['onnxruntime']} on this host ({host['cpu']}, {host['cores']} cores).",
        "",
        _table(*stage_rows(manifest)),
        "",
    ]
    base, final = manifest["stages"][0], manifest["stages"][-1]
    for t in manifest["targets"]:
        p = t["profile"]
        b = (base["latency_ms"].get(p) or {}).get("1")
        f = (final["latency_ms"].get(p) or {}).get("1")
        if b and f:
            lines.append(f"- {p}: final model is **{b['p50'] / f['p50']:.2f}×** the baseline's "
                         f"speed (p50, batch 1, same run).")
    lines.append(f"- size: {fmt_bytes(final['size_bytes'])} "
                 f"({final['size_bytes'] / base['size_bytes']:.2f}× the baseline's).")
    lines.append("")
    vrows = verdict_rows(manifest)
    if vrows:
        lines += ["## Budgets", "", _table(["target", "budget", "limit", "measured", "verdict"],
                                          vrows), ""]
    else:
        lines += ["No budgets were set.", ""]
    notes = [n for t in manifest["targets"] for n in t["notes"]]
    notes += [f"{s['name']}: {w}" for s in manifest["stages"] for w in s["record"].get("warnings", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
