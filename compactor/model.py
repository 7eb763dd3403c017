"""Loading the recipe's model into the baseline stage."""

from __future__ import annotations

import logging
from pathlib import Path

from compactor._imports import call_user, resolve_callable
from compactor.errors import ModelLoadError
from compactor.spec import DTYPES, InputSpec, ModelSpec
from compactor.stage import Stage

log = logging.getLogger(__name__)



def load_model(spec: ModelSpec, base_dir: Path) -> tuple[Stage, list[Path]]:
    """The baseline stage, and the files it was made from (for the manifest's hashes)."""
    if spec.onnx:
        path = _existing(spec.onnx, base_dir, "model.onnx")
        _check_onnx(path)
        return Stage("baseline", "onnx", onnx_path=path, lineage=("baseline",)), [path]
    import torch

    if spec.torchscript:
        path = _existing(spec.torchscript, base_dir, "model.torchscript")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch.jit raises many types for a bad file
            raise ModelLoadError(
                f"model.torchscript: cannot load {path.name}: {str(e).splitlines()[0]}",
                "save it with torch.jit.save(torch.jit.script(model) or trace, path)",
            ) from e
        return Stage("baseline", "torch", module=module.eval(), lineage=("baseline",)), [path]

    fn, source = resolve_callable(spec.factory, base_dir, ModelLoadError, "model.factory")
    module = call_user(fn, ModelLoadError, "model.factory", **spec.args)
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"model.factory {spec.factory} returned {type(module).__name__}, not a "
            "torch.nn.Module",
            "the factory must build and return the model",
        )
    files = [source] if source else []
    if spec.weights:
        wpath = _existing(spec.weights, base_dir, "model.weights")
        _load_weights(module, wpath)
        files.append(wpath)
    return Stage("baseline", "torch", module=module.eval(), lineage=("baseline",)), files


def _existing(ref: str, base_dir: Path, field: str) -> Path:
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise ModelLoadError(
            f"{field}: file not found: {p}",
            "paths in a recipe are relative to the recipe file's folder",
        )
    return p


def _load_weights(module, path: Path) -> None:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ModelLoadError(
            f"model.weights: cannot read {path.name}: {str(e).splitlines()[0][:200]}",
            "save the weights with torch.save(model.state_dict(), path)",
        ) from e
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ModelLoadError(
            f"model.weights: {path.name} holds a {type(state).__name__}, not a state_dict",
            "save the weights with torch.save(model.state_dict(), path)",
        )
    try:
        result = module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ModelLoadError(
            f"model.weights: {path.name} does not fit the model: {' '.join(lines[1:3])[:300]}",
            "are the factory's args the same as when the weights were saved?",
        ) from e
    del result


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx's checker raises several types
        raise ModelLoadError(
            f"model.onnx: {path.name} is not a valid ONNX model: {str(e).splitlines()[0][:200]}",
            "re-export it, or check it with `python -m onnx.checker`",
        ) from e


def onnx_input_specs(path: Path) -> tuple[InputSpec, ...]:
    """Input specs read from an ONNX file, for recipes that give none.

    An unnamed dynamic axis gets a stable name: ``batch`` at axis 0, else
    ``<input>_dim<k>``. The batch axis of each input is where it has the batch's name (the
    name most inputs carry at axis 0): axis 1 for a recurrent state ``[2, batch, 128]``;
    none for a scalar; else axis 0."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}
    found: list[tuple[str, list[int | str], str]] = []
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                named = d.HasField("dim_param") and d.dim_param.isidentifier()
                name = d.dim_param if named else None
                dims.append(name or ("batch" if i == 0 else f"{inp.name}_dim{i}"))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        if dtype not in DTYPES:
            raise ModelLoadError(
                f"model.onnx: input {inp.name!r} has type {dtype}, which compactor cannot feed",
                f"supported input types: {', '.join(DTYPES)}",
            )
        found.append((inp.name, dims, dtype))
    firsts = [dims[0] for _, dims, _ in found if dims and isinstance(dims[0], str)]
    batch = max(dict.fromkeys(firsts), key=firsts.count) if firsts else None  # ties: first
    specs = []
    for name, dims, dtype in found:
        axis: int | None = 0 if dims else None
        if batch is not None and batch in dims:
            axis = dims.index(batch)
        specs.append(InputSpec(name=name, shape=tuple(dims), dtype=dtype, batch_axis=axis))
    return tuple(specs)
