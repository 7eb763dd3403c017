"""Hardware profiles: what a deployment target is and how to measure for it.

Built-in profiles ship as YAML beside this file; a recipe may also name a profile file.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compactor.errors import RecipeError, did_you_mean
from compactor.yamlsafe import load_yaml, read_yaml_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """What the target can hold. Checked on every run, like a budget, for each target that
    uses the profile."""

    memory_mb: float | None = Field(
        default=None, gt=0, description="peak resident memory of the measuring process"
    )
    model_size_mb: float | None = Field(default=None, gt=0, description="model file size")
    latency_ms: float | None = Field(
        default=None, gt=0,
        description="per-request p90 latency the batching hint keeps within, when the "
        "target sets no max_latency_ms",
    )


class Estimates(_Strict):
    """Figures used only for estimates, never reported as measurements."""

    power_w: float | None = Field(default=None, gt=0, description="watts while inferring")
    peak_gflops_fp32: float | None = Field(default=None, gt=0)
    peak_gflops_fp16: float | None = Field(default=None, gt=0)
    peak_gops_int8: float | None = Field(default=None, gt=0)
    memory_bandwidth_gbs: float | None = Field(default=None, gt=0)


class Network(_Strict):
    uplink_mbps: float | None = Field(default=None, gt=0)
    rtt_ms: float | None = Field(default=None, ge=0)


class Timing(_Strict):
    """How long to time each (model, batch size): warm-up runs, then repeats until both
    minimums are met and the median is stable (the 95% confidence interval of the median
    within ±``target_ci`` of it), stopping at the time cap ``max_time_s``."""

    warmup: int = Field(default=5, ge=0)
    warmup_s: float = Field(
        default=0.25, ge=0,
        description="untimed warm-up lasts at least this long too (at most a tenth of "
        "max_time_s): caches, allocator and CPU clock settle before timing starts",
    )
    min_runs: int = Field(default=30, ge=5)
    min_time_s: float = Field(default=0.5, ge=0)
    max_time_s: float = Field(default=3.0, gt=0)
    target_ci: float = Field(
        default=0.02, gt=0, le=0.5,
        description="relative half-width of the median's 95% confidence interval to reach",
    )


class Profile(_Strict):
    name: str
    target_class: Literal["cloud", "edge", "mobile", "host"] = Field(alias="class")
    description: str = ""
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = Field(default=0, ge=0, description="0: all cores of the host")
    inter_op_threads: int = Field(default=1, ge=0)
    batch_sizes: tuple[int, ...] = Field(default=(1,), min_length=1)
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    format: Literal["onnx", "ort"] = Field(
        default="onnx",
        description="deployable format: 'ort' adds model.ort and its reduced-operator "
        "config (ONNX Runtime Mobile / minimal builds) to the artifact",
    )
    preferred_precision: Literal["fp32", "fp16", "int8"] | None = Field(
        default=None, description="the precision this target runs fastest; advice only"
    )
    limits: Limits = Field(default_factory=Limits)
    estimates: Estimates = Field(default_factory=Estimates)
    network: Network = Field(default_factory=Network)
    timing: Timing = Field(default_factory=Timing)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("execution_providers")
    @classmethod
    def _providers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one execution provider")
        bad = [p for p in v if not p.endswith("ExecutionProvider")]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is not an ONNX Runtime execution provider name "
                "(e.g. CPUExecutionProvider, CUDAExecutionProvider)"
            )
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive")
        return tuple(sorted(set(v)))

    def threads_on_host(self) -> tuple[int, str | None]:
        """Intra-op threads to measure with here, and a note when the host forced a change."""
        cores = os.cpu_count() or 1
        if self.intra_op_threads == 0:
            return cores, None
        if self.intra_op_threads > cores:
            return cores, (
                f"profile asks for {self.intra_op_threads} threads; this host has {cores} "
                f"cores, measured with {cores}"
            )
        return self.intra_op_threads, None


def builtin_names() -> list[str]:
    files = resources.files(__package__).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def load_profile(name_or_path: str, base_dir: Path | None = None) -> Profile:
    """A built-in profile by name, or a profile YAML file (relative to ``base_dir``)."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise RecipeError(f"profile file not found: {path}", "check the path in the recipe")
        return _parse(read_yaml_text(path, "profile"), str(path))  # size-bounded
    names = builtin_names()
    if name_or_path not in names:
        hint = did_you_mean(name_or_path, names)
        raise RecipeError(
            f"unknown profile {name_or_path!r}",
            (hint + " " if hint else "") + f"built-in profiles: {', '.join(names)}; "
            "or give a profile .yaml file",
        )
    text = resources.files(__package__).joinpath(f"{name_or_path}.yaml").read_text("utf-8")
    return _parse(text, name_or_path)


def _parse(text: str, where: str) -> Profile:
    raw = load_yaml(text, f"profile {where}")  # bounded: aliases, nesting, tags
    if not isinstance(raw, dict):
        raise RecipeError(f"profile {where}: a profile must be a YAML mapping",
                          "start from `compactor profiles show host-cpu`")
    try:
        return Profile.model_validate(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        loc = ".".join(str(p) for p in err["loc"])
        hint = "see docs/profiles.md for the profile fields"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(err["loc"][:-1])
            close = did_you_mean(str(err["loc"][-1]), allowed)
            hint = (close + " " if close else "") + f"allowed keys: {', '.join(allowed)}"
            return_msg = f"profile {where}: unknown key {loc!r}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else (
                f" (got {got!r})")
            return_msg = f"profile {where}: {loc}: {msg}{shown}"
        raise RecipeError(return_msg, hint) from None


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Profile
    for part in loc:
        ann = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return [f.alias or n for n, f in model.model_fields.items()]
