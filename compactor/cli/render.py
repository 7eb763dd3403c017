"""Rich rendering: progress while a run works, tables when it is done."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from compactor.progress import Progress as PipelineProgress
from compactor.progress import Task
from compactor.report.format import VerdictRow, verdict_row, verdict_rows

if TYPE_CHECKING:
    from compactor.manifest import Manifest, VerdictRecord


def safe(text: Any) -> str:
    """Text from an artifact, a model or a manifest, ready for rich: control characters and
    CI command prefixes made visible (``manifest.visible``) and markup escaped, so
    ``[green]ok[/]`` prints as written and an ANSI escape never reaches the terminal."""
    from compactor.manifest import visible

    return escape(visible(text))


def console(stderr: bool = False) -> Console:
    """A console that does not cut tables to 80 columns in CI logs (no terminal)."""
    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=max(c.width, 140))
    return c


class _RichTask(Task):
    def __init__(self, progress: Progress, task_id: Any):
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._id, n)

    def status(self, text: str) -> None:
        self._p.update(self._id, status=text)


class RichProgress(PipelineProgress):
    """A spinner/bar per running task, and a line per finished one, on stderr."""

    def __init__(self, console: Console):
        self.console = console
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.completed}/{task.total}", style="dim"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}", style="cyan"),
            console=console,
            transient=True,
        )

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        tid = self._progress.add_task(description, total=total, status="")
        t0 = time.perf_counter()
        try:
            yield _RichTask(self._progress, tid)
        except BaseException:
            self._progress.remove_task(tid)
            self.console.print(f"[red]✗[/] {description}")
            raise
        self._progress.remove_task(tid)
        self.console.print(f"[green]✓[/] {description} [dim]{time.perf_counter() - t0:.1f}s[/]")

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]![/] {message}")


def stage_table(manifest: Manifest) -> Table:
    from compactor.report.markdown import stage_rows

    header, rows = stage_rows(manifest, combined=True)
    shape = manifest.final.latency_shape
    at = f"batch 1, {shape.describe()}" if shape is not None and shape.dims else "batch 1"
    table = Table(title=f"{safe(manifest.name)}: stages (latency at {safe(at)}, ONNX Runtime)",
                  title_justify="left")
    for i, h in enumerate(header):
        table.add_column(safe(h), justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*map(safe, r))
    return table


def verdict_table(manifest: Manifest) -> Table | None:
    from compactor.report.markdown import budget_rows

    rows = budget_rows(manifest)
    if not rows:
        return None
    table = Table(title="budgets (final stage)", title_justify="left")
    for h in ("target", "budget", "limit", "measured", "verdict"):
        table.add_column(h)
    for r in rows:
        table.add_row(*map(safe, (r.target, r.budget, r.limit, r.measured_text)),
                      _STYLE[r.status])
    return table


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def bench_report(out: Console, r: dict[str, Any]) -> None:
    """What `compactor bench` prints for one profile."""
    from compactor.report.format import fmt_bytes, fmt_count

    m = r["model"]
    out.print(f"[bold]{safe(m['file'])}[/] on [bold]{safe(r['profile'])}[/]: "
              f"{fmt_bytes(m['size_bytes'])}, "
              + (f"{fmt_count(m['macs'])} MACs, " if m["macs"] is not None else "")
              + {True: "int8", False: "float", None: "precision not read (.ort)"}[m["quantized"]]
              + (f"; dims {safe(m['dims'])}" if m["dims"] else ""), highlight=False)
    if r["measured"]:
        _bench_measured(out, r)
    else:
        out.print("[yellow]not measured[/] on this host", highlight=False)
    est = r.get("estimates") or {}
    if est.get("latency") and not r["measured"]:
        e = est["latency"]
        out.print(f"[yellow]estimate[/]: latency ≥ {e['latency_ms']:.3g} ms at batch 1 "
                  f"({safe(e['kind'])}; {safe(e['basis'])})", highlight=False)
    if est.get("energy"):
        e = est["energy"]
        out.print(f"[yellow]estimate[/]: energy {e['energy_mj']:.3g} mJ per inference "
                  f"({safe(e['basis'])})", highlight=False)
    for v in r.get("verdicts") or []:
        out.print(_verdict_text(verdict_row(r["profile"], _verdict(v))), highlight=False)
    for n in r["notes"]:
        out.print(f"[yellow]note[/] {safe(n)}", highlight=False)
    out.print()


def _bench_measured(out: Console, r: dict[str, Any]) -> None:
    """bench's latency table, cold start, memory and batching hint."""
    t = Table(title_justify="left", title="latency (ms) and throughput")
    for h in ("batch", "p50", "p90", "p99", "mean", "std", "runs", "median ±", "samples/s"):
        t.add_column(h, justify="right")
    for b, lat in r["latency_ms"].items():
        ci = lat.get("ci")
        ci_s = "—" if ci is None else f"{ci * 100:.1f}%" + (
            "" if lat.get("stable", True) else " [yellow](cap)[/]")
        t.add_row(b, _fmt_ms(lat["p50"]), _fmt_ms(lat["p90"]), _fmt_ms(lat["p99"]),
                  _fmt_ms(lat["mean"]), _fmt_ms(lat["std"]), str(lat["runs"]), ci_s,
                  f"{lat['throughput']:,.0f}")
    out.print(t)
    quiet = (r["latency_ms"].get("1") or {})
    if quiet.get("quiet"):
        est, lo, hi = quiet["quiet"]["p50"]
        out.print(f"p50 at batch 1 as budgets judge it (faster half of the quiet blocks): "
                  f"{_fmt_ms(est)} ms (95% interval {_fmt_ms(lo)}–{_fmt_ms(hi)}), "
                  f"{quiet.get('quiet_blocks')} of {quiet.get('blocks')} blocks quiet"
                  + (" [yellow](busy host)[/]" if quiet.get("busy") else ""), highlight=False)
    rt = r["runtime"]
    out.print(f"cold start: session {rt.get('session_create_ms', 0):.1f} ms, first run "
              f"{(rt.get('first_run_ms') or 0):.2f} ms; providers "
              f"{', '.join(rt.get('providers') or [])}", highlight=False)
    mem = r.get("memory")
    if mem:
        within = "" if mem["within_limit"] is None else (
            f" of the profile's {mem['limit_mb']:g} MB limit: "
            + ("[green]within[/]" if mem["within_limit"] else "[bold red]over[/]"))
        out.print(f"peak memory: {mem['peak_rss_mb']:.0f} MB RSS{within}", highlight=False)
    hint = r.get("batching")
    if hint:
        if hint.get("batch_size"):
            out.print(f"batching hint: batch {hint['batch_size']} "
                      f"({hint['throughput']:,.0f} samples/s; {safe(hint['within'])})",
                      highlight=False)
        else:
            out.print(f"batching hint: {safe(hint['reason'])}", highlight=False)


