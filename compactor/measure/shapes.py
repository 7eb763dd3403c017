"""The symbolic axes of a model's inputs, and guidance for models that need them set.

A dynamic-shape model (``x [batch, 3, height, width]``) cannot be measured or counted until
each symbolic axis has a size. ``bench`` and ``inspect`` default the non-batch ones to 1,
which many models do not run at (a detector's ``Concat`` of an upsampled and a skip
branch). This module names those axes the way ``--dim`` sets them, checks ``--dim`` names,
and finds a common size the model does run at, to suggest instead of a raw runtime error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compactor.errors import UsageError

Spec = tuple[str, list[Any], Any]  # (input name, shape: int | str | None per axis, dtype)


_BATCH_NAME = re.compile(r"^(n|b|bs|batch|batch_?size|num_?batch(es)?|.*batch.*)$", re.I)


def is_symbolic(d: int | str | None) -> bool:
    return not (isinstance(d, int) and d > 0)


def is_named(d: int | str | None) -> bool:
    """A real axis name: not None, "", or a placeholder such as Paddle's ``?`` (which it
    writes for every unknown axis, so it names none of them)."""
    return isinstance(d, str) and d.strip("?-1 ") != ""


def axis_key(input_name: str, axis: int, d: int | str | None) -> str:
    """The name ``--dim`` sets a symbolic axis by: its own name when that is an identifier,
    else ``<input>_dim<axis>`` (stable: it depends only on the model), the same name a
    recipe's ``measure.dims`` uses (``model.onnx_input_specs``)."""
    return str(d) if is_named(d) and str(d).isidentifier() else f"{input_name}_dim{axis}"


def batch_axes(specs: list[tuple[str, list[int | str | None], Any]]) -> dict[str, int | None]:
    """The axis of each input the batch fills, None for an input without one (a scalar, a
    fixed-size input). A symbolic axis named like the batch (``batch``, ``N``, ``B``, ...)
    wins; else a symbolic axis 0; else a symbolic axis sharing its name with another input's
    batch axis (a recurrent state ``[2, B, 128]`` beside ``input [B, 576]``)."""
    out: dict[str, int | None] = {}
    for name, shape, _ in specs:
        named = [i for i, d in enumerate(shape)
                 if is_symbolic(d) and is_named(d) and _BATCH_NAME.match(str(d))]
        out[name] = named[0] if named else (0 if shape and is_symbolic(shape[0]) else None)
    batch_names = {shape[out[name]] for name, shape, _ in specs
                   if out[name] is not None and is_named(shape[out[name]])}
    for name, shape, _ in specs:
        if out[name] is None:
            out[name] = next((i for i, d in enumerate(shape)
                              if is_named(d) and d in batch_names), None)
    return out


@dataclass(frozen=True)
class Axis:
    """A symbolic axis: the name ``--dim`` sets it by, where it appears (``x[2]``), whether
    it is named in the model, and whether it is the batch."""

    key: str
    where: tuple[str, ...]
    named: bool
    batch: bool

    def describe(self) -> str:
        places = ", ".join(self.where)
        return (f"{self.key} ({places})" if self.named else f"{self.key} (unnamed)") + (
            " [batch]" if self.batch else "")


def dynamic_axes(specs: Sequence[Spec]) -> list[Axis]:
    """Every symbolic axis of the inputs, in input order, each name once."""
    batch = batch_axes(list(specs))
    batch_keys = {axis_key(n, a, shape[a]) for n, shape, _ in specs
                  if (a := batch[n]) is not None}
    found: dict[str, list[str]] = {}
    named: dict[str, bool] = {}
    for name, shape, _ in specs:
        for i, d in enumerate(shape):
            if is_symbolic(d):
                key = axis_key(name, i, d)
                found.setdefault(key, []).append(f"{name}[{i}]")
                named[key] = is_named(d)
    return [Axis(k, tuple(w), named[k], k in batch_keys) for k, w in found.items()]


def scalar_inputs(specs: Sequence[Spec]) -> list[str]:
    return [name for name, shape, _ in specs if len(shape) == 0]


def check_dim_names(dims: Mapping[str, int], specs: Sequence[Spec]) -> None:
    """A ``--dim`` name the model has no symbolic axis (or scalar input) by: exit 2 with a
    did-you-mean and the names it has."""
    known = [a.key for a in dynamic_axes(specs)] + scalar_inputs(specs)
    for name in dims:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        raise UsageError(
            f"--dim {name}: the model has no symbolic axis or scalar input named {name!r}"
            + (f"; did you mean {close[0]!r}?" if close else ""),
            "its symbolic axes and scalar inputs: " + (", ".join(known) or "none")
            + " (an unnamed axis is set as <input>_dim<axis>, e.g. --dim x_dim2=64)")


def defaulted(specs: Sequence[Spec], dims: Mapping[str, int]) -> list[Axis]:
    """Non-batch symbolic axes no ``--dim`` gave a size: they run at 1."""
    return [a for a in dynamic_axes(specs) if not a.batch and a.key not in dims]


def dim_example(axes: Sequence[Axis], sizes: Mapping[str, int] | None = None) -> str:
    """``--dim height=640 --dim width=640`` (``N`` where no size is known)."""
    def one(a: Axis) -> str:
        v = (sizes or {}).get(a.key)
        text = f"{a.key}={v if v is not None else 'N'}"
        return f"--dim {text}" if a.named else f"--dim '{text}'"
    return " ".join(one(a) for a in axes)


def run_error(model: Any, feeds: Mapping[str, np.ndarray]) -> str | None:
    """The first line of ONNX Runtime's error running ``model`` (a path or serialized bytes)
    on ``feeds``, or None when it runs. Its own log is silenced: the error is returned, not
    printed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: a failed run is a result here, not a log line
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, dict(feeds), ro)
    except Exception as e:  # noqa: BLE001 - ORT raises many types; the message is the result
        return summarize_ort_error(e)
    return None


def summarize_ort_error(e: BaseException) -> str:
    """One line from an ONNX Runtime exception: the failing node and its message, without
    the ``[ONNXRuntimeError] : 1 : FAIL :`` prefix and source file positions."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = re.sub(r"Status Message: \S+\.(cc|h):\d+ \S+ ", "", text)
    return text[:240]
