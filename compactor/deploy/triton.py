"""A Triton Inference Server model configuration (``config.pbtxt``) for the ONNX Runtime
backend, derived from what the manifest measured: the inputs and outputs of the model, the
batching from the measured latency-per-batch curve and the target's latency budget, and
the instance group and ORT thread settings from the target's profile.

The text is written here (no protobuf at run time); the tests parse it with Triton's own
``ModelConfig`` message from the ``tritonclient`` package. How the batching is derived is
in docs/deploy.md ("Batching").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compactor.errors import UsageError, did_you_mean
from compactor.manifest import visible

if TYPE_CHECKING:
    from compactor.manifest import LatencyRecord, Manifest, TargetRecord
    from compactor.profiles import Profile

# A batch size is kept as preferred only while it raises the measured throughput by at
# least this much over the last one kept: a bigger batch that adds little throughput only
# adds latency.
MIN_THROUGHPUT_GAIN = 0.10

# numpy dtype names, as the manifest records them, to Triton's data types.
TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL", "str": "TYPE_STRING", "string": "TYPE_STRING",
    "object": "TYPE_STRING",
}

# Triton's ORT backend reads optimization.graph.level: -1 disables every optimization, 1
# asks for extended; unset is ORT_ENABLE_ALL. "basic" has no exact match: extended is the
# nearest that still optimizes.
GRAPH_LEVEL = {"disable": -1, "basic": 1, "extended": 1, "all": None}

# Triton's model names become folder names and URL path parts.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Batching:
    """What the config says about batching, and why."""

    max_batch_size: int
    preferred: tuple[int, ...] = ()
    max_queue_delay_us: int | None = None  # None: no dynamic_batching block
    reasons: tuple[str, ...] = ()
    budget: str = ""  # the latency limit the derivation kept, e.g. "p99 ≤ 50 ms"
    curve: tuple[dict[str, float], ...] = field(default_factory=tuple)

    @property
    def dynamic(self) -> bool:
        return self.max_queue_delay_us is not None

    def to_dict(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "dynamic_batching": self.dynamic,
                "preferred_batch_size": list(self.preferred),
                "max_queue_delay_microseconds": self.max_queue_delay_us,
                "latency_budget": self.budget, "reasons": list(self.reasons),
                "curve": list(self.curve)}


def model_name(name: str) -> str:
    """``name`` when Triton can use it as a model (folder) name, else a usage error."""
    if not _NAME.match(name) or name in (".", ".."):
        raise UsageError(
            f"{visible(name)!r} cannot be a Triton model name",
            "give --name NAME: letters, digits, '_', '.', '-' (up to 128, not starting with "
            "'.' or '-')",
        )
    return name


def choose_target(manifest: Manifest, profile: str | None) -> TargetRecord:
    """The manifest's target whose measurements the config is derived from: ``profile``,
    else the first cloud target, else the first target."""
    targets = manifest.targets
    if not targets:
        raise UsageError("the artifact has no targets, so no measurements to derive the "
                         "Triton config from", "add a target to the recipe and re-run it")
    if profile is not None:
        for t in targets:
            if t.profile == profile:
                return t
        names = [t.profile for t in targets]
        hint = did_you_mean(profile, names)
        raise UsageError(f"--profile {visible(profile)!r}: the artifact has no target with it",
                         (hint + " " if hint else "") + "its targets: "
                         + visible(", ".join(names)))
    cloud = [t for t in targets if t.settings is not None and t.settings.target_class == "cloud"]
    return (cloud or targets)[0]


def batch_axis_problem(manifest: Manifest) -> str | None:
    """Why the model cannot be batched by Triton (None when it can): Triton concatenates
    requests along axis 0, so every input and output needs a free (symbolic) first axis."""
    for t in manifest.model.inputs:
        if t.batch_axis is None:
            return f"input {visible(t.name)!r} has no batch axis (batch_axis: null)"
        if t.batch_axis != 0:
            return (f"input {visible(t.name)!r} stacks samples on axis {t.batch_axis}; "
                    "Triton batches on axis 0")
    tensors = [("input", t.name, t.shape) for t in manifest.model.inputs]
    tensors += [("output", t.name, t.shape) for t in manifest.model.outputs]
    for kind, name, shape in tensors:
        if not shape:
            return f"{kind} {visible(name)!r} is a scalar (no batch axis)"
        if not isinstance(shape[0], str):
            return (f"{kind} {visible(name)!r} has a fixed first axis ({shape[0]}), not a "
                    "batch axis")
    return None


def _limits(target: TargetRecord, profile: Profile | None) -> tuple[dict[str, float], str]:
    """The latency limits per quantile (ms) the batches must keep, and where they come from."""
    lat = target.budgets.max_latency_ms if target.budgets is not None else None
    if lat is not None:
        limits = {q: v for q in ("p50", "p90", "p99") if (v := getattr(lat, q)) is not None}
        if limits:
            return limits, "the target's max_latency_ms"
    if profile is not None and profile.limits.latency_ms is not None:
        return {"p90": profile.limits.latency_ms}, f"{profile.name}'s limits.latency_ms"
    return {}, ""


def derive_batching(manifest: Manifest, target: TargetRecord) -> Batching:
    """Batching for ``target`` from the final stage's measured latency per batch size; see
    docs/deploy.md ("Batching") for the rule."""
    problem = batch_axis_problem(manifest)
    if problem:
        return Batching(0, reasons=(f"max_batch_size 0: {problem}; Triton sends each request "
                                    "as it came, without dynamic batching",))
    measured = manifest.final.latency_ms.get(target.profile) or {}
    curve = sorted(measured.values(), key=lambda r: r.batch_size)
    points = tuple({"batch_size": r.batch_size, "p50_ms": r.p50, "p90_ms": r.p90,
                    "p99_ms": r.p99, "throughput": r.throughput} for r in curve)
    limits, source = _limits(target, target.settings)
    budget = ", ".join(f"{q} ≤ {v:g} ms" for q, v in limits.items())
    if source:
        budget += f" ({source})"
    if not curve:
        return Batching(1, reasons=(f"no latency was measured for {visible(target.profile)}; "
                                    "max_batch_size 1 and no dynamic batching",), budget=budget)
    fits = [r for r in curve if all(getattr(r, q) <= v for q, v in limits.items())]
    if not fits:
        return Batching(1, reasons=(f"no measured batch size keeps {budget}: max_batch_size 1 "
                                    "and no dynamic batching",), budget=budget, curve=points)
    largest = fits[-1].batch_size
    preferred = _preferred(fits)
    if len(curve) < 2:
        return Batching(largest, reasons=(
            f"only batch size {curve[0].batch_size} was measured: no curve to derive dynamic "
            "batching from (add batch sizes to the profile's batch_sizes)",),
            budget=budget, curve=points)
    if not preferred:
        return Batching(largest, reasons=(
            "no measured batch size within the budget raises throughput by "
            f"{MIN_THROUGHPUT_GAIN:.0%} or more over batch {fits[0].batch_size}: dynamic "
            "batching would only add latency",), budget=budget, curve=points)
    return _with_delay(largest, preferred, limits, budget, points)


def _preferred(fits: Sequence[LatencyRecord]) -> list[LatencyRecord]:
    """Batch sizes above 1 that still add MIN_THROUGHPUT_GAIN of throughput over the last
    size kept (the first size within budget starts the chain)."""
    kept = [fits[0]]
    for r in fits[1:]:
        if r.throughput >= kept[-1].throughput * (1 + MIN_THROUGHPUT_GAIN):
            kept.append(r)
    return [r for r in kept if r.batch_size > 1]


def _with_delay(largest: int, preferred: list[LatencyRecord], limits: Mapping[str, float],
                budget: str, points: tuple) -> Batching:
    """The queue delay: what the budget leaves after the measured latency of the largest
    preferred batch, on its tightest quantile; a preferred size that leaves nothing is
    dropped."""
    reasons = []
    while preferred:
        top = preferred[-1]
        if not limits:
            reasons.append("no latency budget on the target or its profile: "
                           "max_queue_delay 0 (batch only what is already queued)")
            delay_ms = 0.0
            break
        delay_ms = min(v - getattr(top, q) for q, v in limits.items())
        if delay_ms > 0:
            q = min(limits, key=lambda k: limits[k] - getattr(top, k))
            reasons.append(
                f"max_queue_delay = {q} limit {limits[q]:g} ms - measured {q} "
                f"{getattr(top, q):.3g} ms at batch {top.batch_size} = {delay_ms:.3g} ms")
            break
        reasons.append(f"batch {top.batch_size} leaves no queueing time within {budget}")
        preferred = preferred[:-1]
    if not preferred:
        return Batching(largest, reasons=tuple(reasons), budget=budget, curve=points)
    sizes = tuple(r.batch_size for r in preferred)
    reasons.insert(0, f"preferred batch sizes {list(sizes)}: each raises measured throughput "
                      f"by ≥ {MIN_THROUGHPUT_GAIN:.0%} and keeps {budget or 'no limit'}")
    return Batching(largest, sizes, int(delay_ms * 1000), tuple(reasons), budget, points)


# --------------------------------------------------------------------------- the text


def _dims(shape: Sequence[int | str], batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape]
    return dims[1:] if batched else dims


def _tensor(name: str, dtype: str, shape: Sequence[int | str], batched: bool) -> str:
    kind = TRITON_DTYPES.get(dtype)
    if kind is None:
        raise UsageError(f"tensor {visible(name)!r} has dtype {visible(dtype)!r}, which Triton "
                         "has no type for", "export the model with a standard tensor type")
    dims = _dims(shape, batched)
    text = f"    name: {json.dumps(name)}\n    data_type: {kind}\n"
    if not dims:  # a scalar (or a batched [batch] tensor): Triton wants at least one dim
        return text + "    dims: [ 1 ]\n    reshape: { shape: [ ] }\n"
    return text + f"    dims: [ {', '.join(map(str, dims))} ]\n"


def _comment(text: str) -> str:
    return "".join(f"# {visible(line)}\n" for line in text.splitlines())


def config_pbtxt(manifest: Manifest, name: str, target: TargetRecord, batching: Batching,
                 served: Sequence[int], instances: int = 1) -> str:
    """``config.pbtxt`` for ``name`` serving the versions ``served``."""
    batched = batching.max_batch_size > 0
    head = (f"compactor: model {manifest.name}, derived from target "
            f"{target.profile}'s measurements\n"
            + "\n".join(batching.reasons))
    parts = [_comment(head),
             f"name: {json.dumps(name)}\n",
             'backend: "onnxruntime"\n',
             'default_model_filename: "model.onnx"\n',
             f"max_batch_size: {batching.max_batch_size}\n",
             "version_policy: { specific: { versions: [ "
             + ", ".join(str(v) for v in sorted(served)) + " ] } }\n"]
    for kind, tensors in (("input", manifest.model.inputs), ("output", manifest.model.outputs)):
        body = ",\n".join("  {\n" + _tensor(t.name, t.dtype, t.shape, batched) + "  }"
                          for t in tensors)
        parts.append(f"{kind} [\n{body}\n]\n")
    if batching.dynamic:
        parts.append("dynamic_batching {\n"
                     + "".join(f"  preferred_batch_size: {b}\n" for b in batching.preferred)
                     + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n}}\n")
    parts.append(_runtime(target.settings, instances))
    return "".join(parts)


def _runtime(profile: Profile | None, instances: int) -> str:
    """instance_group, ORT threads and graph level from the profile."""
    gpu = profile is not None and any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                      for p in profile.execution_providers)
    out = (f"instance_group [ {{ count: {instances}, kind: "
           f"{'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n")
    if profile is None:
        return out
    params = {}
    if profile.intra_op_threads:
        params["intra_op_thread_count"] = profile.intra_op_threads
    if profile.inter_op_threads:
        params["inter_op_thread_count"] = profile.inter_op_threads
    for key, value in params.items():
        out += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    level = GRAPH_LEVEL[profile.graph_optimization_level]
    if level is not None:
        out += f"optimization {{ graph {{ level: {level} }} }}\n"
    return out
