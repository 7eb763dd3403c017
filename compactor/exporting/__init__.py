"""Export machinery: torch → ONNX with the dynamo exporter (legacy fallback), output naming,
opset checks, onnxsim kept only when it changes nothing, and numeric checks against torch.

The ``export`` pass, the pipeline (torch stages are exported for measurement with the
recipe's export settings), quantization, pruning and sensitivity all use this one API.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from compactor.errors import ModelLoadError, PassError
from compactor.spec import PassConfig

if TYPE_CHECKING:
    from compactor.data import Batch
    from compactor.spec import InputSpec

log = logging.getLogger(__name__)


class ExportConfig(PassConfig):
    opset: int = Field(default=18, ge=13, le=23, description="ONNX opset to export at")
    exporter: Literal["auto", "dynamo", "legacy"] = Field(
        default="auto", description="auto: dynamo, falling back to legacy when it fails"
    )
    simplify: bool = Field(default=True, description="run onnxsim, keep it if outputs match")
    tolerance: float = Field(
        default=1e-3,
        gt=0,
        description="largest allowed |onnx - torch| relative to the output's magnitude",
    )
    check_batches: int = Field(default=4, ge=1, description="eval batches for numeric checks")



@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' prints, warnings and log lines: the library never prints."""
    # "" is the root logger: ORT's quantization tools log their advice there
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "torch", "")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line, without terminal colour codes; empty messages are common
    (a bare ``assert`` in a model's forward)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0][:limit] if text else ""


def use_kwargs(module, specs: Sequence[InputSpec]) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return len(specs) > 1 and all(s.name in params for s in specs)


def to_torch(specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray]) -> list:
    import torch

    return [torch.from_numpy(np.asarray(arrays[s.name], order="C")) for s in specs]


def call_module(module, specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray]):
    """Run ``module`` on named numpy inputs, passing them the way the exporter will."""
    import torch

    tensors = to_torch(specs, arrays)
    with torch.inference_mode():
        if use_kwargs(module, specs):
            return module(**{s.name: t for s, t in zip(specs, tensors)})
        return module(*tensors)


