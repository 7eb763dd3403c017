"""Where the library reports what it is doing. The library itself never prints: the CLI
passes a Progress that draws bars and notes; everything else gets this silent one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Task:
    def advance(self, n: int = 1) -> None:  # noqa: B027 - a no-op by design
        pass

    def status(self, text: str) -> None:  # noqa: B027 - a no-op by design
        """A short live line next to the bar (a training pass: loss, metric, speed, ETA)."""


class Progress:
    """Ignores everything; the CLI's subclass draws progress bars and prints notes."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield Task()

    def note(self, message: str) -> None:
        """Something the user should know (a fallback taken, a warning)."""
