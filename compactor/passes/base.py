"""The pass contract: ``Pass``, its registry, and the frozen context a pass runs in.

A pass is a small class with a ``name``, a frozen ``Config`` (validated from the recipe), the
kind of stage it takes and gives, and one ``run(stage, ctx)`` that returns a new stage. What
a pass may know of the run comes only through :class:`RunContext`: never the recipe, the
runner or another pass. Rules that tie a pass's config to the rest of the recipe are the
pass's own (``check_recipe``), so ``recipe`` never names a pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from compactor.progress import Progress
from compactor.spec import PassConfig

if TYPE_CHECKING:
    import numpy as np

    from compactor.budgets import SizeFloor
    from compactor.data import Batch, DataSource, Outputs, RunData
    from compactor.metrics import Metric
    from compactor.profiles import Profile
    from compactor.spec import DataSpec, InputSpec, ModelSpec, Target
    from compactor.stage import Stage

StageKind = Literal["torch", "onnx"]


@dataclass(frozen=True)
class Reference:
    """What a pass judging its own accuracy compares against: the baseline's eval outputs
    and metric value (None before the baseline is evaluated, or outside a pipeline)."""

    outputs: Outputs | None = None  # every output by name, one array per eval batch
    value: float | None = None


@dataclass(frozen=True)
class Step:
    """The pass being run: its place in the recipe, the key of what produces it, its
    checkpoint folder, whether it resumes from a checkpoint, and the eval outputs of the
    stage it is given (so a pass can compare with its input without running it again)."""

    index: int = 0
    key: str = ""
    checkpoint_dir: Path | None = None
    resume: bool = False
    input_outputs: Outputs | None = None


@dataclass(frozen=True)
class RunContext:
    """Everything a pass may use, built once per run; :meth:`for_step` gives each pass its
    own copy with its :class:`Step`."""

    inputs: tuple[InputSpec, ...]
    data: RunData
    work_dir: Path
    base_dir: Path
    metric: Metric
    progress: Progress = field(default_factory=Progress)
    output_names: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    profiles: tuple[Profile, ...] = ()  # the targets' profiles; the first is the one to be fast on
    seed: int = 0
    measure_dims: Mapping[str, int] = field(default_factory=dict)  # the recipe's measure.dims
    baseline: Stage | None = None  # the stage before any pass (distill's default teacher)
    reference: Reference = field(default_factory=Reference)
    writes: bool = True  # False on torchrun ranks other than 0
    step: Step = field(default_factory=Step)

    def replace(self, **changes: Any) -> RunContext:
        return dataclasses.replace(self, **changes)

    def for_step(self, step: Step) -> RunContext:
        return dataclasses.replace(self, step=step)

    def work_path(self, name: str) -> Path:
        return self.work_dir / name

    def checkpoint_dir(self) -> Path:
        """The current pass's checkpoint folder (in the run folder, kept for --resume)."""
        return self.step.checkpoint_dir or (
            self.work_dir / f"checkpoints-{self.step.index + 1:02d}")

    @property
    def pass_key(self) -> str:
        return self.step.key

    @property
    def resume(self) -> bool:
        return self.step.resume

    def source(self, split: str) -> DataSource:
        return self.data.source(split)

    @property
    def eval_batches(self) -> list[Batch]:
        return self.data.eval_batches

    def calibration_batches(self, max_samples: int) -> list[Batch]:
        return self.data.calibration_batches(max_samples)

    def latency_feeds(self, batch_size: int) -> dict[str, np.ndarray]:
        """Real eval samples at ``batch_size`` and the run's latency shape (the recipe's
        measure.dims, else the median eval shape): what a pass times candidates on."""
        from compactor.data import feeds_for_batch, latency_shape

        dims = latency_shape(self.inputs, self.eval_batches, self.measure_dims).dims
        return feeds_for_batch(self.inputs, self.eval_batches, batch_size, dims)


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    input_kind: ClassVar[StageKind]
    output_kind: ClassVar[StageKind]
    summary: ClassVar[str] = ""
    # Trains data-parallel under torchrun (ranks other than 0 stop once it is done).
    distributed: ClassVar[bool] = False
    # Its output must be faster than its input (int8): the run warns loudly when it is not.
    must_be_faster: ClassVar[bool] = False

    def __init__(self, config: PassConfig):
        self.config = config

    def run(self, stage: Stage, ctx: RunContext) -> Stage:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def check_recipe(cls, config: PassConfig, index: int, model: ModelSpec,
                     data: DataSpec) -> None:
        """Rules tying this pass's config to the rest of the recipe, checked at load; raise
        ValueError with a message starting ``passes[index]`` (the recipe adds the file's
        line). The default has none."""

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
