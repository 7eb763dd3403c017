"""report.html: one self-contained file (inline CSS and SVG, no scripts, nothing fetched)
with the stage table, each target's verdicts, an accuracy-vs-latency chart per profile, size
bars, what stayed in float, and the host the numbers were measured on.

Rendered from the manifest alone, so ``compactor check`` and a CI job can re-render it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

from compactor.report.format import (
    Note,
    VerdictRow,
    common_latency_notes,
    fmt_bytes,
    fmt_count,
    fmt_delta,
    fmt_metric,
    fmt_ms,
    fmt_share,
    headline,
    keep_float_text,
    output_rows,
    stage_notes,
    target_notes,
    verdict_rows,
)

if TYPE_CHECKING:
    from compactor.manifest import (
        Deployable,
        HostRecord,
        LatencyRecord,
        Manifest,
        StageRecord,
        TargetRecord,
    )

# One colour per stage, in pipeline order; chosen to stay apart for common colour blindness.
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948",
           "#9c755f"]
STATUS = {"pass": ("pass", "ok"), "fail": ("FAIL", "bad"), "inconclusive": ("inconclusive", "inc"),
          "not measured": ("not measured", "nm")}

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --panel:#f6f8fa;
        --ok:#1a7f37; --ok-bg:#dafbe1; --bad:#cf222e; --bad-bg:#ffebe9; --nm:#9a6700;
        --nm-bg:#fff8c5; --inc:#8250df; --inc-bg:#fbefff; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial,
       sans-serif; color: var(--fg); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 10px; padding-bottom: 6px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 8px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.badge { display: inline-block; padding: 3px 12px; border-radius: 999px; font-weight: 600;
         font-size: 14px; vertical-align: middle; margin-left: 10px; }
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.bad { background: var(--bad-bg); color: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
        padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card .d { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: right;
         white-space: nowrap; }
th { background: var(--panel); font-weight: 600; font-size: 13px; }
th:first-child, td:first-child { text-align: left; }
td.l, th.l { text-align: left; white-space: normal; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
.scroll table tr:last-child td { border-bottom: 0; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px;
        font-weight: 600; }
.pill.ok { background: var(--ok-bg); color: var(--ok); }
.pill.bad { background: var(--bad-bg); color: var(--bad); }
.pill.nm { background: var(--nm-bg); color: var(--nm); }
.pill.inc { background: var(--inc-bg); color: var(--inc); border: 1px dashed var(--inc); }
.badge.inc { background: var(--inc-bg); color: var(--inc); }
tr.notes td { border-bottom: 1px solid var(--line); padding-top: 0; white-space: normal;
              text-align: left; }
tr.has-notes td { border-bottom: 0; }
.warn { color: var(--bad); }
.attention { border: 1px solid var(--bad); background: var(--bad-bg); border-radius: 8px;
             padding: 10px 16px; margin: 0 0 18px; }
.attention.inc { border-color: var(--inc); background: var(--inc-bg); }
.attention ul { margin: 4px 0 0; padding-left: 18px; }
.est { color: var(--nm); font-style: italic; }
.muted { color: var(--muted); }
.stack { display: grid; gap: 16px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
.panel { border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
.panel.fail { border-color: var(--bad); }
.notes { margin: 8px 0 0; padding-left: 18px; color: var(--muted); font-size: 13px; }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; font-size: 13px; }
.kv div:nth-child(odd) { color: var(--muted); }
svg text { font-family: inherit; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 12px; margin-top: 6px; }
.legend span i { display: inline-block; width: 10px; height: 10px; border-radius: 50%;
                 margin-right: 5px; vertical-align: -1px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
"""


def _e(x: Any) -> str:
    """Text (from the manifest) as HTML text: control characters shown visibly, then
    HTML-escaped, so it can neither open a tag nor drive a terminal that prints the file."""
    from compactor.manifest import visible

    return escape(visible(x), quote=True)


def _pill(status: str) -> str:
    text, cls = STATUS.get(status, (status, "nm"))
    return f'<span class="pill {cls}">{_e(text)}</span>'


def _lat(stage: StageRecord, profile: str) -> LatencyRecord | None:
    return stage.latency_at(profile)


def _est_ms(stage: StageRecord, profile: str) -> float | None:
    e = stage.estimates.get(profile)
    return None if e is None or e.latency is None else e.latency.latency_ms


# --------------------------------------------------------------------------- page


