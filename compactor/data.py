"""Data: factories yielding batches, or .npz files; normalized to named numpy inputs.

A factory returns an iterable of batches; a batch is ``(inputs, target)`` or ``(inputs,)``
(or bare ``inputs``), where ``inputs`` is an array/tensor (one input), a tuple of them in the
order of the recipe's inputs, or a dict keyed by input name. An ``.npz`` file holds one array
per input name and, optionally, ``target``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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


def take_rows(a: np.ndarray, axis: int | None, sel: slice | np.ndarray) -> np.ndarray:
    """The samples ``sel`` of ``a`` along its batch ``axis``; an array without one whole."""
    if axis is None:
        return a
    index: list[Any] = [slice(None)] * a.ndim
    index[axis] = sel
    return a[tuple(index)]


@dataclass(frozen=True)
class Batch:
    """Named input arrays (and the target, samples on its axis 0). ``axes`` gives each
    input's batch axis (its spec's ``batch_axis``); an input it does not name has axis 0,
    or none when it is 0-d (a scalar is passed as-is to every run)."""

    inputs: dict[str, np.ndarray]
    target: np.ndarray | None = None
    axes: Mapping[str, int | None] = field(default_factory=dict)

    def axis(self, name: str) -> int | None:
        if name in self.axes:
            return self.axes[name]
        return 0 if np.ndim(self.inputs[name]) else None

    @property
    def size(self) -> int:
        """Samples in the batch: the length of the first batch axis (1 when no input has
        one, e.g. a model of scalars)."""
        for name, a in self.inputs.items():
            axis = self.axis(name)
            if axis is not None:
                return int(a.shape[axis])
        if self.target is not None and np.ndim(self.target):
            return int(np.shape(self.target)[0])
        return 1

    def rows(self, sel: slice | np.ndarray) -> Batch:
        """The samples ``sel`` (a slice or indices) of this batch; inputs without a batch
        axis are kept whole."""
        target = self.target
        if target is not None and np.ndim(target):
            target = np.asarray(target)[sel]
        return Batch({k: take_rows(v, self.axis(k), sel) for k, v in self.inputs.items()},
                     target, self.axes)

    def head(self, n: int) -> Batch:
        return self.rows(slice(0, n))


def join(batches: Sequence[Batch]) -> Batch:
    """The batches' samples in one batch, each input joined along its batch axis (the
    inputs' other axes must agree: bring them to one shape first, see :func:`conform`).
    An input without a batch axis is taken from the first batch."""
    first = batches[0]
    inputs = {}
    for name, a in first.inputs.items():
        axis = first.axis(name)
        inputs[name] = a if axis is None or len(batches) == 1 else np.concatenate(
            [b.inputs[name] for b in batches], axis=axis)
    targets = [b.target for b in batches]
    target = None
    if all(t is not None and np.ndim(t) for t in targets):
        target = targets[0] if len(targets) == 1 else np.concatenate(targets)
    return Batch(inputs, target, first.axes)


@dataclass(frozen=True)
class PerBatch:
    """A model's output (or the targets) over the eval data, one array per batch with the
    samples on axis 0. Batches padded to their own longest sentence give outputs of
    different trailing shapes, which no concatenation can hold: they stay apart here, and a
    metric is computed per batch and weighted by its samples (``Metric.score``). When every
    batch has the same trailing shape, :meth:`joined` is the one array it always was."""

    parts: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, arrays: Iterable[Any]) -> PerBatch:
        parts = []
        for a in arrays:
            a = np.asarray(a)
            parts.append(a.reshape(1) if a.ndim == 0 else a)
        return cls(tuple(parts))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(p.shape[0]) for p in self.parts)

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(p.shape) for p in self.parts)

    @property
    def uniform(self) -> bool:
        """Whether every batch has the same per-sample shape (they can be joined)."""
        return len({p.shape[1:] for p in self.parts}) <= 1

    def joined(self) -> np.ndarray:
        if not self.uniform:
            raise ValueError("batches of different per-sample shapes cannot be joined: "
                             + ", ".join(sorted({str(list(s[1:])) for s in self.shapes})))
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)

    def flat(self) -> np.ndarray:
        """Joined when uniform, else every value in one vector (batch by batch): enough to
        compare two models' outputs element by element."""
        if self.uniform:
            return self.joined()
        return np.concatenate([p.reshape(-1) for p in self.parts])

    def take(self, index: np.ndarray) -> PerBatch:
        """The samples at the sorted global ``index``, still one array per source batch."""
        out, start = [], 0
        index = np.asarray(index, dtype=np.int64)
        for p in self.parts:
            n = p.shape[0]
            lo, hi = np.searchsorted(index, [start, start + n])
            if hi > lo:
                out.append(p[index[lo:hi] - start])
            start += n
        return PerBatch(tuple(out))


