"""The value types a recipe is made of: model and data specs, inputs, budgets, targets.

They live below every other module (only ``errors`` beneath them), so the data, model,
budget and measurement code can take typed specs without importing ``recipe``, which sits
above the passes because it composes their configs.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from compactor.errors import did_you_mean

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PassConfig(Strict):
    """Base of every pass's config: strict and frozen."""


class Drop(Strict):
    """An allowed metric drop: absolute in metric units (0.01) or relative ("2%")."""

    value: float = Field(ge=0)
    relative: bool = False

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ValueError("expected a number (absolute) or a percentage string like '2%'")
        if isinstance(raw, (int, float)):
            return {"value": float(raw), "relative": False}
        if isinstance(raw, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", raw)
            if not m:
                raise ValueError(
                    f"{raw!r} is not a drop: use a number (absolute, e.g. 0.01) or 'N%'"
                )
            return {"value": float(m.group(1)) / 100.0, "relative": True}
        return raw

    @model_serializer
    def _dump(self) -> float | str:
        return f"{self.value * 100:g}%" if self.relative else self.value

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # Editors check what a recipe writes (0.01 or "2%"), not the parsed object.
        return {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*%\s*$"},
            ],
            "description": cls.__doc__,
        }

    def allowed(self, baseline: float) -> float:
        """The largest allowed drop in metric units, given the baseline's value."""
        return self.value * abs(baseline) if self.relative else self.value


class InputSpec(Strict):
    """One model input. ``shape`` names dynamic axes (``[batch, seq]``); ``[]`` is a scalar.
    ``batch_axis`` is the axis samples are stacked on (``1`` for a recurrent state
    ``[2, batch, 128]``; ``null`` for an input without one, passed as-is to every run);
    left out, it is 0, or null for a scalar."""

    name: str = Field(min_length=1)
    shape: tuple[int | str, ...] = Field(min_length=0)
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    batch_axis: int | None = Field(
        # A scalar has no batch axis: the default follows the (already validated) shape.
        # Not a mode="before" validator: that would make strict JSON reading of a manifest
        # validate the parsed lists in Python mode, where a list is not a tuple.
        default_factory=lambda data: 0 if data.get("shape", (0,)) else None, ge=0,
        description="the axis samples are stacked on; null: the input has none (a scalar, "
        "a shared table); default 0, or null for shape []",
    )

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int | str, ...]) -> tuple[int | str, ...]:
        for d in shape:
            if isinstance(d, int) and d <= 0:
                raise ValueError(f"dimension {d} must be positive, or a name for a dynamic axis")
            if isinstance(d, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", d):
                raise ValueError(f"dynamic axis name {d!r} must be an identifier")
        return shape

    @model_validator(mode="after")
    def _axis_in_shape(self) -> InputSpec:
        if self.batch_axis is not None and self.batch_axis >= len(self.shape):
            raise ValueError(
                f"input {self.name!r}: batch_axis {self.batch_axis} is beyond its shape "
                f"{list(self.shape)} (rank {len(self.shape)}); "
                + ("a scalar has no batch axis: use batch_axis: null" if not self.shape
                   else f"use an axis from 0 to {len(self.shape) - 1}, or null for none")
            )
        return self

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def batch_dim(self) -> int | str | None:
        """The batch axis's entry in ``shape`` (a name, or a fixed batch size)."""
        return None if self.batch_axis is None else self.shape[self.batch_axis]

    @property
    def symbolic_axes(self) -> dict[int, str]:
        """Dynamic axes other than the batch axis (a sequence length, an image side): the
        ones a latency shape sets (``measure.dims``)."""
        return {i: d for i, d in self.dynamic_axes.items() if i != self.batch_axis}


class MeasureSpec(Strict):
    """How stages are measured: the size of each symbolic (non-batch) axis that latency is
    measured at. An axis left out takes the median of its sizes over the eval batches."""

    dims: dict[str, int] = Field(
        default_factory=dict,
        description="symbolic axis name → size latency is measured at (e.g. {seq: 128}); "
        "default: the median over the eval batches",
    )

    @field_validator("dims")
    @classmethod
    def _positive(cls, dims: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in dims.items() if v <= 0}
        if bad:
            raise ValueError(f"axis sizes must be positive, got {bad}")
        return dims


def check_measure_dims(dims: dict[str, int] | Any, inputs: tuple[InputSpec, ...] | Any,
                       where: str = "measure.dims") -> str | None:
    """Why ``dims`` does not fit ``inputs`` (an axis the inputs do not have, or their batch
    axis), with a did-you-mean; None when it fits."""
    symbolic = sorted({n for s in inputs for n in s.symbolic_axes.values()})
    batch = sorted({d for s in inputs if isinstance(d := s.batch_dim, str)})
    for name in dims:
        if name in symbolic:
            continue
        if name in batch:
            return (f"{where}: {name!r} is the batch axis; its sizes come from the target "
                    "profile's batch_sizes")
        hint = did_you_mean(name, symbolic)
        have = (f"the model's symbolic axes are {', '.join(symbolic)}" if symbolic
                else "the model has no symbolic axis besides the batch")
        return f"{where}: the model has no axis {name!r}; {have}" + (
            f" ({hint})" if hint else "")
    return None


class ModelSource(Strict):
    """Where a model comes from: a factory (with args and optional weights), a TorchScript
    file or an ONNX file. The recipe's ``model:`` adds its inputs and outputs; a distill
    teacher is a bare source (it is fed the recipe's inputs)."""

    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    torchscript: str | None = None
    onnx: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in ("factory", "torchscript", "onnx") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'factory', 'torchscript' or 'onnx'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.weights and not self.factory:
            raise ValueError("'weights' applies only to a 'factory' model")
        if self.args and not self.factory:
            raise ValueError("'args' applies only to a 'factory' model")
        return self

    @property
    def kind(self) -> Literal["torch", "onnx"]:
        return "onnx" if self.onnx else "torch"

    def describe(self) -> str:
        return self.factory or self.torchscript or self.onnx or "?"


class ModelSpec(ModelSource):
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _inputs(self) -> ModelSpec:
        if not self.onnx and not self.inputs:
            raise ValueError("a torch model needs 'inputs' (name, shape, dtype of each input)")
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
        return self


class DataSpec(Strict):
    train: str | None = None
    calibration: str | None = None
    eval: str
    batch_size: int = Field(default=32, ge=1, description="batch size for .npz data")


class LatencyBudget(Strict):
    p50: float | None = Field(default=None, gt=0)
    p90: float | None = Field(default=None, gt=0)
    p99: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _number_is_p50(cls, raw: Any) -> Any:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return {"p50": raw}
        return raw

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # A bare number is a p50 budget; the schema must accept it too.
        return {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, handler(core_schema)]}


class Budgets(Strict):
    max_size_mb: float | None = Field(default=None, gt=0)
    max_latency_ms: LatencyBudget | None = None
    max_memory_mb: float | None = Field(
        default=None, gt=0, description="peak RSS of the process measuring the final model"
    )
    max_accuracy_drop: Drop | None = None
    min_speedup: float | None = Field(default=None, gt=0)


class Target(Strict):
    profile: str
    budgets: Budgets = Field(default_factory=Budgets)