def flatten_outputs(out: Any) -> list[np.ndarray]:
    """Tensors of a model's output, in the order the ONNX exporters emit them."""
    if hasattr(out, "detach"):
        return [out.detach().cpu().numpy()]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return [a for v in values for a in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [a for v in out for a in flatten_outputs(v)]
    if out is None:
        return []
    return [np.asarray(out)]


def example_inputs(specs: Sequence[InputSpec], batch: Batch) -> dict[str, np.ndarray]:
    """Real inputs for tracing, with every dynamic axis at least 2 long and every fixed axis
    at its declared size.

    torch.export specializes axes of size 0 or 1, which would freeze a dynamic axis; a
    dynamic batch axis (the input's declared ``batch_axis``, e.g. 1 for a recurrent state
    ``[2, batch, 128]``) is cut to 2 samples to keep tracing cheap, a fixed one
    (``[16, ...]``) is traced at its size, which the data already has (batches are checked
    against it). A scalar or an input without a batch axis is passed as the data has it.
    """
    from compactor.data import take_rows

    out = {}
    for s in specs:
        a = batch.inputs[s.name]
        if s.batch_axis is not None and isinstance(s.batch_dim, str) and a.ndim == len(s.shape):
            a = take_rows(a, s.batch_axis, slice(0, 2))
        for axis in s.dynamic_axes:
            if axis < a.ndim and a.shape[axis] < 2:
                reps = [1] * a.ndim
                reps[axis] = 2
                a = np.tile(a, reps)
        out[s.name] = a
    return out


def default_output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def export_module(
    module,
    specs: Sequence[InputSpec],
    batch: Batch,
    path: Path,
    cfg: ExportConfig,
    output_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Export ``module`` to ``path``; return what happened, for the stage record."""
    import torch

    example = example_inputs(specs, batch)
    try:
        n_out = len(flatten_outputs(call_module(module, specs, example)))
    except Exception as e:  # noqa: BLE001 - the user's forward() may raise anything
        raise ModelLoadError(
            f"the model fails on inputs of the declared shape: {type(e).__name__}: "
            f"{first_line(e)}",
            "check model.inputs (names, shapes, dtypes) against what forward() expects",
        ) from e
    names = list(output_names) or default_output_names(n_out)
    tensors = to_torch(specs, example)
    kw = use_kwargs(module, specs)
    args: tuple = () if kw else tuple(tensors)
    kwargs = {s.name: t for s, t in zip(specs, tensors)} if kw else None
    input_names = [s.name for s in specs]
    record: dict[str, Any] = {"requested_opset": cfg.opset}

    attempts = ["dynamo", "legacy"] if cfg.exporter == "auto" else [cfg.exporter]
    failures: dict[str, str] = {}
    for exporter in attempts:
        try:
            with quiet():
                if exporter == "dynamo":
                    dims: dict[str, Any] = {}
                    shapes = [
                        {
                            ax: dims.setdefault(n, torch.export.Dim(n))
                            for ax, n in s.dynamic_axes.items()
                        }
                        for s in specs
                    ]
                    dynamic_shapes = (
                        {s.name: sh for s, sh in zip(specs, shapes)} if kw else tuple(shapes)
                    )
                    torch.onnx.export(
                        module, args, str(path), kwargs=kwargs, dynamo=True,
                        dynamic_shapes=dynamic_shapes, input_names=input_names,
                        opset_version=cfg.opset,
                        external_data=False, verbose=False, optimize=True,
                    )
                    # Named afterwards: the dynamo exporter rejects an output name that an
                    # inner value already has (e.g. ``embedding`` in a BERT model).
                    rename_outputs(path, names)
                else:
                    torch.onnx.export(
                        module, args, str(path), kwargs=kwargs, dynamo=False,
                        dynamic_axes={s.name: s.dynamic_axes for s in specs if s.dynamic_axes},
                        input_names=input_names, output_names=names,
                        opset_version=min(cfg.opset, 20), do_constant_folding=True,
                    )
            _check_and_fix_opset(path, cfg.opset, record)
            record["exporter"] = exporter
            break
        except PassError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters fail in many ways
            failures[exporter] = ": ".join(filter(None, (type(e).__name__, first_line(e))))
            log.info("exporter %s failed: %s", exporter, failures[exporter])
            path.unlink(missing_ok=True)
    else:
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise PassError(
            f"export: no exporter could export the model ({detail})",
            "export.exporter: legacy may help for models with data-dependent control flow; "
            "run with --debug for the traceback",
        )
    if failures:
        record["fallback_reason"] = failures
    return record


def rename_outputs(path: Path, names: Sequence[str]) -> None:
    """Give the graph's outputs ``names``; an inner value already called so is renamed."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    current = [o.name for o in graph.output]
    if len(names) != len(current):
        raise PassError(
            f"export: the model has {len(current)} output(s) and {len(names)} name(s) were "
            f"given ({', '.join(names)})",
            "model.outputs must list one name per output of forward()",
        )
    mapping = {old: new for old, new in zip(current, names) if old != new}
    if not mapping:
        return
    taken = {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for new in list(mapping.values()):  # move inner values out of the way
        if new in taken and new not in mapping:
            k = 0
            while f"{new}__{k}" in taken:
                k += 1
            mapping[new] = f"{new}__{k}"
    _rename_values(graph, mapping)
    onnx.save(model, str(path))


def _rename_values(graph, mapping: dict[str, str]) -> None:
    """Rename values everywhere in ``graph``, subgraphs included (all at once)."""
    from onnx import AttributeProto

    def swap(seq) -> None:
        for i, v in enumerate(seq):
            if v in mapping:
                seq[i] = mapping[v]

    for node in graph.node:
        swap(node.input)
        swap(node.output)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _rename_values(attr.g, mapping)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_values(g, mapping)
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]


def _check_and_fix_opset(path: Path, opset: int, record: dict[str, Any]) -> None:
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got is not None and got != opset:
        try:
            converted = version_converter.convert_version(model, opset)
            onnx.checker.check_model(converted)
            onnx.save(converted, str(path))
            record["opset_converted_from"] = got
            got = opset
        except Exception as e:  # noqa: BLE001 - keep the exporter's opset, and say so
            record["opset_note"] = f"exporter wrote opset {got}; converting to {opset} failed: {e}"
    record["opset"] = got


def run_onnx(path_or_session, batches: Sequence[Batch]) -> list[list[np.ndarray]]:
    """All outputs of an ONNX model on each batch."""
    from compactor.measure.latency import session

    sess = path_or_session
    if isinstance(path_or_session, (str, Path)):
        sess = session(Path(path_or_session))
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in b.inputs.items() if k in names}) for b in batches]


