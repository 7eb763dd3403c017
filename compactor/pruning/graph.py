"""The one module that talks to Torch-Pruning.

Torch-Pruning (``torch_pruning``) traces the model through autograd into a dependency graph:
which layers share each channel (a conv's outputs, its BatchNorm, the next conv's inputs,
every branch of a residual sum...), and it does the layer surgery that removes a set of
channels from all of them at once. compactor uses exactly that, here, behind a small API:

- :class:`PruningGraph` builds the graph and lists the prunable :class:`Unit` s (a group of
  coupled channels, named after its first conv/linear layer);
- :meth:`PruningGraph.scores` ranks a unit's channels with a Torch-Pruning importance;
- :meth:`PruningGraph.remove` removes channels from a unit (and every layer coupled to it).

How many channels each unit keeps, and attention heads, are decided in ``pruner.py``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactor.errors import PassError

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "random")


def _tp():
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - the torch extra installs it
        raise PassError(
            "prune needs Torch-Pruning, which is not installed",
            "pip install 'torch-pruning>=1.5,<2' (or compactor[torch])",
        ) from e
    return torch_pruning


def version() -> str:
    return getattr(_tp(), "__version__", "unknown")


@dataclass
class Unit:
    """Channels that are removed together: a layer's outputs and every input, norm and
    branch that shares them."""

    name: str  # the first conv/linear layer whose outputs these are
    layers: tuple[str, ...]  # every conv/linear whose outputs are these channels
    members: tuple[str, ...]  # every module touched when they are removed
    width: int  # channels now
    channel_groups: int = 1  # grouped convs / GroupNorm: removed evenly from each group
    _module: Any = field(default=None, repr=False)
    _fn: Any = field(default=None, repr=False)

    @property
    def group_width(self) -> int:
        return self.width // self.channel_groups


@contextlib.contextmanager
def _warnings_to(sink: list[str]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        msg = " ".join(str(w.message).split())
        if msg not in sink:
            sink.append(msg)


class LayerTracker:
    """Which module a forward pass is in, so a failure can name the layer it failed in."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.ran: list[nn.Module] = []
        self._hooks = []
        for m in model.modules():
            self._hooks.append(m.register_forward_pre_hook(self._enter))
            self._hooks.append(m.register_forward_hook(self._exit))

    def _enter(self, m, _inputs):
        self.stack.append(self.names.get(m, type(m).__name__))
        self.ran.append(m)

    def _exit(self, m, _inputs, _outputs):
        if self.stack:
            self.stack.pop()

    def where(self) -> str | None:
        """The innermost module that was running when the forward pass stopped."""
        named = [s for s in self.stack if s]
        return named[-1] if named else None

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def run_tracked(model: nn.Module, inputs: tuple | dict, grad: bool = False):
    """``model(inputs)``; on failure, raises ``LayerError`` naming the layer it failed in."""
    tracker = LayerTracker(model)
    try:
        with torch.set_grad_enabled(grad):
            return model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    except Exception as e:
        layer = tracker.where()
        cls = type(model.get_submodule(layer)).__name__ if layer else None
        raise LayerError(e, layer, cls) from e
    finally:
        tracker.close()


class LayerError(Exception):
    def __init__(self, error: Exception, layer: str | None, cls: str | None):
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        self.error = f"{type(error).__name__}: {first}" if first else type(error).__name__
        self.layer = layer
        self.cls = cls
        where = f" in layer '{layer}' ({cls})" if layer else ""
        super().__init__(f"{self.error}{where}")


