"""`compactor inspect MODEL.onnx`: what is in an ONNX model. Needs no torch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compactor.cli.options import dim_option


def describe_model(path: Path, dims: dict[str, int]) -> dict:
    from compactor.measure.bench import feed_shapes
    from compactor.measure.macs import SUBGRAPH_OPS, all_graphs, iter_nodes, mac_count
    from compactor.measure.shapes import check_dim_names, defaulted, dim_example, dynamic_axes
    from compactor.measure.size import param_count, size_bytes

    model = _load(path)
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    inputs = [_tensor(i) for i in graph_inputs]
    specs = [_spec(i) for i in graph_inputs]
    check_dim_names(dims, specs)
    # the MAC count is per sample: the batch at 1, like every axis --dim leaves unset
    shapes, used = feed_shapes(specs, 1, dims)
    macs = mac_count(model, shapes)
    axes = dynamic_axes(specs)
    left = defaulted(specs, dims)
    guidance = None
    if macs.total is None and left:
        guidance = _guidance(model, specs, dims, left, macs.reason)
    nodes = sum(1 for _ in iter_nodes(model.graph))
    return {
        "file": str(path),
        "size_bytes": size_bytes(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": inputs,
        "outputs": [_tensor(o) for o in model.graph.output],
        "nodes": nodes,
        "subgraph_nodes": nodes - len(model.graph.node),
        "subgraphs": len(all_graphs(model.graph)) - 1,
        "control_flow": sorted({n.op_type for _, n in iter_nodes(model.graph)
                                if n.op_type in SUBGRAPH_OPS}),
        "op_histogram": _op_histogram(model),
        "params": param_count(model),
        "macs": macs.total,
        "macs_reason": macs.reason,
        "macs_notes": list(macs.notes),
        "macs_at": used,
        "dynamic_axes": [{"name": a.key, "where": list(a.where), "named": a.named,
                          "batch": a.batch} for a in axes],
        "dim_hint": guidance or (
            f"symbolic axes counted at size 1: set the sizes you serve at with "
            f"{dim_example(left)}" if left else None),
    }


def _guidance(model, specs, dims: dict[str, int], left, reason: str | None) -> str:
    """Why the count failed at the default size 1 of some axes, in one line, and which
    ``--dim`` to pass: a common size the model runs at, where one does."""
    from compactor.measure.bench import TRIAL_SIZES, suggest_sizes
    from compactor.measure.shapes import dim_example

    names = ", ".join(a.key for a in left)
    try:
        sizes = suggest_sizes(model.SerializeToString(), specs, dims)
    except ValueError:  # a model over protobuf's 2 GB: no trial runs
        sizes = None
    runs = (f" (it runs at {next(iter(sizes.values()))})" if sizes else
            f" (it ran at none of {', '.join(map(str, TRIAL_SIZES))} either)")
    return (f"MACs need sizes for the symbolic axes {names}, which were counted at 1: "
            f"pass {dim_example(left, sizes)}{runs}")


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


def _spec(vi) -> tuple[str, list, object]:
    """``(name, shape, numpy dtype)`` as bench reads inputs: an int per fixed axis, the
    name of a named symbolic axis, None for an unnamed one."""
    import onnx

    tt = vi.type.tensor_type
    shape: list = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                   else (d.dim_param or None) for d in tt.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).type
    except (KeyError, ValueError, TypeError):
        dtype = None
    return vi.name, shape, dtype


def _tensor(vi) -> dict:
    import onnx

    tt = vi.type.tensor_type
    return {
        "name": vi.name,
        "shape": [d.dim_param or (d.dim_value if d.dim_value > 0 else "?")
                  for d in tt.shape.dim],
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        if tt.elem_type else "?",
    }


def _op_histogram(model) -> dict[str, int]:
    """Op counts (subgraphs included), most frequent first; ops outside the default domain
    by domain.op."""
    from compactor.measure.macs import iter_nodes

    ops: dict[str, int] = {}
    for _, n in iter_nodes(model.graph):
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@dim_option("Size of a dynamic axis for the MAC count (default 1), e.g. --dim seq=128.",
            example="--dim batch=8 --dim seq=128")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model: Path, dims: dict[str, int], as_json: bool) -> None:
    """Inputs/outputs, op histogram, parameters, size and MACs of an ONNX MODEL."""
    info = describe_model(model, dims)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    _render(info)


def _render(info: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from compactor.report.format import fmt_bytes, fmt_count

    c = Console()
    sub = (f" ({info['subgraph_nodes']} in {info['subgraphs']} subgraph(s) of "
           f"{'/'.join(info['control_flow'])})" if info["subgraphs"] else "")
    c.print(f"[bold]{escape(info['file'])}[/]  {fmt_bytes(info['size_bytes'])}, "
            f"{fmt_count(info['params'])} params, {info['nodes']} nodes{sub}, "
            f"opsets {escape(str(info['opsets']))}")
    io = Table("", "name", "shape", "dtype", title="inputs and outputs", title_justify="left")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], escape(t["name"]), escape(str(t["shape"])), t["dtype"])
    c.print(io)
    ops = Table("op", "count", title="op histogram", title_justify="left")
    for k, v in info["op_histogram"].items():
        ops.add_row(k, str(v))
    c.print(ops)
    at = ", ".join(f"{k}={v}" for k, v in info["macs_at"].items())
    macs = (fmt_count(info["macs"]) if info["macs"] is not None
            else f"not computable ({info['macs_reason']})")
    c.print(escape(f"MACs: {macs}" + (f" (at {at})" if at else "")))
    for note in info["macs_notes"]:
        c.print(escape(f"  {note}"), style="dim")
    if info["dynamic_axes"]:
        c.print(escape("symbolic axes: " + ", ".join(
            f"{a['name']} ({', '.join(a['where']) if a['named'] else 'unnamed'})"
            + (" [batch]" if a["batch"] else "")
            for a in info["dynamic_axes"])))
    if info["dim_hint"]:
        c.print(escape(f"hint: {info['dim_hint']}"), style="yellow")
