"""One error tree for everything a user can cause.

Each error carries a one-line message, a hint saying what to do about it, and the exit code
the CLI returns (see DESIGN.md). The CLI is the only place that catches and renders them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_BUDGET = 1
EXIT_USAGE = 2
EXIT_LOAD = 3
EXIT_PASS = 4
# A gate could not decide (a latency interval still straddles its limit, or the host was
# too busy to trust a fail) under --inconclusive fail: distinct from 1 so CI can retry it.
EXIT_INCONCLUSIVE = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by a service manager or CI runner


class CompactorError(Exception):
    """Base of every error a user can cause; carries message, hint and exit code."""

    exit_code = EXIT_PASS

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class RecipeError(CompactorError):
    """The recipe (or a command line option) is malformed or inconsistent."""

    exit_code = EXIT_USAGE


class UsageError(CompactorError):
    exit_code = EXIT_USAGE


class ModelLoadError(CompactorError):
    """The model could not be loaded or does not run on its declared inputs."""

    exit_code = EXIT_LOAD


class DataError(CompactorError):
    """Data could not be loaded, or does not fit the model."""

    exit_code = EXIT_LOAD


class PassError(CompactorError):
    """A pass or a measurement failed on a model that did load."""

    exit_code = EXIT_PASS


class ArtifactError(CompactorError):
    """An artifact could not be written, or is not a valid artifact."""

    exit_code = EXIT_PASS


class ArtifactDamaged(ArtifactError):
    """An artifact being checked is damaged or hostile: its manifest does not match its
    schema, or names a path outside the artifact. A check that fails, so exit 1."""

    exit_code = EXIT_BUDGET


class BudgetFailed(CompactorError):
    """At least one budget does not hold. Raised by callers that want a non-zero exit."""

    exit_code = EXIT_BUDGET


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean X?' phrase for the closest choice, or None."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