def render_html(manifest: Manifest) -> str:
    name = manifest.name
    inconclusive = any(v.status == "inconclusive" for t in manifest.targets for v in t.verdicts)
    tone = "bad" if not manifest.passed else "inc" if inconclusive else "ok"
    badge = f'<span class="badge {tone}">{_e(headline(manifest))}</span>'
    metric = manifest.metric
    host = manifest.host
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>compactor: {_e(name)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>{_e(name)}{badge}</h1>",
        f'<p class="sub">compactor {_e(manifest.compactor_version)} · '
        f'{_e(manifest.created)} · metric <b>{_e(metric.name)}</b> on '
        f'{_e(metric.eval_samples)} eval samples · latency measured in ONNX Runtime '
        f'{_e(_or(host.onnxruntime, ""))} on {_e(_or(host.cpu, "this host"))} '
        f'({_e(_or(host.cores, "?"))} cores)</p>',
        _attention(manifest),
        _summary_cards(manifest),
        "<h2>Stages</h2>",
        _stage_table(manifest),
        _outputs(manifest),
        "<h2>Targets</h2>",
        _targets(manifest),
        "<h2>Accuracy vs latency</h2>",
        '<p class="sub">Each point is a stage at batch 1; the shaded region is where the '
        "target's budgets hold. Hollow points are estimates (this host could not measure the "
        "profile).</p>",
        _charts(manifest),
        "<h2>Size</h2>",
        _size_bars(manifest),
        "<h2>What stayed in float</h2>",
        _precision(manifest),
    ]
    for i, st in enumerate(manifest.stages):
        if isinstance(st.record.get("search"), dict):  # an int8 search ran for this stage
            parts += [f"<h2 id=\"quantize-{i}\">Quantization: {_e(st.name)}</h2>",
                      _quantization(st.record)]
    if manifest.deployables:
        parts += ["<h2>Deployables</h2>", _deployables(manifest.deployables)]
    if manifest.notes:
        parts += ["<h2>Run notes</h2>", '<ul class="notes">'
                  + "".join(f"<li>{_e(n)}</li>" for n in manifest.notes) + "</ul>"]
    if manifest.partition is not None:
        part = manifest.partition
        parts += ["<h2>Partition</h2>",
                  "<p>" + (", ".join(f"<code>{_e(f)}</code>" for f in part.files)
                           or "no files") + "</p>",
                  '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in part.notes)
                  + "</ul>" if part.notes else ""]
    parts += [
        "<h2>Host</h2>",
        _host(host),
        "<footer>Every latency, memory and size figure above was measured on the host "
        "described here, in ONNX Runtime, on the exported model; figures marked "
        '<span class="est">estimate</span> come from the profile\'s peak figures and were '
        "not measured. Energy is always an estimate (latency × the profile's power).</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _or(v: Any, default: Any) -> Any:
    """``v``, or ``default`` where the manifest did not record it."""
    return default if v is None else v


def _summary_cards(m: Manifest) -> str:
    base, final = m.baseline, m.final
    metric = m.metric.name
    cards = [
        ("size", fmt_bytes(final.size_bytes),
         f"{final.size_bytes / base.size_bytes:.2f}× the baseline's "
         f"({fmt_bytes(base.size_bytes)})" if base.size_bytes else ""),
        (metric, fmt_metric(metric, final.metric),
         f"{fmt_delta(metric, final.delta)} vs baseline"),
    ]
    for t in m.targets:
        p = t.profile
        b, f = _lat(base, p), _lat(final, p)
        est = _est_ms(final, p)
        if b and f:
            qualified = base.latency_notes.get(p) or final.latency_notes.get(p)
            cards.append((f"speed-up on {p}", f"{b.p50 / f.p50:.2f}×",
                          f"p50 {fmt_ms(b.p50)} → {fmt_ms(f.p50)} ms, batch 1"
                          + ("; qualified by the notes on its target below" if qualified
                             else "")))
        elif est is not None:
            cards.append((f"{p}", "not measured", f"estimate ≥ {fmt_ms(est)} ms (roofline)"))
    failed = sum(1 for t in m.targets for v in t.verdicts if v.status == "fail")
    unsure = sum(1 for t in m.targets for v in t.verdicts if v.status == "inconclusive")
    total = sum(len(t.verdicts) for t in m.targets)
    cards.append(("verdicts", f"{total - failed - unsure}/{total} hold" if total
                  else "no budgets",
                  ", ".join([f"{failed} failed"] * bool(failed)
                            + [f"{unsure} inconclusive"] * bool(unsure))
                  or "across all targets"))
    out = ['<div class="cards">']
    for k, v, d in cards:
        out.append(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                   f'<div class="d">{_e(d)}</div></div>')
    out.append("</div>")
    return "".join(out)


def _stage_table(m: Manifest) -> str:
    metric = m.metric.name
    profiles = [t.profile for t in m.targets]
    head = ["stage", _e(metric), "Δ", "size", "params", "MACs"]  # raw_head: escaped here
    head += [f"{_e(p)}<br><span class='muted'>p50 / p90 ms</span>" for p in profiles]
    rows = []
    for s in m.stages:
        cells = [
            f"<b>{_e(s.name)}</b>",
            _e(fmt_metric(metric, s.metric)),
            "—" if s.name == "baseline" else _e(fmt_delta(metric, s.delta)),
            _e(fmt_bytes(s.size_bytes)),
            _e(fmt_count(s.params)),
            _e(fmt_count(s.macs)),
        ]
        for p in profiles:
            lat = _lat(s, p)
            if lat:
                cells.append(f"{fmt_ms(lat.p50)} / {fmt_ms(lat.p90)}")
            else:
                est = _est_ms(s, p)
                cells.append("not measured" + (
                    f'<br><span class="est">estimate ≥ {fmt_ms(est)}</span>' if est else ""))
        rows.append(cells)
    notes = [_note_list(stage_notes(m, s)) for s in m.stages]
    common = common_latency_notes(m)
    if common:
        rows.append(['<span class="muted">every stage</span>'] + [""] * (len(head) - 1))
        notes.append(_note_list(common))
    ids = [f"stage-{i}" for i in range(len(m.stages))]
    return _table(head, rows, raw_head=True, notes=notes, ids=ids)


def _outputs(m: Manifest) -> str:
    """The final stage per output: the stage's metric is the worst scored one, and a head
    worse than a constant predictor is marked where its figure is."""
    rows = output_rows(m)
    if not rows:
        return ""
    cells = []
    for r in rows:
        flag = (" " + _pill("fail") + " worse than a constant" if r.broken else
                " " + _pill("inconclusive") + " within noise of a constant" if r.undecided
                else "")
        cells.append([f"<code>{_e(r.name)}</code>", _e(r.shape), _e(r.score),
                      _e(r.error) + flag, _e(r.note)])
    return ("<h3>Final stage, per output</h3>"
            '<p class="sub">The stage\'s metric is the worst scored output.</p>'
            + _table(["output", "shape", "metric", "error vs a constant predictor", "note"],
                     cells, left={0, 4}))


def _note_list(notes: list[Note]) -> str:
    """Notes under the row whose figures they qualify; warnings first, in red."""
    ordered = [n for n in notes if n.warning] + [n for n in notes if not n.warning]
    return "".join(
        ('<li class="warn">' if n.warning else "<li>")
        + ("<b>warning</b>: " if n.warning else "")
        + (f"<b>{_e(n.profile)} latency</b>: " if n.profile and n.stage else "")
        + (f"<b>{_e(n.profile)} latency</b> (every stage): " if n.every_stage else "")
        + f"{_e(n.text)}</li>" for n in ordered)


def _table(head: list[str], rows: list[list[str]], raw_head: bool = False,
           left: set[int] | None = None, notes: list[str] | None = None,
           ids: list[str] | None = None) -> str:
    """A table; ``notes[i]`` (``<li>`` items) goes in a full-width row right under row
    ``i``, and ``ids[i]`` is row ``i``'s anchor."""
    left = left or set()
    out = ['<div class="scroll"><table><thead><tr>']
    for i, h in enumerate(head):
        cls = ' class="l"' if i in left else ""
        out.append(f"<th{cls}>{h if raw_head else _e(h)}</th>")
    out.append("</tr></thead><tbody>")
    for j, r in enumerate(rows):
        note = notes[j] if notes and j < len(notes) else ""
        attrs = (f' id="{ids[j]}"' if ids and j < len(ids) else "") + (
            ' class="has-notes"' if note else "")
        out.append(f"<tr{attrs}>" + "".join(
            ('<td class="l">' if i in left else "<td>") + f"{c}</td>" for i, c in enumerate(r))
            + "</tr>")
        if note:
            out.append(f'<tr class="notes"><td colspan="{len(head)}">'
                       f'<ul class="notes">{note}</ul></td></tr>')
    out.append("</tbody></table></div>")
    return "".join(out)


def _targets(m: Manifest) -> str:
    final = m.final
    out = ['<div class="stack">']
    for i, t in enumerate(m.targets):
        settings = t.settings
        status = '<span class="pill ok">pass</span>' if t.passed else \
            '<span class="pill bad">FAIL</span>'
        if t.passed and any(v.status == "inconclusive" for v in t.verdicts):
            status += " " + _pill("inconclusive")
        out.append(f'<div class="panel{"" if t.passed else " fail"}" id="target-{i}">')
        out.append(f"<h3>{_e(t.profile)} {status} <span class='muted'>"
                   f"{_e(settings.target_class if settings else '')} · "
                   f"{_e(', '.join(settings.execution_providers if settings else []))}"
                   "</span></h3>")
        if t.verdicts:
            out.append(_table(["budget", "limit", "measured", "verdict", "detail"],
                              [_verdict_cells(r) for r in verdict_rows([(t.profile, t.verdicts)])],
                              left={4}))
        else:
            out.append('<p class="muted">No budgets for this target.</p>')
        out.append(_target_facts(final, t))
        notes = target_notes(m, t)
        if notes:
            out.append('<ul class="notes">' + "".join(f"<li>{_e(n.text)}</li>" for n in notes)
                       + "</ul>")
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


def _verdict_cells(r: VerdictRow) -> list[str]:
    if r.measured is not None:
        got = _e(r.measured) + (f'<br><span class="muted">{_e(r.interval)}</span>'
                                if r.interval else "")
    elif r.estimate is not None:
        got = f'<span class="est">estimate {_e(r.estimate)}</span>'
    else:
        got = "—"
    return [_e(r.budget), _e(r.limit), got, _pill(r.status),
            f'<span class="muted">{_e(r.detail)}</span>']


def _target_facts(final: StageRecord, t: TargetRecord) -> str:
    p = t.profile
    lat = final.latency_ms.get(p) or {}
    kv = _measured_facts(final, t, lat)
    est = final.estimates.get(p)
    if est is not None and est.energy:
        e = est.energy
        kv.append(("energy / inference",
                   f'<span class="est">estimate {e.energy_mj:.3g} mJ</span> '
                   f'<span class="muted">({_e(e.basis)})</span>'))
    if not lat and est is not None and est.latency:
        el = est.latency
        kv.append(("latency", f'<span class="est">estimate ≥ {fmt_ms(el.latency_ms)} ms</span> '
                   f'<span class="muted">({_e(el.basis)})</span>'))
    if not kv:
        return ""
    return '<div class="kv" style="margin-top:10px">' + "".join(
        f"<div>{_e(k)}</div><div>{v}</div>" for k, v in kv) + "</div>"


def _measured_facts(final: StageRecord, t: TargetRecord,
                    lat: dict[str, LatencyRecord]) -> list[tuple[str, str]]:
    """Throughput, batching hint, cold start, memory and timing of the final stage."""
    kv: list[tuple[str, str]] = []
    if len(lat) > 1:
        kv.append(("throughput", " · ".join(
            f"batch {b}: {v.throughput:,.0f}/s" for b, v in
            sorted(lat.items(), key=lambda kv: int(kv[0])))))
    hint = t.batching
    if hint:
        if hint.batch_size:
            kv.append(("batching hint", f"batch {hint.batch_size} "
                       f"({hint.throughput:,.0f} samples/s, p90 {fmt_ms(hint.p90_ms)} ms; "
                       f"{_e(hint.within)})"))
        else:
            kv.append(("batching hint", _e(_or(hint.reason, "none"))))
    rt = final.runtime.get(t.profile)
    if rt is not None and rt.session_create_ms is not None:
        kv.append(("cold start", f"session {rt.session_create_ms:.1f} ms, first run "
                   f"{(rt.first_run_ms or 0):.2f} ms"))
    if rt is not None and rt.peak_rss_mb is not None:
        limit = t.settings.limits.memory_mb if t.settings else None
        kv.append(("peak memory", f"{rt.peak_rss_mb:.0f} MB RSS"
                   + (f" of {limit:g} MB" if limit else "")
                   + (f" (runtime alone {rt.runtime_rss_mb:.0f} MB)"
                      if rt.runtime_rss_mb else "")))
    l1 = lat.get("1")
    if l1 and l1.ci is not None:
        kv.append(("timing", f"{l1.runs} runs, median ±{l1.ci * 100:.1f}% (95% CI)"
                   + ("" if l1.stable or "stable" not in l1.model_fields_set
                      else ", not stable within the time cap")))
    return kv


# --------------------------------------------------------------------------- charts


def _tick_label(v: float, ticks: list[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(v) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10 ** decimals % 1:
        decimals += 1  # 2.5, 0.25
    return f"{v:.{decimals}f}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _budget_box(t: TargetRecord) -> tuple[str | None, float | None, float | None]:
    """The latency quantile, latency limit and metric floor of a target's budgets."""
    q, lat_limit, floor = None, None, None
    for v in t.verdicts:
        b = v.budget
        if b.startswith("max_latency_ms.") and lat_limit is None:
            q, lat_limit = b.split(".", 1)[1], v.limit
        if b == "max_accuracy_drop":
            floor = v.limit  # allowed drop, in metric units
    return q, lat_limit, floor


def _charts(m: Manifest) -> str:
    out = ['<div class="grid2">']
    for t in m.targets:
        out.append(f'<div class="panel"><h3>{_e(t.profile)}</h3>{_chart(m, t)}</div>')
    out.append("</div>")
    return "".join(out)


@dataclass(frozen=True)
class _Point:
    """A stage in the accuracy-vs-latency chart (``est``: the latency is an estimate)."""

    name: str
    x: float
    y: float
    est: bool
    color: str


@dataclass(frozen=True)
class _Budget:
    """The region of a chart where a target's budgets hold."""

    q: str  # the latency quantile the budget limits
    lat_limit: float | None
    floor: float | None  # the worst metric the budget allows
    higher: bool  # the metric is better higher


@dataclass(frozen=True)
class _Frame:
    """A chart's plot area (``ml``/``mt``: left and top margins) and its scales."""

    x_hi: float
    y_lo: float
    y_hi: float
    w: int = 520
    h: int = 300
    ml: int = 62
    mt: int = 14
    pw: int = 520 - 62 - 18
    ph: int = 300 - 14 - 44

    def x(self, v: float) -> float:
        return self.ml + v / self.x_hi * self.pw

    def y(self, v: float) -> float:
        return self.mt + (self.y_hi - v) / (self.y_hi - self.y_lo) * self.ph


def _chart(m: Manifest, t: TargetRecord) -> str:
    metric = m.metric.name
    q, lat_limit, allowed_drop = _budget_box(t)
    q = q or "p50"
    pts = _points(m, t.profile, q)
    if not pts:
        return '<p class="muted">Not measured on this host, and the profile has no peak ' \
               "figures to estimate from.</p>"
    higher = m.metric.higher_is_better
    base_metric = m.baseline.metric
    floor = None
    if allowed_drop is not None:
        floor = base_metric - allowed_drop if higher else base_metric + allowed_drop
    budget = _Budget(q, lat_limit, floor, higher)
    f = _frame(pts, budget, metric)
    svg = [f'<svg viewBox="0 0 {f.w} {f.h}" width="100%" role="img" '
           f'aria-label="{_e(metric)} vs {_e(q)} latency on {_e(t.profile)}" '
           'xmlns="http://www.w3.org/2000/svg">']
    region, label = _budget_region(f, budget, metric)
    svg += region
    svg += _axes(f, metric)
    svg.append(label)  # over the grid, so lines do not cross it
    svg += _axis_titles(f, q, metric)
    svg += _series(f, pts, metric)
    svg += _point_labels(f, pts)
    svg.append("</svg>")
    return "".join(svg) + _legend(pts, metric)


def _points(m: Manifest, profile: str, q: str) -> list[_Point]:
    """Each stage measured (or estimated) on ``profile``, at its ``q`` latency."""
    pts = []
    for i, s in enumerate(m.stages):
        color = PALETTE[i % len(PALETTE)]
        lat, est = _lat(s, profile), _est_ms(s, profile)
        if lat:
            pts.append(_Point(s.name, getattr(lat, q), s.metric, False, color))
        elif est is not None:
            pts.append(_Point(s.name, est, s.metric, True, color))
    return pts


def _frame(pts: list[_Point], budget: _Budget, metric: str) -> _Frame:
    """Axes that fit the points; a budget far beyond them is drawn to the edge, not to
    scale."""
    x_pts = max(p.x for p in pts) or 1.0
    x_hi = x_pts * 1.25
    if budget.lat_limit is not None and budget.lat_limit <= x_pts * 3:
        x_hi = max(x_hi, budget.lat_limit * 1.1)
    ys = [p.y for p in pts]
    y_lo, y_hi = min(ys), max(ys)
    pad = max((y_hi - y_lo) * 0.25, abs(y_hi) * 0.01, 1e-3)
    floor = budget.floor
    if floor is not None and abs(floor - (y_lo if budget.higher else y_hi)) <= 4 * pad:
        y_lo, y_hi = min(y_lo, floor), max(y_hi, floor)
        pad = max((y_hi - y_lo) * 0.15, pad * 0.5)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if metric in ("accuracy", "top5", "fidelity") and max(ys) <= 1.0:
        y_hi = min(y_hi, 1.0 + pad * 0.15)  # no room for accuracies above 100%
    return _Frame(x_hi, y_lo, y_hi)


def _budget_region(f: _Frame, b: _Budget, metric: str) -> tuple[list[str], str]:
    """The shaded region where the budgets hold (latency within the limit, metric no worse
    than the floor), and its label, drawn later over the grid."""
    if b.lat_limit is None and b.floor is None:
        return [], ""
    x1 = f.x(min(b.lat_limit, f.x_hi)) if b.lat_limit is not None else f.ml + f.pw
    if b.floor is None:
        y0, y1 = f.mt, f.mt + f.ph
    elif b.higher:
        y0, y1 = f.mt, f.y(max(b.floor, f.y_lo))
    else:
        y0, y1 = f.y(min(b.floor, f.y_hi)), f.mt + f.ph
    rect = (f'<rect x="{f.ml}" y="{y0:.1f}" width="{x1 - f.ml:.1f}" height="{y1 - y0:.1f}" '
            'fill="#2da44e" fill-opacity="0.10" stroke="#2da44e" stroke-opacity="0.5" '
            'stroke-dasharray="4 3"/>')
    label = []
    if b.lat_limit is not None:
        label.append(f"{b.q} ≤ {b.lat_limit:g} ms"
                     + (" (off the chart →)" if b.lat_limit > f.x_hi else ""))
    if b.floor is not None:
        off = b.floor < f.y_lo if b.higher else b.floor > f.y_hi
        label.append(f"{metric} {'≥' if b.higher else '≤'} {fmt_metric(metric, b.floor)}"
                     + (" (off the chart)" if off else ""))
    text = (f'<text x="{f.ml + 6}" y="{y1 - 7 if b.higher or b.floor is None else y0 + 15:.1f}" '
            'font-size="11" fill="#1a7f37" stroke="white" stroke-width="3" '
            f'paint-order="stroke">budget: {_e(", ".join(label))}</text>')
    return [rect], text


def _axes(f: _Frame, metric: str) -> list[str]:
    """Grid lines and tick labels on both axes, and the plot area's border."""
    svg = []
    xticks = _nice_ticks(0, f.x_hi)
    for v in xticks:
        x = f.x(v)
        if x > f.ml + f.pw + 0.5:
            continue
        svg.append(f'<line x1="{x:.1f}" y1="{f.mt}" x2="{x:.1f}" y2="{f.mt + f.ph}" '
                   'stroke="#eaeef2"/>')
        svg.append(f'<text x="{x:.1f}" y="{f.mt + f.ph + 16}" font-size="11" fill="#59636e" '
                   f'text-anchor="middle">{_tick_label(v, xticks)}</text>')
    for v in _nice_ticks(f.y_lo, f.y_hi, 5):
        y = f.y(v)
        if y < f.mt - 0.5 or y > f.mt + f.ph + 0.5:
            continue
        svg.append(f'<line x1="{f.ml}" y1="{y:.1f}" x2="{f.ml + f.pw}" y2="{y:.1f}" '
                   'stroke="#eaeef2"/>')
        svg.append(f'<text x="{f.ml - 6}" y="{y + 4:.1f}" font-size="11" fill="#59636e" '
                   f'text-anchor="end">{_e(fmt_metric(metric, v))}</text>')
    svg.append(f'<rect x="{f.ml}" y="{f.mt}" width="{f.pw}" height="{f.ph}" fill="none" '
               'stroke="#d1d9e0"/>')
    return svg


def _axis_titles(f: _Frame, q: str, metric: str) -> list[str]:
    return [f'<text x="{f.ml + f.pw / 2:.1f}" y="{f.h - 8}" font-size="12" fill="#1f2328" '
            f'text-anchor="middle">{_e(q)} latency at batch 1 (ms)</text>',
            f'<text transform="translate(14 {f.mt + f.ph / 2:.1f}) rotate(-90)" '
            f'font-size="12" fill="#1f2328" text-anchor="middle">{_e(metric)}</text>']


def _series(f: _Frame, pts: list[_Point], metric: str) -> list[str]:
    """The pipeline's path, stage to stage, and a point per stage (hollow: estimated)."""
    path = " ".join(f"{'M' if i == 0 else 'L'}{f.x(p.x):.1f},{f.y(p.y):.1f}"
                    for i, p in enumerate(pts))
    svg = [f'<path d="{path}" fill="none" stroke="#8c959f" stroke-width="1.2" '
           'stroke-dasharray="3 3"/>']
    for p in pts:
        fill = "white" if p.est else p.color
        svg.append(f'<circle cx="{f.x(p.x):.1f}" cy="{f.y(p.y):.1f}" r="6" fill="{fill}" '
                   f'stroke="{p.color}" stroke-width="2.5"><title>{_e(p.name)}: '
                   f'{fmt_ms(p.x)} ms, {_e(fmt_metric(metric, p.y))}'
                   f'{" (estimate)" if p.est else ""}</title></circle>')
    return svg


def _point_labels(f: _Frame, pts: list[_Point]) -> list[str]:
    """Each point's name, placed clear of the other labels and points."""
    centres = [(f.x(p.x), f.y(p.y)) for p in pts]
    area = (f.ml, f.mt, f.ml + f.pw, f.mt + f.ph)
    boxes: list[tuple[float, float, float, float]] = []
    svg = []
    for p, (cx, cy) in zip(pts, centres, strict=True):
        text = p.name + (" (est.)" if p.est else "")
        x0, y0, w, h = _place_label(cx, cy, len(text) * 6.6 + 2, 12, boxes, centres, area)
        boxes.append((x0, y0, w, h))
        svg.append(f'<text x="{x0:.1f}" y="{y0 + h - 2:.1f}" font-size="11" fill="{p.color}" '
                   'font-weight="600" stroke="white" stroke-width="3" paint-order="stroke">'
                   f'{_e(text)}</text>')
    return svg


def _legend(pts: list[_Point], metric: str) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{"white" if p.est else p.color};'
        f'border:2px solid {p.color}"></i>{_e(p.name)}: {fmt_ms(p.x)} ms'
        f'{" estimate" if p.est else ""}, {_e(fmt_metric(metric, p.y))}</span>'
        for p in pts) + "</div>"


def _place_label(cx: float, cy: float, w: float, h: float,
                 boxes: list[tuple[float, float, float, float]],
                 centres: list[tuple[float, float]],
                 area: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A spot for a point's label that overlaps no earlier label and no point: right, left,
    above, below, then further out."""

    def clear(x0: float, y0: float) -> bool:
        if x0 < area[0] + 2 or x0 + w > area[2] - 2 or y0 < area[1] + 1 or y0 + h > area[3] - 1:
            return False
        for bx, by, bw, bh in boxes:
            if x0 < bx + bw and bx < x0 + w and y0 < by + bh and by < y0 + h:
                return False
        return all(not (x0 - 7 < px < x0 + w + 7 and y0 - 7 < py < y0 + h + 7)
                   for px, py in centres)

    for dist in (10, 24, 40, 60):
        for x0, y0 in ((cx + dist, cy - h / 2), (cx - dist - w, cy - h / 2),
                       (cx - w / 2, cy - dist - h + 4), (cx - w / 2, cy + dist - 4),
                       (cx + dist * 0.6, cy - dist * 0.8 - h / 2),
                       (cx + dist * 0.6, cy + dist * 0.8 - h / 2),
                       (cx - dist * 0.6 - w, cy - dist * 0.8 - h / 2),
                       (cx - dist * 0.6 - w, cy + dist * 0.8 - h / 2)):
            if clear(x0, y0):
                return x0, y0, w, h
    return cx + 10, cy - h / 2, w, h


def _size_bars(m: Manifest) -> str:
    stages = m.stages
    limits = sorted({v.limit for t in m.targets for v in t.verdicts
                     if v.budget == "max_size_mb"})
    biggest = max([s.size_bytes / 1e6 for s in stages] + limits) or 1.0
    W, bar_h, gap, ml = 760, 22, 10, 110
    pw = W - ml - 150
    H = len(stages) * (bar_h + gap) + 28
    svg = [f'<svg viewBox="0 0 {W} {H}" width="100%" style="max-width:{W}px" role="img" '
           'aria-label="model size per stage" xmlns="http://www.w3.org/2000/svg">']
    base = stages[0].size_bytes or 1
    for i, s in enumerate(stages):
        y = 6 + i * (bar_h + gap)
        w = max(s.size_bytes / 1e6 / biggest * pw, 1.0)
        color = PALETTE[i % len(PALETTE)]
        svg.append(f'<text x="{ml - 8}" y="{y + bar_h * 0.7:.1f}" font-size="12" '
                   f'text-anchor="end" fill="#1f2328">{_e(s.name)}</text>')
        svg.append(f'<rect x="{ml}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" '
                   f'fill="{color}"/>')
        lx = ml + w + 6
        for lim in limits:  # keep the figure clear of a budget line
            line_x = ml + lim / biggest * pw
            if lx - 4 <= line_x <= lx + 110:
                lx = line_x + 6
        svg.append(f'<text x="{lx:.1f}" y="{y + bar_h * 0.7:.1f}" font-size="12" '
                   f'fill="#1f2328">{_e(fmt_bytes(s.size_bytes))} '
                   f'<tspan fill="#59636e">({s.size_bytes / base:.2f}×)</tspan></text>')
    for lim in limits:
        x = ml + lim / biggest * pw
        svg.append(f'<line x1="{x:.1f}" y1="2" x2="{x:.1f}" y2="{H - 20}" stroke="#cf222e" '
                   'stroke-dasharray="5 3" stroke-width="1.5"/>')
        svg.append(f'<text x="{x:.1f}" y="{H - 6}" font-size="11" fill="#cf222e" '
                   f'text-anchor="middle">max_size_mb {lim:g}</text>')
    svg.append("</svg>")
    return "".join(svg)


def _precision(m: Manifest) -> str:
    final = m.final
    prec = final.precision
    if not prec.recorded:
        return '<p class="muted">Not recorded for this artifact.</p>'
    if not prec.quantized:
        return ("<p>The final model is entirely float: no pass quantized it.</p>"
                + _op_list("float ops", prec.float_ops))
    out = []
    share = prec.int8_macs_share
    if share is not None:
        out.append(f"<p><b>{fmt_share(share)}</b> of the model's MACs run in int8.</p>")
    heavy = prec.float_heavy_nodes
    if heavy:
        rows = [[_e(n.node), _e(n.op), _e(fmt_count(n.macs) if n.macs is not None else "—"),
                 fmt_share(n.macs_share) if n.macs_share is not None else "—"]
                for n in heavy[:20]]
        out.append("<p>Compute-heavy nodes that stayed float:</p>")
        out.append(_table(["node", "op", "MACs", "share"], rows))
        if len(heavy) > 20:
            out.append(f'<p class="muted">… and {len(heavy) - 20} more.</p>')
    else:
        out.append("<p>Every compute-heavy node (Conv, MatMul, Gemm and recurrent "
                   "LSTM/GRU/RNN, subgraphs included) runs in int8.</p>")
    excluded = final.record.get("excluded_nodes")
    if excluded:
        out.append(f'<p class="muted">Kept float on purpose (quantize exclude_nodes): '
                   f"{_e(', '.join(excluded))}</p>")
    skipped = [r for st in m.stages for r in st.record.get("repairs_not_applied") or []
               if isinstance(r, dict)]
    if skipped:
        out.append("<p>Repairs that could not apply:</p><ul class=\"notes\">" + "".join(
            f"<li><b>{_e(r.get('repair'))}</b>: {_e(r.get('reason'))}</li>" for r in skipped)
            + "</ul>")
    out.append(_op_list("int8 ops", prec.int8_ops))
    out.append(_op_list("other float ops", prec.float_ops))
    return "".join(out)


def _attention(m: Manifest) -> str:
    """At the top, what the terminal said loudest: budgets that failed or could not be
    decided, and stage warnings; each links to the row it is about."""
    items = []
    for i, t in enumerate(m.targets):
        for r in verdict_rows([(t.profile, t.verdicts)]):
            if r.status in ("fail", "inconclusive"):
                items.append(
                    f'<li>{_pill(r.status)} <a href="#target-{i}">{_e(r.target)}</a> '
                    f"{_e(r.budget)}: {_e(r.measured_text)} (limit {_e(r.relation)} "
                    f"{_e(r.limit)})" + (f" — {_e(r.detail)}" if r.detail else "") + "</li>")
    for i, st in enumerate(m.stages):
        items += [f'<li class="warn"><b>warning</b> (<a href="#stage-{i}">{_e(st.name)}</a>): '
                  f"{_e(w)}</li>" for w in st.warnings]
    if not items:
        return ""
    cls = "attention" if not m.passed or any(st.warnings for st in m.stages) \
        else "attention inc"
    return f'<div class="{cls}"><b>What needs attention</b><ul>{"".join(items)}</ul></div>'


def _quantization(rec: dict[str, Any]) -> str:
    """What the int8 search chose and why, every candidate it timed, what shipped under
    keep_float, and the nodes it kept float with the reason for each."""
    search = rec["search"]
    kv = [("mode", f"<b>{_e(rec.get('mode'))}</b>: {_e(rec.get('mode_reason', ''))}")]
    isa, choice = rec.get("isa") or {}, rec.get("int8_choice") or {}
    if isa:
        kv.append(("CPU int8 path", f"{_e(isa.get('int8_path'))}; "
                   f"{_e(choice.get('reason', ''))}"))
    timing = (search.get("timings") or [{}])[0]
    kv.append(("chosen", f"<b>{_e(search.get('chosen'))}</b>" + (
        f", {search['speedup_vs_input']:.2f}× its float input (paired, timed interleaved on "
        f"{_e(timing.get('profile', '?'))})" if search.get("speedup_vs_input") else "")
        + f"; search took {search.get('seconds', 0):.1f} s"
        + (" (stopped at time_budget_s)" if search.get("timed_out") else "")))
    acc = rec.get("accuracy_budget") or {}
    if acc:
        kv.append(("accuracy budget", _accuracy_cell(acc)))
    kept = keep_float_text(rec)
    if kept:
        kv.append(("shipped", _e(kept)))
    if isinstance(rec.get("smoothquant"), dict):
        kv.append(("SmoothQuant", _e(rec["smoothquant"].get("description", ""))))
    out = ['<div class="kv">' + "".join(f"<div>{_e(k)}</div><div>{v}</div>" for k, v in kv)
           + "</div>"]
    out += _candidates(search)
    floats = rec.get("float_nodes") or []
    if floats:
        cost = search.get("repair_cost_ms")
        out.append(f"<p>Nodes kept in float ({len(floats)})"
                   + (f"; the repairs cost {cost:+.3f} ms p50, measured" if cost is not None
                      else "") + ":</p>")
        out.append(_table(["node", "op", "why", "speed cost (estimate)"], [
            [_e(f.get("node")), _e(f.get("op_type")), _e(f.get("reason")),
             f'<span class="est">{f["speed_cost_ms_estimate"]:.3f} ms</span>'
             if isinstance(f.get("speed_cost_ms_estimate"), int | float) else "—"]
            for f in floats], left={2}))
    return "".join(out)


def _accuracy_cell(acc: dict[str, Any]) -> str:
    held = (acc.get("held_out") or {}).get("drop")
    found = (acc.get("search") or {}).get("drop", 0.0)
    return (f"{_e(acc.get('metric'))} drop ≤ {acc.get('allowed', 0):.4g} "
            f"({_e(acc.get('source'))}); search part {found:.4g}"
            + (f", held-out part {held:.4g}" if held is not None else "")
            + (" — met" if acc.get("met") else ' — <b class="warn">not met</b>')
            + (f'<br><span class="muted">{_e(acc["note"])}</span>' if acc.get("note") else ""))


def _candidates(search: dict[str, Any]) -> list[str]:
    """Every int8 candidate the search timed or judged, with its note."""
    cands = [c for c in search.get("candidates", []) if isinstance(c, dict)]
    if not cands:
        return []
    rows = []
    for c in cands:
        drop = (c.get("search") or {}).get("drop")
        rows.append([
            _e(c.get("label")),
            f"{c['p50_ms']:.4g}" if isinstance(c.get("p50_ms"), int | float) else "—",
            f"{c['speedup_vs_float']:.2f}×"
            if isinstance(c.get("speedup_vs_float"), int | float) else "—",
            f"{drop:.4g}" if isinstance(drop, int | float) else "—",
            _e(c.get("note", ""))])
    return ["<p>Candidates (p50 at batch 1, timed interleaved with the float input):</p>",
            _table(["candidate", "p50 ms", "vs float", "drop (search part)", "note"], rows,
                   left={0, 4})]


def _op_list(title: str, ops: dict[str, int]) -> str:
    if not ops:
        return ""
    items = ", ".join(f"{_e(k)} ×{v}" for k, v in ops.items())
    return f'<p><span class="muted">{_e(title)}:</span> {items}</p>'


def _deployables(deployables: list[Deployable]) -> str:
    out = []
    for d in deployables:
        files = ", ".join(f"<code>{_e(n)}</code> ({_e(fmt_bytes(f.size_bytes))})"
                          for n, f in d.files.items())
        check = d.check
        out.append(
            f"<p><b>{_e(d.format)}</b> for {_e(', '.join(d.profiles))}: {files}. "
            f"Converted with <code>{_e(d.converter)}</code>; "
            + (f"loaded back and run: max |Δ| vs model.onnx = "
               f"{_or(check.max_abs_diff_vs_onnx, 0):.3g}.</p>" if check.loaded else
               "<b>not verified</b>.</p>"))
    return "".join(out)


def _host(host: HostRecord) -> str:
    if not host.recorded:
        return '<p class="muted">Not recorded.</p>'
    pkgs = ", ".join(f"{k} {v}" for k, v in host.packages.items())
    rows = [
        ("CPU", f"{_or(host.cpu, '?')} ({_or(host.machine, '?')}, "
                f"{_or(host.cores, '?')} cores)"),
        ("ISA", ", ".join(host.isa) or "—"),
        ("OS", _or(host.os, "?")),
        ("Python", _or(host.python, "?")),
        ("ONNX Runtime", f"{_or(host.onnxruntime, '?')}; providers: "
                         f"{', '.join(host.available_providers)}"),
        ("packages", pkgs or "—"),
    ]
    return '<div class="kv">' + "".join(f"<div>{_e(k)}</div><div>{_e(v)}</div>"
                                        for k, v in rows) + "</div>"
