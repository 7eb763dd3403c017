"""The plan's chart: predicted end-to-end latency against uplink bandwidth for all on
device, full offload and the best split at each bandwidth, with the bandwidths where the
best choice changes. One self-contained SVG (no scripts, no external fonts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from compactor.partition.cost import Cost, Link, best
from compactor.partition.units import fmt_bandwidth

W, H = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 48, 56
COLORS = {"on-device": "#2b6cb0", "offload": "#c05621", "split": "#2f855a"}


def bandwidth_grid(lo: float, hi: float, n: int = 121) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def curves(costs: Sequence[Cost], grid: Sequence[float]) -> dict[str, list[float | None]]:
    """Latency (ms) of on-device, full offload and the best split at each bandwidth."""
    out: dict[str, list[float | None]] = {"on-device": [], "offload": [], "split": []}
    splits = [c for c in costs if c.kind == "split"]
    by_kind = {c.kind: c for c in costs if c.kind != "split"}
    for bps in grid:
        for kind in ("on-device", "offload"):
            c = by_kind.get(kind)
            out[kind].append(c.at(Link(bps, c.rtt_ms)).total_ms if c else None)
        if splits:
            b = best([c.at(Link(bps, c.rtt_ms)) for c in splits], "latency")
            out["split"].append(b.total_ms)
        else:
            out["split"].append(None)
    return out


@dataclass(frozen=True)
class _Axes:
    """Log-log plot area: bandwidth (bps) across, latency (ms) up."""

    lo: float
    hi: float
    ymin: float
    ymax: float

    @property
    def pw(self) -> float:
        return W - LEFT - RIGHT

    @property
    def ph(self) -> float:
        return H - TOP - BOTTOM

    def x(self, bps: float) -> float:
        return LEFT + self.pw * math.log10(bps / self.lo) / math.log10(self.hi / self.lo)

    def y(self, ms: float) -> float:
        ms = min(max(ms, self.ymin), self.ymax)
        return TOP + self.ph * (1 - math.log10(ms / self.ymin) / math.log10(self.ymax / self.ymin))


def render_svg(costs: Sequence[Cost], crossings: Sequence[dict], plan_bps: float,
               title: str, lo: float = 1e5, hi: float = 1e9, subtitle: str = "") -> str:
    grid = bandwidth_grid(lo, hi)
    series = curves(costs, grid)
    values = [v for s in series.values() for v in s if v is not None and v > 0]
    ymin = 10 ** math.floor(math.log10(min(values))) if values else 1.0
    ymax = 10 ** math.ceil(math.log10(max(values))) if values else 10.0
    if ymax <= ymin:
        ymax = ymin * 10
    ax = _Axes(lo, hi, ymin, ymax)
    pw, ph = ax.pw, ax.ph
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT}" y="37" fill="#555">{escape(subtitle)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
        *_gridlines(ax),
    ]
    ly = _draw_series(parts, ax, grid, series)
    if lo <= plan_bps <= hi:
        px = ax.x(plan_bps)
        parts.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{TOP + ph}" '
                     'stroke="#444" stroke-dasharray="2 3"/>')
        parts.append(f'<text x="{px + 3:.1f}" y="{TOP + 12}" fill="#444">plan: '
                     f'{escape(fmt_bandwidth(plan_bps))}</text>')
    _draw_crossings(parts, ax, crossings, ly + 10)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _gridlines(ax: _Axes) -> list[str]:
    """Decade lines and labels on both axes, and the axis titles."""
    parts = []
    pw, ph, x, y = ax.pw, ax.ph, ax.x, ax.y
    e = math.floor(math.log10(ax.lo))
    while 10**e <= ax.hi:
        bps = 10**e
        if bps >= ax.lo:
            parts.append(f'<line x1="{x(bps):.1f}" y1="{TOP}" x2="{x(bps):.1f}" '
                         f'y2="{TOP + ph}" stroke="#eee"/>')
            parts.append(f'<text x="{x(bps):.1f}" y="{TOP + ph + 16}" text-anchor="middle">'
                         f'{escape(fmt_bandwidth(bps))}</text>')
        e += 1
    e = round(math.log10(ax.ymin))
    while 10**e <= ax.ymax * 1.0001:
        ms = 10**e
        parts.append(f'<line x1="{LEFT}" y1="{y(ms):.1f}" x2="{LEFT + pw}" y2="{y(ms):.1f}" '
                     f'stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(ms) + 4:.1f}" text-anchor="end">'
                     f'{_fmt_ms(ms)}</text>')
        e += 1
    parts.append(f'<text x="{LEFT + pw / 2}" y="{H - 12}" text-anchor="middle">'
                 'uplink bandwidth (log scale)</text>')
    parts.append(f'<text x="16" y="{TOP + ph / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {TOP + ph / 2})">end-to-end latency, ms (log)</text>')
    return parts


def _draw_series(parts: list[str], ax: _Axes, grid: Sequence[float],
                 series: dict[str, list[float | None]]) -> float:
    """One curve per option kind, with its legend entry; returns the legend's next y."""
    labels = {"on-device": "all on device", "offload": "full offload", "split": "best split"}
    right = LEFT + ax.pw
    ly = TOP + 10
    for kind, vals in series.items():
        pts = [(ax.x(b), ax.y(v)) for b, v in zip(grid, vals, strict=True) if v is not None]
        if not pts:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in
                     enumerate(pts))
        dash = ' stroke-dasharray="6 3"' if kind == "split" else ""
        parts.append(f'<path d="{d}" fill="none" stroke="{COLORS[kind]}" '
                     f'stroke-width="2.2"{dash}/>')
        parts.append(f'<line x1="{right + 12}" y1="{ly}" x2="{right + 36}" y2="{ly}" '
                     f'stroke="{COLORS[kind]}" stroke-width="2.2"{dash}/>')
        parts.append(f'<text x="{right + 42}" y="{ly + 4}">{labels[kind]}</text>')
        ly += 18
    return ly


