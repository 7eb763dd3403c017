"""report.md: the stage table and verdicts, short enough for a pull-request comment."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compactor.report.format import (
    Note,
    VerdictRow,
    common_latency_notes,
    fmt_bytes,
    fmt_count,
    fmt_delta,
    fmt_metric,
    fmt_share,
    headline,
    keep_float_text,
    output_rows,
    stage_notes,
    target_notes,
    verdict_rows,
)

if TYPE_CHECKING:
    from compactor.manifest import Manifest, StageRecord

# Characters that would end a table cell, open code, a link or an HTML tag in GitHub's
# Markdown. Text from an artifact is escaped so it can only ever read as text.
_MD_SPECIAL = {"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]",
               "<": "&lt;", ">": "&gt;"}


def md_text(text: Any) -> str:
    """``text`` safe inside a Markdown paragraph or table cell: control characters made
    visible (no new line, no ANSI), and ``| ` [ ] < >`` and backslashes escaped."""
    from compactor.manifest import visible

    return "".join(_MD_SPECIAL.get(ch, ch) for ch in visible(text))


def stage_rows(manifest: Manifest, combined: bool = False
               ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the stage table, shared by the CLI and the reports.

    ``combined`` puts p50 and p90 of a profile in one column, for narrow terminals."""
    metric = manifest.metric.name
    profiles = [t.profile for t in manifest.targets]
    header = ["stage", metric, "Δ", "size", "params", "MACs"]
    for p in profiles:
        header += [f"{p} ms p50/p90"] if combined else [f"{p} p50 ms", f"{p} p90 ms"]
    rows = []
    for s in manifest.stages:
        row = [
            s.name,
            fmt_metric(metric, s.metric),
            "—" if s.name == "baseline" else fmt_delta(metric, s.delta),
            fmt_bytes(s.size_bytes),
            fmt_count(s.params),
            fmt_count(s.macs),
        ]
        for p in profiles:
            row += _latency_cells(s, p, combined)
        rows.append(row)
    return header, rows


def _latency_cells(s: StageRecord, profile: str, combined: bool) -> list[str]:
    lat = s.latency_at(profile)
    if lat is None:
        est = _estimated_ms(s, profile)
        nm = "not measured" + (f" (estimate ≥ {est:.2g})" if est is not None else "")
        return [nm] if combined else [nm, "n/m"]
    if combined:
        return [f"{lat.p50:.3f} / {lat.p90:.3f}"]
    return [f"{lat.p50:.3f}", f"{lat.p90:.3f}"]


def _estimated_ms(s: StageRecord, profile: str) -> float | None:
    est = s.estimates.get(profile)
    return None if est is None or est.latency is None else est.latency.latency_ms


def budget_rows(manifest: Manifest) -> list[VerdictRow]:
    """Every target's verdicts, as the rows of report.md's and the terminal's budget table."""
    return verdict_rows((t.profile, t.verdicts) for t in manifest.targets)


_MARK = {"pass": "✅ pass", "fail": "❌ FAIL", "inconclusive": "❔ inconclusive",
         "not measured": "⚪ not measured"}


def mark(status: str) -> str:
    """A verdict's cell; a status this renderer does not know reads as itself."""
    return _MARK.get(status, f"❔ {md_text(status)}")


def target_facts(manifest: Manifest, esc: Callable[[Any], str] = str) -> list[str]:
    """One bullet per fact worth a PR comment: memory, batching hint, energy, float nodes.
    ``esc`` escapes the text that comes from the manifest (:func:`md_text` for Markdown)."""
    final = manifest.final
    out = []
    for t in manifest.targets:
        p = t.profile
        facts = []
        rt = final.runtime.get(p)
        if rt is not None and rt.peak_rss_mb is not None:
            facts.append(f"peak memory {rt.peak_rss_mb:.0f} MB RSS")
        hint = t.batching
        if hint and hint.batch_size:
            facts.append(f"batching hint: batch {hint.batch_size} "
                         f"({hint.throughput:,.0f} samples/s; {esc(hint.within)})")
        est = final.estimates.get(p)
        if est is not None and est.energy:
            facts.append(f"energy ≈ {est.energy.energy_mj:.3g} mJ/inference "
                         f"(estimate: {esc(est.energy.basis)})")
        if facts:
            out.append(f"- {esc(p)}: " + "; ".join(facts) + ".")
    out += _precision_facts(final, esc)
    for d in manifest.deployables or []:
        out.append(f"- {esc(d.format)} for {esc(', '.join(d.profiles))}: "
                   f"{esc(', '.join(d.files))} (loaded back and run: "
                   f"{'ok' if d.check.loaded else 'not verified'}).")
    return out


def _precision_facts(final: StageRecord, esc: Callable[[Any], str]) -> list[str]:
    prec = final.precision
    if prec.quantized:
        heavy = prec.float_heavy_nodes
        share = prec.int8_macs_share
        return ["- int8: " + (f"{fmt_share(share)} of MACs" if share is not None else "yes")
                + (f"; stayed float: {esc(', '.join(f'{n.node} ({n.op})' for n in heavy[:5]))}"
                   + (f" and {len(heavy) - 5} more" if len(heavy) > 5 else "") if heavy else
                   "; every compute-heavy node (Conv/MatMul/Gemm/LSTM/GRU/RNN) is int8")
                + "."]
    if prec.recorded:
        return ["- the final model is float (not quantized)."]
    return []


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(map(md_text, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(md_text, r)) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(manifest: Manifest) -> str:
    status = ("✅ " if manifest.passed else "❌ ") + headline(manifest)
    host = manifest.host
    lines = [
        f"# compactor: {md_text(manifest.name)} — {status}",
        "",
        f"Metric **{md_text(manifest.metric.name)}** on "
        f"{manifest.metric.eval_samples} eval samples; latency is batch 1, measured in "
        f"ONNX Runtime {md_text(host.onnxruntime)} on this host ({md_text(host.cpu)}, "
        f"{md_text(host.cores)} cores). "
        "Energy and anything marked *estimate* come from the profile's figures, not a "
        "measurement; report.html in the artifact has the charts.",
        "",
        _table(*stage_rows(manifest)),
        "",
        *_note_lines([n for s in manifest.stages for n in stage_notes(manifest, s)]
                     + common_latency_notes(manifest)),
        *_output_lines(manifest),
        *_speed_lines(manifest),
        *target_facts(manifest, md_text),
        "",
    ]
    vrows = budget_rows(manifest)
    if vrows:
        lines += ["## Budgets", "",
                  _table(["target", "budget", "limit", "measured", "verdict", "detail"],
                         [_budget_cells(r) for r in vrows]), ""]
    else:
        lines += ["No budgets were set.", ""]
    notes = _note_lines([n for t in manifest.targets for n in target_notes(manifest, t)])
    if notes:
        lines += [*notes, ""]
    for s in manifest.stages:
        if isinstance(s.record.get("search"), dict):  # an int8 search ran for this stage
            lines += quantize_section(s.record)
    if manifest.notes:
        lines += ["## Run notes", "", *[f"- note: {md_text(n)}" for n in manifest.notes], ""]
    if manifest.partition is not None:
        part = manifest.partition
        lines += ["## Partition", "", f"Files: {md_text(', '.join(part.files) or 'none')}.",
                  *[f"- note: {md_text(n)}" for n in part.notes], ""]
    return "\n".join(lines)


def _output_lines(manifest: Manifest) -> list[str]:
    """The final stage's outputs, one per line: the metric scoring each (the stage's figure
    is the worst of them) and its error beside a constant predictor's."""
    out = []
    for r in output_rows(manifest):
        text = md_text(r.score)
        if r.error:
            text += "; " + md_text(r.error) + (
                " (**worse than a constant**)" if r.broken else
                " (**no better than a constant, within noise**)" if r.undecided else "")
        if r.note:
            text += f"; {md_text(r.note)}"
        out.append(f"- output `{md_text(r.name)}` ({r.shape}): {text}")
    if not out:
        return []
    return ["Final stage, per output (the metric is the worst scored output):", *out, ""]


def _note_lines(notes: list[Note]) -> list[str]:
    """A bullet per note, under the table whose figure it qualifies: warnings first."""
    ordered = [n for n in notes if n.warning] + [n for n in notes if not n.warning]
    return [f"- {'⚠️ **warning**' if n.warning else 'note'} ({md_text(n.label)}): "
            f"{md_text(n.text)}" for n in ordered]


def _budget_cells(r: VerdictRow) -> list[str]:
    measured = r.measured_text + (f" ({r.interval})" if r.interval else "")
    return [r.target, r.budget, r.limit, measured, mark(r.status), r.detail]


def _speed_lines(manifest: Manifest) -> list[str]:
    base, final = manifest.baseline, manifest.final
    lines = []
    for t in manifest.targets:
        b, f = base.latency_at(t.profile), final.latency_at(t.profile)
        if b and f:
            lines.append(f"- {md_text(t.profile)}: final model is **{b.p50 / f.p50:.2f}×** the "
                         "baseline's speed (p50, batch 1, same run).")
    lines.append(f"- size: {fmt_bytes(final.size_bytes)} "
                 f"({final.size_bytes / base.size_bytes:.2f}× the baseline's).")
    return lines


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
        if acc.get("note"):
            lines.append(f"- {md_text(acc['note'])}")
    kept = keep_float_text(rec)
    if kept:
        lines.append(f"- {md_text(kept)}")
    if isinstance(rec.get("smoothquant"), dict):
        lines.append("- SmoothQuant-style scale migration: "
                     f"{md_text(rec['smoothquant'].get('description', ''))}")
    cands = [c for c in search.get("candidates", []) if isinstance(c, dict)]
    if len(cands) > 1 or any(c.get("note") for c in cands):
        lines += ["", _table(["candidate", "p50 ms", "vs float", "note"],
                             [[c.get("label", "?"), _num(c.get("p50_ms"), "{:.3f}"),
                               _num(c.get("speedup_vs_float"), "{:.2f}×"), c.get("note", "")]
                              for c in cands])]
    for r in rec.get("repairs_not_applied") or []:
        lines.append(f"- repair **{md_text(r.get('repair'))}** could not apply: "
                     f"{md_text(r.get('reason'))}")
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


def _num(v: Any, form: str) -> str:
    """A figure from a pass's record, or "—" where it has none (an untimed candidate)."""
    return form.format(v) if isinstance(v, int | float) else "—"
