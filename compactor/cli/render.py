"""Rich rendering: progress while a run works, tables when it is done."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from compactor.pipeline import Progress as PipelineProgress
from compactor.pipeline import Task


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
        tid = self._progress.add_task(description, total=total)
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


def stage_table(manifest: dict[str, Any]) -> Table:
    from compactor.report.markdown import stage_rows

    header, rows = stage_rows(manifest, combined=True)
    table = Table(title=f"{manifest['name']}: stages (latency at batch 1, ONNX Runtime)",
                  title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    return table


def verdict_table(manifest: dict[str, Any]) -> Table | None:
    from compactor.report.markdown import verdict_rows

    rows = verdict_rows(manifest)
    if not rows:
        return None
    table = Table(title="budgets (final stage)", title_justify="left")
    for h in ("target", "budget", "limit", "measured", "verdict"):
        table.add_column(h)
    style = {"✅": "green", "❌": "bold red", "⚪": "yellow"}
    for r in rows:
        table.add_row(*r[:-1], f"[{style[r[-1][0]]}]{r[-1][2:]}[/]")
    return table