def simplify_checked(path: Path, batches: Sequence[Batch]) -> dict[str, Any]:
    """Simplify in place with onnxsim when the result matches the original on real data."""
    import onnx

    try:
        import onnxsim
    except ImportError:
        return {"applied": False, "reason": "onnxsim is not installed"}
    original = onnx.load(str(path))
    try:
        with quiet():
            simplified, ok = onnxsim.simplify(original)
    except Exception as e:  # noqa: BLE001 - recorded: onnxsim not applied, and why
        return {"applied": False, "reason": f"onnxsim failed: {str(e).splitlines()[0][:200]}"}
    if not ok:
        return {"applied": False, "reason": "onnxsim's own check failed"}
    tmp = path.with_suffix(".sim.onnx")
    onnx.save(simplified, str(tmp))
    try:
        ref = run_onnx(path, batches)
        got = run_onnx(tmp, batches)
    except Exception as e:  # noqa: BLE001 - recorded: onnxsim not applied, and why
        tmp.unlink(missing_ok=True)
        return {"applied": False, "reason": f"simplified model does not run: {e}"}
    err = max(
        float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        for ra, rb in zip(ref, got)
        for a, b in zip(ra, rb)
    )
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0 for r in ref for a in r)
    if err > 1e-4 * max(1.0, scale):
        tmp.unlink(missing_ok=True)
        return {"applied": False, "reason": f"outputs changed by {err:.3g}", "max_abs_error": err}
    nodes_before, nodes_after = len(original.graph.node), len(simplified.graph.node)
    if nodes_after > nodes_before:
        # onnxsim sometimes unrolls shape logic; a bigger graph is not a simplification
        tmp.unlink(missing_ok=True)
        return {"applied": False, "reason": f"it grew the graph ({nodes_before} → "
                f"{nodes_after} nodes)", "max_abs_error": err}
    tmp.replace(path)
    return {"applied": True, "nodes_before": nodes_before, "nodes_after": nodes_after,
            "max_abs_error": err}


def max_abs_error(module, path: Path, specs: Sequence[InputSpec], batches: Sequence[Batch]):
    """Largest |onnx - torch| over the outputs on real batches, and relative to scale."""
    onnx_out = run_onnx(path, batches)
    err = 0.0
    scale = 0.0
    for b, got in zip(batches, onnx_out):
        want = flatten_outputs(call_module(module, specs, b.inputs))
        for w, g in zip(want, got):
            if w.shape != g.shape:
                raise PassError(
                    f"export: ONNX output shape {list(g.shape)} differs from torch's "
                    f"{list(w.shape)}",
                    "a dynamic axis may have been frozen; name it in model.inputs' shape",
                )
            if w.size:
                err = max(err, float(np.max(np.abs(w.astype(np.float64) - g))))
                scale = max(scale, float(np.max(np.abs(w))))
    return {"max_abs_error": err, "relative_error": err / max(1.0, scale),
            "checked_samples": sum(b.size for b in batches)}
