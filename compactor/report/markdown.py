"""report.md: the stage table and verdicts, short enough for a pull-request comment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Characters that would end a table cell, open code, a link or an HTML tag in GitHub's
# Markdown. Text from an artifact is escaped so it can only ever read as text.
_MD_SPECIAL = {"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]",
               "<": "&lt;", ">": "&gt;"}


def md_text(text: Any) -> str:
    """``text`` safe inside a Markdown paragraph or table cell: control characters made
    visible (no new line, no ANSI), and ``| ` [ ] < >`` and backslashes escaped."""
    from compactor.manifest import visible

    return "".join(_MD_SPECIAL.get(ch, ch) for ch in visible(text))


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


def fmt_num(v: float) -> str:
    """A limit or a measured figure: 4 significant digits, never scientific notation."""
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def fmt_share(share: float) -> str:
    """A fraction as a percentage that never rounds a part to all or nothing."""
    if 0 < share < 0.001:
        return "<0.1%"
    if 0.999 < share < 1:
        return ">99.9%"
    return f"{share * 100:.1f}%".replace(".0%", "%")


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
                est = (((s.get("estimates") or {}).get(p) or {}).get("latency") or {}).get(
                    "latency_ms")
                nm = "not measured" + (f" (estimate ≥ {est:.2g})" if est is not None else "")
                row += [nm] if combined else [nm, "n/m"]
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
            measured = "not measured" if v["measured"] is None else fmt_num(v["measured"])
            if v["measured"] is None and v.get("estimate") is not None:
                measured += f" (estimate ≥ {v['estimate']:.3g} {v['unit']})"
            mark = {"pass": "✅ pass", "fail": "❌ FAIL", "not measured": "⚪ not measured"}
            rows.append([t["profile"], v["budget"], f"{fmt_num(v['limit'])} {v['unit']}",
                         f"{measured} {v['unit']}" if v["measured"] is not None else measured,
                         mark[v["status"]]])
    return rows


def target_facts(manifest: dict[str, Any], esc: Callable[[Any], str] = str) -> list[str]:
    """One bullet per fact worth a PR comment: memory, batching hint, energy, float nodes.
    ``esc`` escapes the text that comes from the manifest (:func:`md_text` for Markdown)."""
    final = manifest["stages"][-1]
    out = []
    for t in manifest["targets"]:
        p = t["profile"]
        facts = []
        rt = (final.get("runtime") or {}).get(p) or {}
        if rt.get("peak_rss_mb") is not None:
            facts.append(f"peak memory {rt['peak_rss_mb']:.0f} MB RSS")
        hint = t.get("batching")
        if hint and hint.get("batch_size"):
            facts.append(f"batching hint: batch {hint['batch_size']} "
                         f"({hint['throughput']:,.0f} samples/s; {esc(hint['within'])})")
        est = (final.get("estimates") or {}).get(p) or {}
        if est.get("energy"):
            facts.append(f"energy ≈ {est['energy']['energy_mj']:.3g} mJ/inference "
                         f"(estimate: {esc(est['energy']['basis'])})")
        if facts:
            out.append(f"- {esc(p)}: " + "; ".join(facts) + ".")
    prec = final.get("precision") or {}
    if prec.get("quantized"):
        heavy = prec.get("float_heavy_nodes") or []
        share = prec.get("int8_macs_share")
        out.append("- int8: " + (f"{fmt_share(share)} of MACs" if share is not None else "yes")
                   + (f"; stayed float: {esc(', '.join(n['node'] for n in heavy[:5]))}"
                      + (" …" if len(heavy) > 5 else "") if heavy else
                      "; every Conv/MatMul/Gemm is int8") + ".")
    elif prec:
        out.append("- the final model is float (not quantized).")
    for d in manifest.get("deployables") or []:
        out.append(f"- {esc(d['format'])} for {esc(', '.join(d['profiles']))}: "
                   f"{esc(', '.join(d['files']))} (loaded back and run: "
                   f"{'ok' if d.get('check', {}).get('loaded') else 'not verified'}).")
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(map(md_text, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(md_text, r)) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(manifest: dict[str, Any]) -> str:
    status = "✅ all budgets hold" if manifest["passed"] else "❌ a budget failed"
    host = manifest["host"]
    lines = [
        f"# compactor: {md_text(manifest['name'])} — {status}",
        "",
        f"Metric **{md_text(manifest['metric']['name'])}** on "
        f"{manifest['metric']['eval_samples']} eval samples; latency is batch 1, measured in "
        f"ONNX Runtime {md_text(host['onnxruntime'])} on this host ({md_text(host['cpu'])}, "
        f"{md_text(host['cores'])} cores). "
        "Energy and anything marked *estimate* come from the profile's figures, not a "
        "measurement; report.html in the artifact has the charts.",
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
            lines.append(f"- {md_text(p)}: final model is **{b['p50'] / f['p50']:.2f}×** the "
                         "baseline's speed (p50, batch 1, same run).")
    lines.append(f"- size: {fmt_bytes(final['size_bytes'])} "
                 f"({final['size_bytes'] / base['size_bytes']:.2f}× the baseline's).")
    lines += target_facts(manifest, md_text)
    lines.append("")
    vrows = verdict_rows(manifest)
    if vrows:
        lines += ["## Budgets", "", _table(["target", "budget", "limit", "measured", "verdict"],
                                          vrows), ""]
    else:
        lines += ["No budgets were set.", ""]
    for s in manifest["stages"]:
        if s["name"] == "quantize" and isinstance(s["record"].get("search"), dict):
            lines += quantize_section(s["record"])
    notes = [n for t in manifest["targets"] for n in t["notes"]]
    notes += [f"{s['name']}: {w}" for s in manifest["stages"]
              for w in s["record"].get("warnings", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {md_text(n)}" for n in notes] + [""]
    return "\n".join(lines)


def quantize_section(rec: dict[str, Any]) -> list[str]:
    """What the int8 search chose and why, which nodes stayed float, what it cost."""
    search = rec["search"]
    acc = rec.get("accuracy_budget") or {}
    lines = ["## Quantization", "",
             f"- mode **{md_text(rec.get('mode'))}**: {md_text(rec.get('mode_reason', ''))}"]
    isa = rec.get("isa") or {}
    choice = rec.get("int8_choice") or {}
    if isa:
        lines.append(f"- CPU int8 path: {md_text(isa.get('int8_path'))}; "
                     f"{md_text(choice.get('reason', ''))}")
    speed = (f", {search['speedup_vs_input']:.2f}× its float input (timed interleaved on "
             f"{md_text((search.get('timings') or [{}])[0].get('profile', '?'))})"
             if search.get("speedup_vs_input") else "")
    lines.append(f"- chosen: **{md_text(search.get('chosen'))}**{speed}; search took "
                 f"{search.get('seconds', 0):.1f} s"
                 + (" (stopped at time_budget_s)" if search.get("timed_out") else ""))
    if acc:
        held = (acc.get("held_out") or {}).get("drop")
        found = (acc.get("search") or {}).get("drop", 0.0)
        lines.append(
            f"- accuracy budget ({md_text(acc.get('source'))}): {md_text(acc.get('metric'))} "
            "drop ≤ "
            f"{acc.get('allowed', 0):.4g}; search part {found:.4g}"
            + (f", held-out part {held:.4g}" if held is not None else "")
            + (" — met" if acc.get("met") else " — **not met**"))
    if isinstance(rec.get("smoothquant"), dict):
        lines.append("- SmoothQuant-style scale migration: "
                     f"{md_text(rec['smoothquant'].get('description', ''))}")
    cands = [c for c in search.get("candidates", []) if "p50_ms" in c]
    if len(cands) > 1:
        lines += ["", _table(["candidate", "p50 ms", "vs float", "note"],
                             [[c["label"], f"{c['p50_ms']:.3f}",
                               f"{c.get('speedup_vs_float', 0):.2f}×", c.get("note", "")]
                              for c in cands])]
    floats = rec.get("float_nodes") or []
    if floats:
        cost = search.get("repair_cost_ms")
        lines += ["", f"Nodes kept in float ({len(floats)})"
                  + (f"; the repairs cost {cost:+.3f} ms p50, measured" if cost is not None
                     else "") + ":", "",
                  _table(["node", "op", "why", "speed cost (estimate)"],
                         [[f["node"], f["op_type"], f["reason"],
                           f"{f['speed_cost_ms_estimate']:.3f} ms"
                           if "speed_cost_ms_estimate" in f else "—"] for f in floats])]
    return [*lines, ""]
