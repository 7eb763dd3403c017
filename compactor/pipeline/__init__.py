"""The pipeline: runs a recipe end to end (``run``), evaluating every stage one way
(``evaluate``), judging budgets (``judge``), in a resumable work folder (``resume``)."""

from __future__ import annotations

from compactor.pipeline.context import build_context
from compactor.pipeline.resume import RunInterrupted
from compactor.pipeline.run import RunResult, optimize

__all__ = ["RunInterrupted", "RunResult", "build_context", "optimize"]