@dataclass(frozen=True)
class Outputs:
    """Every output of a model over the eval data, by name (in the graph's order), each a
    :class:`PerBatch`. Metrics score the outputs a recipe names (by default all of them);
    code that knows only one output reads :attr:`first`."""

    names: tuple[str, ...]
    values: tuple[PerBatch, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.values) or not self.names:
            raise ValueError("Outputs needs one PerBatch per name, and at least one")

    @classmethod
    def of(cls, names: Sequence[str], per_batch: Iterable[Sequence[Any]]) -> Outputs:
        """From each batch's outputs (a list in ``names``' order, as ORT returns them)."""
        rows = [list(r) for r in per_batch]
        return cls(tuple(names), tuple(PerBatch.of(r[i] for r in rows)
                                       for i in range(len(names))))

    @classmethod
    def single(cls, values: PerBatch, name: str = "output") -> Outputs:
        return cls((name,), (values,))

    def __getitem__(self, name: str) -> PerBatch:
        return self.values[self.names.index(name)]

    def items(self) -> Iterator[tuple[str, PerBatch]]:
        return iter(zip(self.names, self.values, strict=True))

    @property
    def first(self) -> PerBatch:
        return self.values[0]

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.first.sizes

    def __len__(self) -> int:
        return len(self.first)

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        return {n: v.shapes for n, v in self.items()}

    def take(self, index: np.ndarray) -> Outputs:
        return Outputs(self.names, tuple(v.take(index) for v in self.values))


def outputs_of(values: PerBatch | Outputs) -> Outputs:
    """``values`` as :class:`Outputs` (a bare PerBatch is one unnamed output)."""
    return values if isinstance(values, Outputs) else Outputs.single(values)


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
                    out.append(b.head(keep))
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
        whole = Batch(arrays, target, {i.name: i.batch_axis for i in self.inputs})
        total = whole.size
        for start in range(0, total, self.batch_size):
            part = whole.rows(slice(start, start + self.batch_size))
            yield (part.inputs,) if target is None else (part.inputs, part.target)

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
        by_input = {s.name: named[s.name].shape[s.batch_axis]
                    for s in self.inputs if s.batch_axis is not None}
        sizes = set(by_input.values())
        if len(sizes) > 1:
            listed = ", ".join(
                f"{s.name} {by_input[s.name]} (axis {s.batch_axis})"
                for s in self.inputs if s.name in by_input)
            raise DataError(
                f"{where}: inputs have different batch sizes: {listed}",
                "every input of a batch must have the same size along its batch axis; an "
                "input whose batch is not its axis 0 (a recurrent state [2, batch, 128]) "
                "declares it with batch_axis in model.inputs, one without a batch with "
                "batch_axis: null")
        if 0 in sizes:
            raise DataError(f"{where}: the batch has 0 rows",
                            "drop empty batches from the data (e.g. a last slice past the end)")
        tgt = None if target is None else to_numpy(target)
        if tgt is not None and tgt.ndim and sizes and tgt.shape[0] not in sizes:
            raise DataError(
                f"{where}: target has {tgt.shape[0]} rows, inputs have {sizes.pop()}",
                "targets must line up with the inputs' batch axis (the target's axis 0)",
            )
        return Batch(named, tgt, {s.name: s.batch_axis for s in self.inputs})

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
        if a.ndim != len(spec.shape):
            declared = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            raise DataError(
                f"{where}: input {spec.name!r} has rank {a.ndim} (shape {list(a.shape)}), the "
                f"recipe declares rank {len(spec.shape)} {declared}"
                + (" (a scalar)" if not spec.shape else ""),
                "every batch must give each input the declared number of axes; fix "
                "model.inputs in the recipe or the data",
            )
        ok = all(
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
    the declared size when every batch axis is fixed (``[16, ...]``)."""
    batch = [s.batch_dim for s in specs if s.batch_axis is not None]
    fixed = {d for d in batch if isinstance(d, int)}
    if len(fixed) != 1 or any(isinstance(d, str) for d in batch):
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


@dataclass(frozen=True)
class LatencyShape:
    """The size of each symbolic (non-batch) axis latency is measured at, where each came
    from (``recipe``: measure.dims; ``median``: the median over the eval batches), and each
    input's shape at batch 1."""

    dims: dict[str, int]
    source: dict[str, str]
    inputs: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"dims": dict(self.dims), "source": dict(self.source),
                "inputs": {k: list(v) for k, v in self.inputs.items()}}

    def describe(self) -> str:
        """``seq=41 (median of the eval batches)``, or "" when there is no symbolic axis."""
        return ", ".join(
            f"{k}={v}" + (" (median of the eval batches)" if self.source[k] == "median"
                          else "") for k, v in self.dims.items())