_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]",
          "not measured": "[yellow]not measured[/]",
          "inconclusive": "[bold yellow]inconclusive[/]"}


def _verdict(v: dict[str, Any]) -> VerdictRecord:
    """A verdict as bench and check report it (``Verdict.to_dict``), typed again."""
    from compactor.manifest import VerdictRecord

    return VerdictRecord.model_validate(v)


def _verdict_text(r: VerdictRow) -> str:
    group, budget = safe(r.target), safe(r.budget)
    if r.integrity:
        return f"{_STYLE[r.status]} {group} {budget}: {safe(r.detail)}"
    return (f"{_STYLE[r.status]} {group} {budget}: {safe(r.measured_text)} (limit "
            f"{r.relation} {safe(r.limit)})" + (f" [dim]{safe(r.detail)}[/]" if r.detail else ""))


def check_report(out: Console, result: dict[str, Any]) -> None:
    """What `compactor check` prints: a verdict table, then notes. Every string that came
    from the artifact goes through :func:`safe`."""
    sources = sorted({t["source"] for t in result["targets"]})
    table = Table(title=f"{safe(result['name'])}: check (figures from the "
                  f"{' and '.join(sources) or 'manifest'})", title_justify="left")
    for h in ("group", "check", "limit", "measured", "verdict", "detail"):
        table.add_column(h, overflow="fold")
    groups = [("integrity", result["integrity"]), ("model", result.get("model", [])),
              *((t["profile"], t["verdicts"]) for t in result["targets"]),
              ("regression", result["regressions"])]
    for r in verdict_rows((g, map(_verdict, vs)) for g, vs in groups):
        table.add_row(safe(r.target), safe(r.budget), *_check_cells(r), _STYLE[r.status],
                      safe(r.detail))
    out.print(table)
    for t in result["targets"]:
        for n in t["notes"]:
            out.print(f"[yellow]note[/] {safe(t['profile'])}: {safe(n)}", highlight=False)
    for n in result["notes"]:
        out.print(f"[yellow]note[/] {safe(n)}", highlight=False)


def _check_cells(r: VerdictRow) -> tuple[str, str]:
    """The limit and measured cells of a check row."""
    if r.integrity:
        return "sha256", ("matches" if r.status == "pass" else "differs")
    if r.measured is not None:
        got = safe(r.measured)
    elif r.estimate is not None:
        got = f"[yellow]estimate {safe(r.estimate)}[/]"
    else:
        got = "—"
    return f"{r.relation} {safe(r.limit)}", got