class PruningGraph:
    """Torch-Pruning's dependency graph of ``model``, traced on ``example_inputs``.

    ``protected``: modules whose channels only compactor's own rules may remove (attention
    projections, whose channels go by whole heads); their units are not listed.
    """

    def __init__(self, model: nn.Module, example_inputs: tuple | dict,
                 protected: Sequence[nn.Module] = ()):
        tp = _tp()
        if isinstance(model, torch.jit.ScriptModule) or any(
            isinstance(m, torch.jit.ScriptModule) for m in model.modules()
        ):
            raise PassError(
                "prune: Torch-Pruning cannot trace a TorchScript module (model.torchscript, "
                "or a scripted submodule)",
                "give the model as model.factory (the Python nn.Module) so its layers can be "
                "pruned",
            )
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self._order = {m: i for i, m in enumerate(model.modules())}
        self.warnings: list[str] = []
        self.protected = {id(m) for p in protected for m in p.modules()}
        self._prunable_types = (nn.modules.conv._ConvNd, nn.Linear)
        tracker = LayerTracker(model)
        # The autograd nodes that make the traced outputs: a graph node with one of them is
        # an output (Torch-Pruning 1.6 marks output ops itself; 1.5 does not).
        self.output_fns: set[Any] = set()

        def outputs_seen(out):
            self.output_fns.update(t.grad_fn for t in _tensors(out) if t.grad_fn is not None)
            return out

        try:
            with _warnings_to(self.warnings), torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, output_transform=outputs_seen,
                    verbose=True,
                )
        except Exception as e:  # noqa: BLE001 - anything Torch-Pruning raises while tracing
            layer = tracker.where()
            where = f" in layer '{layer}' ({type(model.get_submodule(layer)).__name__})" \
                if layer else ""
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise PassError(
                f"prune: Torch-Pruning cannot trace the model{where}: {type(e).__name__}"
                + (f": {first}" if first else ""),
                "the model must run on the declared inputs with autograd on; pruning needs "
                "a plain nn.Module forward (run with --debug for the traceback)",
            ) from e
        finally:
            tracker.close()
        self.ran = [m for m in dict.fromkeys(tracker.ran)
                    if isinstance(m, self._prunable_types)]
        self.output_units: list[str] = []
        self._tp = tp

    # ------------------------------------------------------------------ structure

    def unreached(self) -> list[str]:
        """Conv/linear layers that ran but that the graph does not reach from the outputs
        (their outputs are detached, computed under no_grad, or unused): never pruned."""
        return [self.names[m] for m in self.ran if m not in self.dg.module2node]

    def _name(self, m: Any) -> str:
        return self.names.get(m, type(m).__name__)

    def units(self, ignored: Sequence[nn.Module] = ()) -> list[Unit]:
        """The prunable units, in module order. A unit whose channels reach a model output
        (the final classifier, a model's embedding width) is left out: removing them would
        change the output's shape. Its name is added to ``output_units``."""
        output_type = getattr(self._tp.ops.OPTYPE, "OUTPUT", object())
        skip = [m for m in self.model.modules() if id(m) in self.protected]
        skip += [m for layer in ignored for m in layer.modules()]
        out, output_units = [], []
        with _warnings_to(self.warnings):
            groups = list(self.dg.get_all_groups(ignored_layers=skip,
                                                 root_module_types=list(self._prunable_types)))
        for group in groups:
            outs, touched, reaches_output = [], [], False
            for dep, _ in group:
                target = dep.target.module
                if dep.target.type == output_type or (
                    dep.target.grad_fn in self.output_fns
                    and (not isinstance(target, self._prunable_types)
                         or self.dg.is_out_channel_pruning_fn(dep.handler))
                ):
                    reaches_output = True  # these channels are (part of) a model output
                if isinstance(target, nn.Module) and target in self.names:
                    touched.append(target)
                    if self.dg.is_out_channel_pruning_fn(dep.handler) and isinstance(
                        target, self._prunable_types
                    ):
                        outs.append(target)
            if not outs:
                continue
            outs.sort(key=lambda m: self._order.get(m, 0))
            root = outs[0]
            name = self._name(root)
            if reaches_output:
                output_units.append(name)
                continue
            touched = sorted(dict.fromkeys(touched), key=lambda m: self._order.get(m, 0))
            pruner = self.dg.get_pruner_of_module(root)
            out.append(Unit(
                name=name,
                layers=tuple(self._name(m) for m in outs),
                members=tuple(self._name(m) for m in touched),
                width=int(self.dg.get_out_channels(root)),
                channel_groups=self._channel_groups(group),
                _module=root,
                _fn=pruner.prune_out_channels,
            ))
        self.output_units = sorted(set(output_units), key=lambda n: self._order.get(
            self.model.get_submodule(n), 0))
        out.sort(key=lambda u: self._order.get(u._module, 0))
        return out

    def _channel_groups(self, group) -> int:
        """How many equal groups the channels fall into (grouped convs, GroupNorm): the
        same number must be removed from each. Depthwise convs follow their input."""
        found = [1]
        for dep, _ in group:
            m = dep.target.module
            if not isinstance(m, nn.Module):
                continue
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None:
                continue
            if self.dg.is_out_channel_pruning_fn(dep.handler):
                found.append(int(pruner.get_out_channel_groups(m) or 1))
            else:
                found.append(int(pruner.get_in_channel_groups(m) or 1))
        return max(found)

    def head_unit(self, q_proj: nn.Linear) -> Unit:
        """The channels of an attention block's query projection, with all that share them
        (key, value, output projection inputs): removed a whole head at a time."""
        fn = self.dg.get_pruner_of_module(q_proj).prune_out_channels
        group = self.dg.get_pruning_group(q_proj, fn, list(range(q_proj.out_features)))
        members = [dep.target.module for dep, _ in group
                   if isinstance(dep.target.module, nn.Module) and dep.target.module in self.names]
        return Unit(self._name(q_proj), (self._name(q_proj),),
                    tuple(self._name(m) for m in dict.fromkeys(members)),
                    q_proj.out_features, 1, q_proj, fn)

    # ------------------------------------------------------------------ scoring, surgery

    def scores(self, unit: Unit, importance: Any) -> torch.Tensor | None:
        """One importance score per channel of ``unit`` (higher: keep), or None when the
        criterion has nothing to go on (bn_scale without a BatchNorm)."""
        group = self.dg.get_pruning_group(unit._module, unit._fn, list(range(unit.width)))
        with _warnings_to(self.warnings):
            imp = importance(group)
        if imp is None:
            return None
        imp = imp.detach().float().cpu()
        if imp.numel() != unit.width:
            raise PassError(
                f"prune: importance for '{unit.name}' has {imp.numel()} scores for "
                f"{unit.width} channels",
                "try another importance criterion, or ignore this layer",
            )
        return torch.nan_to_num(imp, nan=0.0)

    def remove(self, unit: Unit, channels: Sequence[int]) -> None:
        """Remove ``channels`` of ``unit`` from every layer that shares them."""
        if not channels:
            return
        group = self.dg.get_pruning_group(unit._module, unit._fn, sorted(int(c) for c in channels))
        if not self.dg.check_pruning_group(group):
            raise PassError(
                f"prune: removing {len(channels)} of {unit.width} channels would leave a layer "
                f"of '{unit.name}' with none",
                f"prune less, or add '{unit.name}' to ignore",
            )
        with _warnings_to(self.warnings):
            group.prune()


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def make_importance(name: str) -> Any:
    """A Torch-Pruning importance criterion by compactor's name for it (names that exist in
    Torch-Pruning 1.5 and 1.6 alike)."""
    imp = _tp().importance
    if name == "l1":
        return imp.MagnitudeImportance(p=1)
    if name == "l2":
        return imp.MagnitudeImportance(p=2)
    if name == "taylor":
        return imp.TaylorImportance()
    if name == "bn_scale":
        return imp.BNScaleImportance()
    if name == "random":
        return imp.RandomImportance()
    raise ValueError(f"unknown importance {name!r}; use one of {', '.join(IMPORTANCES)}")