def latency_shape(specs: Sequence[InputSpec], batches: Sequence[Batch],
                  given: Mapping[str, int] | None = None) -> LatencyShape:
    """The latency shape: ``given`` (the recipe's measure.dims) for the axes it names, the
    median size over ``batches`` (the lower middle one, a size the data really has) for the
    other symbolic axes."""
    given = dict(given or {})
    seen: dict[str, list[int]] = {}
    for b in batches:
        this: dict[str, int] = {}
        for s in specs:
            a = b.inputs.get(s.name)
            if a is None or a.ndim != len(s.shape):
                continue
            for axis, name in s.symbolic_axes.items():
                this.setdefault(name, int(a.shape[axis]))
        for name, n in this.items():
            seen.setdefault(name, []).append(n)
    dims, source = {}, {}
    for s in specs:
        for name in s.symbolic_axes.values():
            if name in dims:
                continue
            if name in given:
                dims[name], source[name] = int(given[name]), "recipe"
            elif seen.get(name):
                sizes = sorted(seen[name])
                dims[name], source[name] = sizes[(len(sizes) - 1) // 2], "median"
    shapes = {}
    for s in specs:
        shape = []
        for axis, d in enumerate(s.shape):
            if axis == s.batch_axis:
                shape.append(1)
            elif isinstance(d, str):
                shape.append(dims.get(d, 1))
            else:
                shape.append(d)
        shapes[s.name] = shape
    return LatencyShape(dims, source, shapes)


def conform(specs: Sequence[InputSpec], batch: Batch, dims: Mapping[str, int]) -> Batch:
    """``batch`` at the latency shape: each symbolic axis ``dims`` names is cropped at its
    end, or padded at its end with zeros (the padding id of most tokenizers, and "masked"
    in an attention mask)."""
    inputs = {}
    for s in specs:
        a = batch.inputs[s.name]
        if a.ndim == len(s.shape):
            for axis, name in s.symbolic_axes.items():
                want = dims.get(name)
                if want is None or a.shape[axis] == want:
                    continue
                if a.shape[axis] > want:
                    a = take_rows(a, axis, slice(0, want))
                else:
                    pad = [(0, 0)] * a.ndim
                    pad[axis] = (0, want - a.shape[axis])
                    a = np.pad(a, pad)
        inputs[s.name] = a
    return Batch(inputs, batch.target, batch.axes)


def feeds_for_batch(specs: Sequence[InputSpec], batches: Sequence[Batch], bs: int,
                    dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Real eval samples at batch size ``bs`` and the latency shape ``dims`` (default: the
    median over ``batches``, :func:`latency_shape`), repeating samples if the data is
    smaller. Each batch is brought to that shape before any is joined, so batches of
    different lengths never meet in one concatenation; an input without a batch axis (a
    scalar, a shared table) is fed as the first batch has it."""
    if dims is None:
        dims = latency_shape(specs, batches).dims
    picked, n = [], 0
    for b in batches:
        picked.append(conform(specs, b, dims))
        n += picked[-1].size
        if n >= bs:
            break
    whole = join(picked)
    if whole.size < bs:
        whole = join([whole] * (bs // whole.size + 1))
    whole = whole.head(bs)
    return {s.name: np.asarray(whole.inputs[s.name], order="C") for s in specs}
