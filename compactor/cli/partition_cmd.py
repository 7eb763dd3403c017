"""`compactor partition MODEL.onnx`: on device, full offload, or a split model? Needs no
torch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compactor.cli.options import dim_option


def _load_npz(path: Path) -> tuple[list[dict], object]:
    import numpy as np

    from compactor.errors import DataError

    if not path.is_file():
        raise DataError(f"data file not found: {path}", "give an .npz keyed by input name")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad file
        raise DataError(f"cannot read {path.name} as .npz: {str(e)[:200]}",
                        "save the inputs with numpy.savez(path, input_name=array, "
                        "target=labels)") from e
    targets = None
    for key in ("target", "targets", "label", "labels"):
        if key in arrays:
            targets = arrays.pop(key)
            break
    if not arrays:
        raise DataError(f"{path.name} holds no input arrays", "key the arrays by input name")
    return [arrays], targets


def _rename_single_input(batches: list[dict], model: Path) -> list[dict]:
    """An .npz with one array feeds a one-input model whatever the array's name."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) == 1 and len(batches[0]) == 1 and names[0] not in batches[0]:
        return [{names[0]: next(iter(b.values()))} for b in batches]
    return batches


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--device", "device", metavar="PROFILE",
              help="Device profile: a built-in name or a profile .yaml.")
@click.option("--server", metavar="PROFILE", help="Server profile.")
@click.option("--topology", type=click.Path(dir_okay=False, path_type=Path),
              help="A topology .yaml: a chain of devices and its links, or peer devices on "
                   "one link (instead of --device/--server; see docs/partition.md).")
@click.option("--peers", type=click.IntRange(1, 64), metavar="K",
              help="Peers topology: split across exactly K peers (default: the planner "
                   "chooses).")
@click.option("--uplink", metavar="BANDWIDTH",
              help="Uplink bandwidth, e.g. 10Mbps, 500kbps, 1.5MB/s (default: the device "
                   "profile's network.uplink_mbps).")
@click.option("--rtt", metavar="TIME",
              help="Round-trip time, e.g. 40ms (default: the device profile's "
                   "network.rtt_ms).")
@click.option("--objective", type=click.Choice(["latency", "device-energy", "throughput"]),
              default="latency", show_default=True,
              help="throughput: the pipelined rate of a request stream (--topology only).")
@click.option("--keep-input-on-device", is_flag=True,
              help="Never send the raw input (privacy): only on-device or a split.")
@click.option("--compress-transfer", type=click.Choice(["none", "int8"]), default="none",
              show_default=True, help="int8: quantize the tensors sent at the cut (4x fewer "
                                      "bytes) and report the accuracy effect; with a chain "
                                      "--topology, at every inner cut.")
@click.option("--device-slowdown", type=float, metavar="X",
              help="Device time = this host's time x X (an estimate).")
@click.option("--device-latency-ms", type=float, metavar="MS",
              help="The full model's p50 on the real device (from `compactor bench` there): "
                   "sets the device slowdown.")
@click.option("--server-slowdown", type=float, metavar="X")
@click.option("--server-latency-ms", type=float, metavar="MS")
@click.option("--radio-power", "radio_power_w", type=float, metavar="W",
              help="Device radio power while sending/receiving (device-energy objective; "
                   "default: the device's power_w).")
@click.option("--batch-size", type=int, help="Default: the device profile's first batch size.")
@dim_option("Size of a dynamic input axis other than the batch, e.g. --dim seq=128.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="An .npz of real inputs keyed by input name (optional 'target' labels), "
                   "for verification and the int8 accuracy effect.")
