"""The module a distillation trains: the student, the projections of its feature hints,
and forward hooks that capture the hinted features of the student and of the teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from compactor.errors import RecipeError, did_you_mean


def first_tensor(out: Any):
    """The first tensor of a model's output (the one metrics and the export check use)."""
    if hasattr(out, "detach"):
        return out
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return first_tensor(values)
    if isinstance(out, (tuple, list)):
        for v in out:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def output_tensors(out: Any) -> tuple:
    """Every tensor of a model's output, in the order the ONNX exporters emit them (the
    order ``compactor.exporting.flatten_outputs`` gives, without leaving torch): a tensor,
    a tuple or list, a dict or a Hugging Face ``ModelOutput``, nested as they may be."""
    if hasattr(out, "detach"):
        return (out,)
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return output_tensors(values)
    if isinstance(out, (tuple, list)):
        return tuple(t for v in out for t in output_tensors(v))
    return ()


def resolve_module(root: nn.Module, name: str, who: str, index: int) -> nn.Module:
    """The submodule ``name`` of ``root``, or a RecipeError with a did-you-mean."""
    modules = dict(root.named_modules())
    if name and name in modules:
        return modules[name]
    names = [n for n in modules if n]
    hint = did_you_mean(name, names)
    same_leaf = [n for n in names if n.split(".")[-1] == name.split(".")[-1]][:5]
    sample = same_leaf or names[:8]
    raise RecipeError(
        f"distill: hints[{index}].{who}: the {who} has no module named {name!r}",
        (hint + " " if hint else "")
        + f"{who} modules include: {', '.join(sample)}"
        + (" …" if len(names) > len(sample) else ""),
    )


class FeatureCapture:
    """Forward hooks that keep the latest output of some submodules."""

    def __init__(self) -> None:
        self.features: list = []
        self._handles: list = []

    def attach(self, root: nn.Module, names: Sequence[str], who: str) -> None:
        self.features = [None] * len(names)
        for i, name in enumerate(names):
            module = resolve_module(root, name, who, i)
            self._handles.append(module.register_forward_hook(self._hook(i)))

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            self.features[index] = first_tensor(output)

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Distillable(nn.Module):
    """The student plus the projections of its hints. ``forward(tensors)`` returns the
    student's outputs (every tensor, in the exported order) and its (projected) hinted
    features."""

    def __init__(self, student: nn.Module, specs: Sequence[Any], use_kw: bool):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList()
        self.specs = tuple(specs)
        self.use_kw = use_kw
        self.capture = FeatureCapture()

    def attach_hints(self, names: Sequence[str]) -> None:
        self.capture.attach(self.student, names, "student")

    def detach_hints(self) -> None:
        self.capture.detach()

    def set_projections(self, projections: Sequence[nn.Module | None]) -> None:
        self.projections = nn.ModuleList([p or nn.Identity() for p in projections])

    def forward(self, tensors: Sequence[Any]):
        if self.use_kw:
            out = self.student(**{s.name: t for s, t in zip(self.specs, tensors, strict=True)})
        else:
            out = self.student(*tensors)
        feats = list(self.capture.features)
        if len(self.projections):
            feats = [p(f) for p, f in zip(self.projections, feats, strict=True)]
        return output_tensors(out), feats