def _draw_crossings(parts: list[str], ax: _Axes, crossings: Sequence[dict], ly: float) -> None:
    """Where the best choice changes: a marked line on the plot and a numbered legend."""
    right, ph = LEFT + ax.pw, ax.ph
    parts.append(f'<text x="{right + 12}" y="{ly}" font-weight="bold">best choice</text>')
    ly += 16
    for i, c in enumerate(crossings, 1):
        bps = c["uplink_bps"]
        if ax.lo <= bps <= ax.hi:
            px = ax.x(bps)
            parts.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{TOP + ph}" '
                         'stroke="#b83280" stroke-width="1.2" stroke-dasharray="4 3"/>')
            parts.append(f'<text x="{px:.1f}" y="{TOP + ph - 4}" text-anchor="middle" '
                         f'font-size="10" fill="#b83280">{i}</text>')
        parts.append(f'<text x="{right + 12}" y="{ly}" fill="#b83280">{i}. at '
                     f'{escape(fmt_bandwidth(bps))}:</text>')
        parts.append(f'<text x="{right + 12}" y="{ly + 14}" fill="#b83280">'
                     f'{escape(c["from"])} → {escape(c["to"])}</text>')
        ly += 34
    if not crossings:
        parts.append(f'<text x="{right + 12}" y="{ly}" fill="#555">no change in '
                     'this range</text>')


def _fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


CHAIN_COLORS = {"compute": "#2b6cb0", "forward": "#c05621", "rtt": "#a0aec0",
                "reply": "#2f855a"}


def render_chain_svg(plan, names: Sequence[str], title: str, subtitle: str = "") -> str:
    """One request through a chain plan as a timeline: each used device's compute, and each
    link's forward transfer, round trip and reply, one row per device."""
    rows = []  # (device name, [(start_ms, length_ms, kind)])
    t = 0.0
    back = []
    for s in plan.stages:
        bars = [(t, s.busy_ms, "compute")]  # its part, and encoding what it sends
        t += s.busy_ms
        if s.forward_ms or s.rtt_ms:
            bars.append((t, s.forward_ms, "forward"))
            t += s.forward_ms
            bars.append((t, s.rtt_ms / 2, "rtt"))
            t += s.rtt_ms / 2
            back.append(s)
        rows.append((names[s.device], bars))
    for s in reversed(back):  # the reply comes back link by link
        rows[plan.stages.index(s)][1].extend([(t, s.rtt_ms / 2, "rtt"),
                                             (t + s.rtt_ms / 2, s.back_ms, "reply")])
        t += s.rtt_ms / 2 + s.back_ms
    total = max(t, 1e-9)
    rh, left, width = 34, 150, W - 150 - 40
    height = TOP + rh * len(rows) + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
           f'viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
           f'<text x="{left}" y="38" fill="#4a5568">{escape(subtitle)}</text>']
    for i, (name, bars) in enumerate(rows):
        y = TOP + i * rh
        out.append(f'<text x="{left - 8}" y="{y + rh / 2 + 4}" text-anchor="end">'
                   f'{escape(name)}</text>')
        for start, length, kind in bars:
            x = left + width * start / total
            w = max(width * length / total, 0.5)
            out.append(f'<rect x="{x:.1f}" y="{y + 6}" width="{w:.1f}" height="{rh - 12}" '
                       f'fill="{CHAIN_COLORS[kind]}"><title>{kind} {length:.2f} ms</title>'
                       '</rect>')
    ybase = TOP + rh * len(rows) + 16
    out.append(f'<text x="{left}" y="{ybase}">0 ms</text>')
    out.append(f'<text x="{left + width}" y="{ybase}" text-anchor="end">{total:.1f} ms '
               f'(bottleneck {plan.bottleneck_ms:.2f} ms)</text>')
    for j, (kind, color) in enumerate(CHAIN_COLORS.items()):
        x = left + j * 130
        out.append(f'<rect x="{x}" y="{ybase + 14}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{x + 18}" y="{ybase + 24}">{kind}</text>')
    out.append("</svg>")
    return "\n".join(out)