@click.option("--max-cut-tensors", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Most tensors a cut may send (residual connections add one each).")
@click.option("--refine", type=click.IntRange(0, 50), default=3, show_default=True,
              help="Best splits re-timed as real head/tail models.")
@click.option("--simulate", is_flag=True,
              help="Also run the plan in two processes over a shaped loopback link and "
                   "time it.")
@click.option("--requests", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Timed requests per simulated option.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for head.onnx, tail.onnx, plan.json, chart.svg "
                   "(default: out/<model>-partition).")
@click.option("--json", "as_json", is_flag=True, help="Print plan.json.")
def partition(model: Path, device: str | None, server: str | None, topology: Path | None,
              peers: int | None, uplink: str | None, rtt: str | None,
              objective: str, keep_input_on_device: bool, compress_transfer: str,
              device_slowdown: float | None, device_latency_ms: float | None,
              server_slowdown: float | None, server_latency_ms: float | None,
              radio_power_w: float | None, batch_size: int | None, dims: dict[str, int],
              data: Path | None, max_cut_tensors: int, refine: int, simulate: bool,
              requests: int, output: Path | None, as_json: bool) -> None:
    """Plan where MODEL runs: all on the device, full offload to the server, or split
    between them at the cut that costs least, by measurement.

    Writes head.onnx and tail.onnx (the split), plan.json (the choice, every cost term, the
    alternatives) and chart.svg (latency against bandwidth, with the crossovers).

    With --topology, plans across a chain of devices (one part per device) or a spatial
    split across peer devices (one tile each, the rest on the first).
    """
    from compactor.errors import ModelLoadError

    if topology is not None or peers is not None:
        _multi(model, topology, peers, device, server, objective, batch_size, dims, data,
               max_cut_tensors, refine, simulate, requests, output, as_json,
               compress_transfer)
        return
    if device is None or server is None or objective == "throughput":
        from compactor.errors import UsageError

        raise UsageError("--device and --server are required" if objective != "throughput"
                         else "--objective throughput plans a chain: it needs --topology",
                         "give --device PROFILE --server PROFILE, or --topology FILE")
    spec = _spec({
        "device": device, "server": server, "uplink": uplink, "rtt": rtt,
        "objective": objective, "keep_input_on_device": keep_input_on_device,
        "compress_transfer": compress_transfer, "device_slowdown": device_slowdown,
        "device_latency_ms": device_latency_ms, "server_slowdown": server_slowdown,
        "server_latency_ms": server_latency_ms, "radio_power_w": radio_power_w,
        "batch_size": batch_size, "dims": dims, "max_cut_tensors": max_cut_tensors,
        "refine": refine,
    })
    if not model.is_file():
        raise ModelLoadError(f"model file not found: {model}", "check the path")
    batches, targets = (None, None)
    if data is not None:
        batches, targets = _load_npz(data)
        batches = _rename_single_input(batches, model)
    out_dir = output or Path("out") / f"{model.stem}-partition"

    from compactor.cli.render import RichProgress, console
    from compactor.partition.planner import plan_partition

    err_console = console(stderr=True)
    with RichProgress(err_console) as progress:
        result = plan_partition(model, spec, data=batches, targets=targets, out_dir=out_dir,
                                simulate=simulate, simulate_requests=requests,
                                progress=progress)
    if as_json:
        click.echo(json.dumps(result.plan, indent=2, default=str))
        return
    _render(result, out_dir)


def _spec(fields: dict):
    """The options as a PartitionSpec; a bad value is a usage error naming its option."""
    from pydantic import ValidationError

    from compactor.errors import UsageError
    from compactor.partition.config import PartitionSpec
    from compactor.partition.units import parse_bandwidth, parse_duration_ms

    if fields["uplink"] is not None:
        parse_bandwidth(fields["uplink"], "--uplink")
    if fields["rtt"] is not None:
        parse_duration_ms(fields["rtt"], "--rtt")
    try:
        return PartitionSpec.model_validate(fields)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        opt = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "an option"
        raise UsageError(f"{opt}: {err['msg'].removeprefix('Value error, ')}",
                         "see `compactor partition --help`") from None


def _render(result, out_dir: Path) -> None:
    from compactor.cli.render import console

    plan = result.plan
    c = console()
    est = " [yellow](estimate)[/]" if plan["estimate"] else ""
    link = plan["link"]
    table, hidden = _options_table(plan)
    c.print(table)
    if hidden:
        c.print(f"[dim]{hidden} more splits in plan.json; ~ = timed as a sum of segments[/]")
    ch = plan["choice"]
    c.print(f"[bold]plan: {ch['option']}[/] — {ch['description']}: "
            f"{ch['total_ms']:.2f} ms end to end{est}")
    for side in ("device", "server"):
        c.print(f"  {plan[side]['label']}")
    by = "" if plan["crossovers_by"] == "latency" else f" (by {plan['crossovers_by']})"
    for x in plan["crossovers"]:
        c.print(f"  best choice{by} changes at {x['uplink']}: {x['from']} → {x['to']}")
    if not plan["crossovers"] and link["source"] != "not needed":
        c.print(f"  the best choice{by} is the same at every uplink from 100 kbps to 1 Gbps")
    _render_checks(c, plan)
    for n in plan["notes"]:
        c.print(f"[yellow]note[/] {n}")
    files = ", ".join(plan.get("files", {}).values())
    c.print(f"wrote {out_dir}: {files}")


def _options_table(plan: dict):
    """The options, best first (every non-split one, the first 8 splits); returns the
    table and how many splits it leaves out."""
    from rich.table import Table

    from compactor.report.format import fmt_bytes

    energy = plan["power"] is not None
    link = plan["link"]
    over = ("no network needed" if link["source"] == "not needed" else
            f"over {link['uplink']}, rtt {link['rtt_ms']:g} ms")
    t = Table(title=f"{Path(plan['model']['file']).name}: options {over}, batch "
                    f"{plan['model']['batch_size']} (best first, by {plan['objective']})",
              title_justify="left")
    for h in ("option", "device ms", "upload ms", "rtt ms", "server ms", "reply ms",
              "total ms", "sent") + (("device J",) if energy else ()):
        t.add_column(h, justify="left" if h == "option" else "right", no_wrap=True)
    alts = plan["alternatives"]
    shown = alts[:8] + [a for a in alts[8:] if a["kind"] != "split"]
    for a in shown:
        mark = "★ " if a["option"] == plan["choice"]["option"] else ""
        src = "" if "segment sum" not in (a["device_source"], a["server_source"]) else " ~"
        row = [f"{mark}{a['option']}{src}", f"{a['device_ms']:.2f}", f"{a['upload_ms']:.2f}",
               f"{a['rtt_ms']:g}", f"{a['server_ms']:.2f}", f"{a['download_ms']:.2f}",
               f"{a['total_ms']:.2f}",
               "—" if a["kind"] == "on-device" else fmt_bytes(a["bytes_up"])]
        if energy:
            row.append(f"{a['device_energy_j']:.4f}")
        t.add_row(*row)
    return t, len(alts) - len(shown)


def _render_checks(c, plan: dict) -> None:
    """What was verified, int8 transfer's effect, and the simulated requests."""
    from compactor.report.format import fmt_bytes

    v = plan.get("verification")
    if v:
        ok = "[green]ok[/]" if v["passed"] else "[red]FAILED[/]"
        c.print(f"verification ({v['cut']}, {v['samples']} samples): tail(head(x)) vs model "
                f"max abs error {v['max_abs_error']:.3g} (relative {v['max_rel_error']:.3g}, "
                f"tolerance {v['tolerance']:g}) {ok}")
    comp = plan.get("compression")
    if comp:
        acc = ""
        if "accuracy_float" in comp:
            acc = (f", accuracy {comp['accuracy_float']:.4f} → "
                   f"{comp['accuracy_int8_transfer']:.4f}")
        elif "top1_agreement" in comp:
            acc = f", top-1 agreement {comp['top1_agreement']:.4f}"
        acc += _cosine(comp)
        c.print(f"int8 transfer at {comp['cut']}: {fmt_bytes(comp['bytes_float'])} → "
                f"{fmt_bytes(comp['bytes_int8'])} ({comp['bytes_ratio']:.2f}x fewer"
                f"{_per_channel([comp])}), SQNR {comp['sqnr_db']:.1f} dB{acc} on "
                f"{comp['evaluated_samples']} samples")
    for s in plan.get("simulate", []):
        emu = " (device/server speed emulated)" if s["emulated"] else ""
        c.print(f"simulate {s['option']}: measured p50 {s['measured_ms']['p50']:.2f} ms over "
                f"{s['requests']} requests, predicted {s['predicted_ms']:.2f} ms "
                f"({s['error'] * 100:+.1f}%){emu}")


def _multi(model: Path, topology: Path | None, peers: int | None, device, server,
           objective: str, batch_size, dims, data, max_cut_tensors: int, refine: int,
           simulate: bool, requests: int, output: Path | None, as_json: bool,
           compress_transfer: str = "none") -> None:
    """``--topology``: a chain of devices, or a spatial split across peers."""
    from compactor.errors import ModelLoadError, UsageError
    from compactor.partition.topology import load_topology

    if topology is None:
        raise UsageError("--peers needs --topology (a peers topology file)",
                         "see docs/partition.md, 'Several devices'")
    if device is not None or server is not None:
        raise UsageError("--topology replaces --device and --server",
                         "name the devices in the topology file")
    if objective == "device-energy":
        raise UsageError("--objective device-energy plans a device and a server",
                         "with --topology use --objective latency or throughput")
    topo = load_topology(topology)
    if peers is not None and topo.kind != "peers":
        raise UsageError(f"--peers needs a peers topology; {topology.name} is a chain",
                         "set kind: peers in the topology, or leave --peers out")
    if topo.kind == "peers" and compress_transfer != "none":
        raise UsageError(f"--compress-transfer {compress_transfer} is for a chain of devices; "
                         f"{topology.name} is a peers topology, whose tiles and strips are "
                         "sent in float32 (a spatial split must match the model exactly)",
                         "leave --compress-transfer out, or plan a chain (kind: chain)")
    if not model.is_file():
        raise ModelLoadError(f"model file not found: {model}", "check the path")
    batches, targets = None, None
    if data is not None:
        batches, targets = _load_npz(data)
        batches = _rename_single_input(batches, model)
    out_dir = output or Path("out") / f"{model.stem}-partition"

    from compactor.cli.render import RichProgress, console

    with RichProgress(console(stderr=True)) as progress:
        if topo.kind == "peers":
            from compactor.partition.spatial import SpatialOptions, plan_spatial_model

            result = plan_spatial_model(
                model, topo, SpatialOptions(objective=objective, peers=peers,
                                            batch_size=batch_size, dims=dims),
                data=batches, out_dir=out_dir, simulate=simulate,
                simulate_requests=requests, progress=progress)
        else:
            from compactor.partition.multi import ChainOptions, plan_chain_model

            result = plan_chain_model(
                model, topo, ChainOptions(objective=objective, batch_size=batch_size,
                                          dims=dims, max_cut_tensors=max_cut_tensors,
                                          refine=refine > 0,
                                          compress_transfer=compress_transfer),
                data=batches, targets=targets, out_dir=out_dir, simulate=simulate,
                simulate_requests=requests, progress=progress)
    if as_json:
        click.echo(json.dumps(result.plan, indent=2, default=str))
        return
    _render_multi(result.plan, out_dir)


def _cosine(comp: dict) -> str:
    """', cosine ≥ 0.9988' (the least over the samples); 1 − 3e-07 where four places
    would round it to 1."""
    c = comp.get("cosine_min")
    if c is None:
        return ""
    return f", cosine ≥ {c:.4f}" if c < 0.9999 or c >= 1.0 else f", cosine ≥ 1 − {1 - c:.1e}"


def _per_channel(cuts: list[dict]) -> str:
    """', per channel: 2 of 3 tensors' when any tensor sent has a scale per channel."""
    from compactor.partition.wire import per_channel_count

    counts = [per_channel_count(c.get("quantization", {})) for c in cuts]
    n, total = sum(a for a, _ in counts), sum(b for _, b in counts)
    return f", a scale per channel on {n} of {total} tensors" if n else ""


def _render_chain_compression(c, comp: dict | None) -> None:
    """int8 on the wire across a chain: the bytes at each inner cut, the effect on the
    outputs (measured in ONNX Runtime on batches not used for the scales)."""
    from compactor.report.format import fmt_bytes

    if not comp:
        return
    if not comp["cuts"]:
        c.print(f"int8 transfer: {comp['note']}")
        return
    cuts = ", ".join(f"{fmt_bytes(x['bytes_float'])} → {fmt_bytes(x['bytes_int8'])} at "
                     f"node {x['position']}" for x in comp["cuts"])
    acc = ""
    if "accuracy_float" in comp:
        acc = f", accuracy {comp['accuracy_float']:.4f} → {comp['accuracy_int8_transfer']:.4f}"
    elif "top1_agreement" in comp:
        acc = f", top-1 agreement {comp['top1_agreement']:.4f}"
    acc += _cosine(comp)
    others = "".join(f"; {o} {e['sqnr_db']:.1f} dB" for o, e in
                     list(comp["outputs"].items())[1:])
    c.print(f"int8 transfer: {cuts} ({comp['bytes_ratio']:.2f}x fewer"
            f"{_per_channel(comp['cuts'])}); SQNR "
            f"{comp['sqnr_db']:.1f} dB{others}{acc} on {comp['evaluated_samples']} samples "
            f"({comp['evaluated_on']})")


def _render_multi(plan: dict, out_dir: Path) -> None:
    from compactor.cli.render import console

    c = console()
    est = " [yellow](estimate)[/]" if plan["estimate"] else ""
    ch = plan["choice"]
    wire = ", int8 on the wire" if plan.get("compress_transfer") == "int8" else ""
    c.print(f"[bold]plan ({plan['objective']}{wire}): {ch['description']}[/]")
    c.print(f"  predicted {ch['latency_ms']:.2f} ms per request, {ch['throughput_rps']:.1f} "
            f"requests/s pipelined (bottleneck {ch['bottleneck_ms']:.2f} ms){est}")
    for st in ch.get("stages", []):
        c.print(f"  {st['name']}: compute {st['compute_ms']:.2f} ms, memory "
                f"{st['memory_mb']:.2f} MB, link out {st['forward_ms']:.2f} ms + rtt "
                f"{st['rtt_ms']:g} ms + reply {st['back_ms']:.2f} ms")
    for key, label in (("best_single_device", "best single device"),
                       ("best_two_devices", "best two-device split")):
        b = plan.get(key)
        if b:
            c.print(f"  {label}: {b['description']}: {b['latency_ms']:.2f} ms, "
                    f"{b['throughput_rps']:.1f} requests/s")
    v = plan.get("verification")
    if v:
        ok = "[green]ok[/]" if v["passed"] else "[red]FAILED[/]"
        c.print(f"verification ({v['samples']} samples): parts vs model max abs error "
                f"{v['max_abs_error']:.3g} (relative {v['max_rel_error']:.3g}) {ok}")
    _render_chain_compression(c, plan.get("compression"))
    s = plan.get("simulate")
    if s:
        emu = " (device speeds emulated)" if s["emulated"] else ""
        c.print(f"simulate ({s['processes']} processes): latency p50 "
                f"{s['latency_ms']['p50']:.2f} ms ({s['error_latency'] * 100:+.1f}% vs "
                f"predicted), stream {s['throughput_rps']:.1f} requests/s "
                f"({s['error_throughput'] * 100:+.1f}%){emu}")
        if s.get("note"):
            c.print(f"[yellow]note[/] {s['note']}")
    for n in plan["notes"]:
        c.print(f"[yellow]note[/] {n}")
    c.print(f"wrote {out_dir}: {', '.join(plan.get('files', {}).values())}")
