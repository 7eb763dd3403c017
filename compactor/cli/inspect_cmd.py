"""`compactor inspect MODEL.onnx`: what is in an ONNX model. Needs no torch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compactor.cli.options import dim_option


def describe_model(path: Path, dims: dict[str, int]) -> dict:
    from compactor.measure.macs import mac_count
    from compactor.measure.size import param_count, size_bytes

    model = _load(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [_tensor(i) for i in model.graph.input if i.name not in inits]
    shapes, used = _mac_shapes(inputs, dims)
    macs = mac_count(model, shapes)
    return {
        "file": str(path),
        "size_bytes": size_bytes(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": inputs,
        "outputs": [_tensor(o) for o in model.graph.output],
        "nodes": len(model.graph.node),
        "op_histogram": _op_histogram(model),
        "params": param_count(model),
        "macs": macs.total,
        "macs_reason": macs.reason,
        "macs_at": used,
    }


def _load(path: Path):
    import onnx

    from compactor.errors import ModelLoadError

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises many types for a bad file
        raise ModelLoadError(f"{path.name} is not an ONNX model: {str(e)[:200]}",
                             "inspect takes an .onnx file") from e
    # Protobuf parses an empty file (and some other bytes) as an empty ModelProto.
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{path.name} is not an ONNX model: it has no IR version or graph",
                             "inspect takes an .onnx file")
    return model


def _tensor(vi) -> dict:
    import onnx

    tt = vi.type.tensor_type
    return {
        "name": vi.name,
        "shape": [d.dim_param or d.dim_value or "?" for d in tt.shape.dim],
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        if tt.elem_type else "?",
    }


def _op_histogram(model) -> dict[str, int]:
    """Op counts, most frequent first; ops outside the default domain by domain.op."""
    ops: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def _mac_shapes(inputs: list[dict], dims: dict[str, int]
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Concrete input shapes for the MAC count (a dynamic axis: its ``--dim``, else 1),
    and the size used for each dynamic axis."""
    shapes = {}
    used: dict[str, int] = {}
    for i in inputs:
        shape = []
        for d in i["shape"]:
            if isinstance(d, int) and d > 0:
                shape.append(d)
            else:
                v = dims.get(str(d), 1)
                used[str(d)] = v
                shape.append(v)
        shapes[i["name"]] = tuple(shape)
    return shapes, used


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@dim_option("Size of a dynamic axis for the MAC count (default 1), e.g. --dim seq=128.",
            example="--dim batch=8 --dim seq=128")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model: Path, dims: dict[str, int], as_json: bool) -> None:
    """Inputs/outputs, op histogram, parameters, size and MACs of an ONNX MODEL."""
    from compactor.errors import UsageError

    info = describe_model(model, dims)
    unknown = sorted(set(dims) - set(info["macs_at"]))
    if unknown:
        axes = ", ".join(info["macs_at"]) or "none"
        raise UsageError(f"--dim: the model has no dynamic axis named {', '.join(unknown)}",
                         f"its dynamic axes: {axes}")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    _render(info)


def _render(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from compactor.report.format import fmt_bytes, fmt_count

    c = Console()
    c.print(f"[bold]{info['file']}[/]  {fmt_bytes(info['size_bytes'])}, "
            f"{fmt_count(info['params'])} params, {info['nodes']} nodes, opsets {info['opsets']}")
    io = Table("", "name", "shape", "dtype", title="inputs and outputs", title_justify="left")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], t["name"], str(t["shape"]), t["dtype"])
    c.print(io)
    ops = Table("op", "count", title="op histogram", title_justify="left")
    for k, v in info["op_histogram"].items():
        ops.add_row(k, str(v))
    c.print(ops)
    at = ", ".join(f"{k}={v}" for k, v in info["macs_at"].items())
    macs = (fmt_count(info["macs"]) if info["macs"] is not None
            else f"not computable ({info['macs_reason']})")
    c.print(f"MACs: {macs}" + (f" (at {at})" if at else ""))
