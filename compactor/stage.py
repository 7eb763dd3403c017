"""The unit passed between passes: a model in its current form plus its lineage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from compactor.verdict import Verdict


@dataclass(frozen=True)
class Stage:
    """A model after some passes. Passes never mutate a stage; they return a new one.

    ``module`` holds the torch module of a torch stage, ``onnx_path`` the file of an ONNX
    stage. ``record`` is what the pass that made it wants the manifest to say (exporter
    used, numeric error, quantization settings...). What the run must act on is typed:
    ``warnings`` the user must hear, a ``verdict`` the pass judged on its own stage (a
    budget it was given), and ``seconds``, how long the pass took (the pipeline's clock).
    """

    name: str
    kind: Literal["torch", "onnx"]
    module: Any = None
    onnx_path: Path | None = None
    lineage: tuple[str, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    verdict: Verdict | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "torch" and self.module is None:
            raise ValueError("a torch stage needs a module")
        if self.kind == "onnx" and self.onnx_path is None:
            raise ValueError("an ONNX stage needs onnx_path")

    def derive(self, name: str, **changes: Any) -> Stage:
        """A new stage made from this one by the pass ``name``."""
        for name_, default in (("record", {}), ("warnings", ()), ("verdict", None),
                               ("seconds", None)):
            changes.setdefault(name_, default)
        if changes.get("kind") == "onnx":
            changes.setdefault("module", None)
        return dataclasses.replace(self, name=name, lineage=(*self.lineage, name), **changes)
