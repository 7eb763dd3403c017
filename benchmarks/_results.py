"""Writing benchmark results: one section of RESULTS.md per benchmark, replaced in place,
and one JSON file per benchmark under results/.

Sections sit between ``<!-- benchmark:NAME:start -->`` and ``<!-- benchmark:NAME:end -->``
markers, so rerunning one benchmark leaves the others' sections as they are. Import it from
a script in this folder (``from _results import write_section, write_json``): a script's own
folder is on ``sys.path`` when it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from compactor.progress import Progress, Task

HERE = Path(__file__).resolve().parent
HEADER = ("# Benchmark results\n\nWritten by the scripts in this folder; each section is "
          "replaced in place when its benchmark is rerun (see README.md).\n")


def write_section(name: str, markdown: str, results_dir: Path = HERE) -> Path:
    """Replace (or append) the ``name`` section of ``results_dir/RESULTS.md``."""
    path = Path(results_dir) / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"<!-- benchmark:{name}:start -->", f"<!-- benchmark:{name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    i, j = text.find(start), text.find(end)
    if i != -1 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def write_json(name: str, data: Any, results_dir: Path = HERE) -> Path:
    """``results_dir/results/NAME.json``."""
    path = Path(results_dir) / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def machine() -> dict[str, Any]:
    """What the numbers were taken on, and how busy it was."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": load}


def cpu_idle(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs idle over the next ``seconds`` (Linux /proc/stat), or None."""
    import time

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                parts = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return parts[3] + (parts[4] if len(parts) > 4 else 0), sum(parts)

    a = read()
    time.sleep(seconds)
    b = read()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_for_idle(min_idle: float = 0.9, max_wait_s: float = 120.0) -> float | None:
    """Wait until the host is at least ``min_idle`` idle (or ``max_wait_s`` passes), so a
    timing is not another process's; returns the idle fraction last seen."""
    import time

    deadline = time.monotonic() + max_wait_s
    idle = cpu_idle()
    while idle is not None and idle < min_idle and time.monotonic() < deadline:
        idle = cpu_idle()
    return idle


class PrintProgress(Progress):
    """Prints each pipeline task to stderr as it finishes, and every note."""

    def __init__(self, indent: str = "  "):
        self.indent = indent

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None):
        t0 = time.perf_counter()
        yield Task()
        print(f"{self.indent}{description} ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        print(f"{self.indent}note: {message}", file=sys.stderr, flush=True)
