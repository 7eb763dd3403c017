"""Data: factories yielding batches, or .npz files; normalized to named numpy inputs.

A factory returns an iterable of batches; a batch is ``(inputs, target)`` or ``(inputs,)``
(or bare ``inputs``), where ``inputs`` is an array/tensor (one input), a tuple of them in the
order of the recipe's inputs, or a dict keyed by input name. An ``.npz`` file holds one array
per input name and, optionally, ``target``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactor._imports import call_user, iterate_user, resolve_callable
from compactor.errors import DataError
from compactor.spec import DataSpec, InputSpec

log = logging.getLogger(__name__)

_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, np.ndarray]
    target: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class DataSource:
    """One split of the recipe's data (train, calibration or eval)."""

    def __init__(self, split: str, ref: str, inputs: Sequence[InputSpec], base_dir: Path,
                 batch_size: int = 32):
        self.split = split
        self.ref = ref
        self.inputs = tuple(inputs)
        self.base_dir = base_dir
        self.batch_size = batch_size
        self.source_file: Path | None = None
        self._factory = None
        if ref.endswith(".npz"):
            path = Path(ref).expanduser()
            self.source_file = path if path.is_absolute() else base_dir / path
            if not self.source_file.is_file():
                raise DataError(
                    f"data.{split}: file not found: {self.source_file}",
                    "paths in a recipe are relative to the recipe file's folder",
                )
        else:
            self._factory, self.source_file = resolve_callable(
                ref, base_dir, DataError, f"data.{split}"
            )

    def batches(self) -> Iterator[Batch]:
        """Yield validated batches (a fresh pass over the data each call)."""
        raw = self._npz_batches() if self._factory is None else self._factory_batches()
        n = 0
        for i, item in enumerate(raw):
            batch = self._normalize(item, i)
            n += 1
            yield batch
        if n == 0:
            raise DataError(
                f"data.{self.split}: {self.ref} yielded no batches",
                "the factory must return an iterable with at least one batch",
            )

    def take(self, max_samples: int | None = None) -> list[Batch]:
        """Materialize batches, up to ``max_samples`` samples (the last batch is cut)."""
        out: list[Batch] = []
        seen = 0
        for b in self.batches():
            if max_samples is not None and seen + b.size > max_samples:
                keep = max_samples - seen
                if keep > 0:
                    out.append(
                        Batch(
                            {k: v[:keep] for k, v in b.inputs.items()},
                            None if b.target is None else b.target[:keep],
                        )
                    )
                break
            out.append(b)
            seen += b.size
            if max_samples is not None and seen >= max_samples:
                break
        return out

    def _factory_batches(self) -> Iterator[Any]:
        data = call_user(self._factory, DataError, f"data.{self.split}")
        try:
            # a generator factory runs its code while it is iterated: boxed like the call
            yield from iterate_user(data, DataError, f"data.{self.split}")
        except TypeError as e:
            if "not iterable" in str(e):
                raise DataError(
                    f"data.{self.split}: {self.ref} returned {type(data).__name__}, "
                    "not an iterable of batches",
                    "return a list or generator of (inputs, target) batches",
                ) from e
            raise

    def _npz_batches(self) -> Iterator[Any]:
        try:
            npz = np.load(self.source_file, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises many types for a bad file
            raise DataError(
                f"data.{self.split}: cannot read {self.source_file}: {e}",
                "write it with numpy.savez(path, <input name>=array, target=array)",
            ) from e
        names = [i.name for i in self.inputs]
        missing = [n for n in names if n not in npz.files]
        if missing:
            raise DataError(
                f"data.{self.split}: {self.source_file.name} has no array for input(s) "
                f"{', '.join(missing)} (it has {', '.join(npz.files)})",
                "name each array after the model input it feeds; the labels go in 'target'",
            )
        arrays = {n: npz[n] for n in names}
        target = npz["target"] if "target" in npz.files else None
        total = len(next(iter(arrays.values())))
        for start in range(0, total, self.batch_size):
            sl = slice(start, start + self.batch_size)
            ins = {k: v[sl] for k, v in arrays.items()}
            yield (ins,) if target is None else (ins, target[sl])

    def _normalize(self, item: Any, index: int) -> Batch:
        where = f"data.{self.split} batch {index}"
        if isinstance(item, (tuple, list)) and len(item) in (1, 2) and (
            len(self.inputs) == 1 or isinstance(item[0], (tuple, list, dict))
        ):
            inputs, target = item[0], (item[1] if len(item) == 2 else None)
        else:
            inputs, target = item, None
        arrays = self._input_arrays(inputs, where)
        named = {spec.name: self._input_array(spec, arr, where)
                 for spec, arr in zip(self.inputs, arrays)}
        sizes = {a.shape[0] for a in named.values() if a.ndim}
        if len(sizes) > 1:
            raise DataError(f"{where}: inputs have different batch sizes {sorted(sizes)}",
                            "every input of a batch must have the same first dimension")
        if 0 in sizes:
            raise DataError(f"{where}: the batch has 0 rows",
                            "drop empty batches from the data (e.g. a last slice past the end)")
        tgt = None if target is None else to_numpy(target)
        if tgt is not None and tgt.ndim and sizes and tgt.shape[0] not in sizes:
            raise DataError(
                f"{where}: target has {tgt.shape[0]} rows, inputs have {sizes.pop()}",
                "targets must line up with the inputs' first dimension",
            )
        return Batch(named, tgt)

    def _input_arrays(self, inputs: Any, where: str) -> list[Any]:
        """A batch's inputs (one array, a tuple in recipe order, or a dict by name) as a
        list in recipe order, one per model input."""
        if isinstance(inputs, dict):
            unknown = [k for k in inputs if k not in {i.name for i in self.inputs}]
            missing = [i.name for i in self.inputs if i.name not in inputs]
            if missing or unknown:
                raise DataError(
                    f"{where}: input names {sorted(inputs)} do not match the model's "
                    f"{[i.name for i in self.inputs]}",
                    "key each array by the input name given in the recipe's model.inputs",
                )
            arrays = [inputs[i.name] for i in self.inputs]
        elif isinstance(inputs, (tuple, list)):
            arrays = list(inputs)
        else:
            arrays = [inputs]
        if len(arrays) != len(self.inputs):
            raise DataError(
                f"{where}: got {len(arrays)} input array(s), the model has {len(self.inputs)}",
                "a batch is (inputs, target) or (inputs,); with several inputs, 'inputs' is a "
                "tuple in recipe order or a dict by name",
            )
        return arrays

    def _input_array(self, spec: InputSpec, arr: Any, where: str) -> np.ndarray:
        """One input as numpy in the recipe's dtype (a float given for an integer input is
        refused, not truncated), with its declared shape and no NaN/inf."""
        a = to_numpy(arr)
        want = _NP_DTYPES[spec.dtype]
        if a.dtype != want:
            if np.issubdtype(want, np.integer) and np.issubdtype(a.dtype, np.floating):
                raise DataError(
                    f"{where}: input {spec.name!r} is {a.dtype}, the recipe says {spec.dtype}",
                    "fix the data or the input's dtype in model.inputs",
                )
            a = a.astype(want)
        self._check_shape(spec, a, where)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise DataError(
                f"{where}: input {spec.name!r} has {bad} NaN/inf value(s)",
                "clean the data (or drop those samples) before compressing",
            )
        return a

    @staticmethod
    def _check_shape(spec: InputSpec, a: np.ndarray, where: str) -> None:
        ok = a.ndim == len(spec.shape) and all(
            isinstance(d, str) or d == s for d, s in zip(spec.shape, a.shape)
        )
        if not ok:
            declared = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            raise DataError(
                f"{where}: input {spec.name!r} has shape {list(a.shape)}, the recipe declares "
                f"{declared}",
                "fix model.inputs in the recipe (names mark dynamic axes) or the data",
            )


def batch_sizes_for(specs: Sequence[InputSpec], wanted: Sequence[int]) -> list[int]:
    """The batch sizes a model with these inputs can run: ``wanted`` (a profile's), or only
    the declared size when every input's batch axis is fixed (``[16, ...]``)."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if len(fixed) != 1 or any(s.shape and isinstance(s.shape[0], str) for s in specs):
        return list(wanted)
    return [fixed.pop()]


class RunData:
    """A run's data splits, each loaded once on first use (the eval split is kept: every
    stage is evaluated on it)."""

    def __init__(self, spec: DataSpec, inputs: Sequence[InputSpec], base_dir: Path):
        self.spec = spec
        self.inputs = tuple(inputs)
        self.base_dir = base_dir
        self._sources: dict[str, DataSource] = {}
        self._eval: list[Batch] | None = None

    def source(self, split: str) -> DataSource:
        if split not in self._sources:
            ref = getattr(self.spec, split)
            if ref is None:
                raise DataError(
                    f"this recipe needs data.{split}, which is not set",
                    f"add 'data: {{{split}: data.py:fn}}' (or a .npz file) to the recipe",
                )
            self._sources[split] = DataSource(split, ref, self.inputs, self.base_dir,
                                              self.spec.batch_size)
        return self._sources[split]

    @property
    def eval_batches(self) -> list[Batch]:
        if self._eval is None:
            self._eval = self.source("eval").take()
        return self._eval

    def calibration_batches(self, max_samples: int) -> list[Batch]:
        return self.source("calibration").take(max_samples)

    def source_files(self) -> list[Path]:
        """The files the splits read (an .npz, a factory's module), for run keys."""
        return [src for split in ("train", "calibration", "eval")
                if getattr(self.spec, split) is not None
                and (src := self.source(split).source_file) is not None]


def feeds_for_batch(specs: Sequence[InputSpec], batches: list[Batch], bs: int):
    """Real eval samples at batch size ``bs`` (repeating samples if the data is smaller)."""
    feeds = {}
    for s in specs:
        parts, n = [], 0
        for b in batches:
            a = b.inputs[s.name]
            parts.append(a)
            n += a.shape[0]
            if n >= bs:
                break
        a = np.concatenate(parts)
        if a.shape[0] < bs:
            a = np.concatenate([a] * (bs // a.shape[0] + 1))
        feeds[s.name] = np.ascontiguousarray(a[:bs])
    return feeds
