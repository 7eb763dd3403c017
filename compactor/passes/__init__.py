"""Passes: one module per pass, registered by name.

A pass is a small class with a ``name``, a frozen ``Config`` (validated from the recipe), the
kind of stage it takes and gives (``"torch"`` or ``"onnx"``), and one ``run(stage, ctx)`` that
returns a new stage. Importing this package must stay light: heavy libraries are imported
inside ``run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from compactor.spec import PassConfig

if TYPE_CHECKING:
    from compactor.budgets import SizeFloor
    from compactor.pipeline import RunContext
    from compactor.stage import Stage

StageKind = Literal["torch", "onnx"]


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    input_kind: ClassVar[StageKind]
    output_kind: ClassVar[StageKind]
    summary: ClassVar[str] = ""

    def __init__(self, config: PassConfig):
        self.config = config

    def run(self, stage: Stage, ctx: RunContext) -> Stage:  # pragma: no cover - interface
        raise NotImplementedError

    def size_floor(self, floor: SizeFloor) -> SizeFloor | None:
        """The least room this pass could leave a model's weights in, judged before any pass
        runs (budgets.judge_before_passes); None when it cannot say cheaply."""
        return None


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry; a duplicate name is a bug."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a pass named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    return _REGISTRY[name]


# Registration happens on import; these modules import nothing heavy at module level.
# Not sorted (I001): registration order is the order error hints list the passes in.
from compactor.passes import export as _export  # noqa: E402,F401,I001
from compactor.passes import quantize as _quantize  # noqa: E402,F401
from compactor.passes import distill as _distill  # noqa: E402,F401
from compactor.passes import prune as _prune  # noqa: E402,F401
