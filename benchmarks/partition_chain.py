"""Benchmark: partition plans across several devices, predicted against simulated.

Chains: for each model (the digits CNN, a MobileNetV2-style CNN at 224x224), 3 and 4
devices, and each bandwidth, ``compactor.partition.multi.plan_chain_model`` plans the
chain (latency objective), then ``--simulate`` runs every used device's part in its own
process over loopback links shaped to each hop's bandwidth and RTT, and measures one
request at a time (p50) and a stream of requests (throughput). Rows give the plan, predicted
vs simulated latency and throughput, the errors, and the predicted speed-up over the best
single device and over the best two-device split (the same cost model, restricted).

Peers: for each model, 3 and 4 peers and each bandwidth, ``plan_spatial_model`` chooses K
and the depth of the tiled prefix, and the plan is simulated (latency and a stream), at
LAN bandwidths (``--peer-bandwidths``).

Devices are emulated on this host: each is a fixed number of times slower (a sleep of
(slowdown - 1) x each run), stated per model below; every profile runs one intra-op thread
(``--threads`` to change), so the processes of a chain do not fight over the cores.

Target (issue 16): |simulated - predicted| / predicted <= 20% for the chosen plan.

Writes the ``partition-chain`` section of benchmarks/RESULTS.md and
benchmarks/results/partition-chain.json.

Throughput rows: the same models on a line of 3 and 4 identical boards (each as slow as
the phone) on LAN links (``--line-bandwidths``), planned with ``--objective throughput``:
the pipelined stream, where each board takes a slice of the model, is where a chain of
devices pays; speed-ups there are in the stream's bottleneck.

int8 on the wire (``--compress-transfer int8``): the chain rows are planned and simulated
with every inner cut's float32 tensors sent as uint8 (the parts quantize and dequantize at
their cuts; a cut at 0 still sends the raw input), each row labelled ``int8`` with the
measured SQNR of the output (and the accuracy with and without, on the digits' labels);
peers are not compressed, so their rows are left out. These results go to their own
section, ``partition-chain-int8`` (and results/partition-chain-int8.json), beside the
float run's.

Usage: python benchmarks/partition_chain.py [--quick] [--models ...] [--devices 3 4]
       [--bandwidths 10Mbps 50Mbps 200Mbps] [--peer-bandwidths 100Mbps 500Mbps 1Gbps]
       [--line-bandwidths 50Mbps 200Mbps 1Gbps] [--requests N] [--threads N] [--no-peers]
       [--chains latency throughput] [--compress-transfer none|int8] [--results-dir DIR]
Exit code: 0 when every target holds, 1 when one fails (the results are written either way).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "partition-chain"
TARGET = 0.20
WIRE_MIN_SQNR_DB = 20.0  # an int8 row whose output is further from float is broken
BANDWIDTHS = ("10Mbps", "50Mbps", "200Mbps")
PEER_BANDWIDTHS = ("100Mbps", "500Mbps", "1Gbps")  # boards on one LAN
# per model: slowdowns of phone, gateway, edge server, cloud (the 3-device chain drops the
# edge server); why
SLOWDOWNS = {
    "digits-cnn": ((25.0, 8.0, 3.0, 1.0), "a Pi 4-class phone ~25x this host, a gateway "
                   "~8x, an edge server ~3x, the cloud 1x (assumed)"),
    "mobilenetv2-224": ((4.0, 2.5, 1.5, 1.0), "a Pi 4-class phone ~4x this host on "
                        "MobileNetV2, a gateway ~2.5x, an edge server ~1.5x (assumed)"),
}
RTTS = (5.0, 10.0, 30.0)  # ms per hop: phone-gateway, gateway-edge, edge-cloud
# throughput rows: a line of identical boards (each as slow as the phone), LAN links; the
# pipelined stream is where a chain pays (each board takes a slice), as MoDNN showed
LINE_BANDWIDTHS = ("50Mbps", "200Mbps", "1Gbps")
LINE_RTT = 2.0
PEER_SLOWDOWN = {"digits-cnn": 25.0, "mobilenetv2-224": 4.0}
PEER_RTT = "2ms"


def _bench_partition():
    """benchmarks/partition.py, for its model builders."""
    spec = importlib.util.spec_from_file_location("bench_partition", HERE / "partition.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _profiles(tmp: Path, threads: int) -> dict[str, Path]:
    out = {}
    for name, cls in (("phone", "edge"), ("gateway", "edge"), ("edge-server", "cloud"),
                      ("cloud", "cloud")):
        p = tmp / f"{name}.yaml"
        p.write_text(f"name: {name}\nclass: {cls}\nintra_op_threads: {threads}\n"
                     "batch_sizes: [1]\n", encoding="utf-8")
        out[name] = p
    return out


def chain_topology(tmp: Path, profiles: dict[str, Path], n: int, bw: str,
                   slowdowns, line: bool = False) -> Path:
    """phone → gateway → (edge server →) cloud; or, with ``line``, n identical boards each
    as slow as the phone on LAN links."""
    names = ["phone", "gateway", "edge-server", "cloud"] if n == 4 else \
        ["phone", "gateway", "cloud"]
    slows = list(slowdowns) if n == 4 else [slowdowns[0], slowdowns[1], slowdowns[3]]
    rtts = [RTTS[min(i, 2)] for i in range(n - 1)]
    if line:
        names, slows, rtts = ([f"board{i}" for i in range(n)], [slowdowns[0]] * n,
                              [LINE_RTT] * (n - 1))
    lines = ["kind: chain", "devices:"]
    lines += [f"  - {{name: {nm}, profile: {profiles['phone' if line else nm]}, "
              f"slowdown: {s}}}" for nm, s in zip(names, slows, strict=True)]
    lines.append("links:")
    for i in range(n - 1):
        lines.append(f"  - {{from: {names[i]}, to: {names[i + 1]}, bandwidth: {bw}, "
                     f"rtt: {rtts[i]}ms}}")
    path = tmp / f"{'line' if line else 'chain'}{n}-{bw}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def peers_topology(tmp: Path, profiles: dict[str, Path], k: int, bw: str,
                   slowdown: float) -> Path:
    lines = ["kind: peers", "devices:"]
    lines += [f"  - {{name: board{i}, profile: {profiles['phone']}, slowdown: {slowdown}}}"
              for i in range(k)]
    lines.append(f"link: {{bandwidth: {bw}, rtt: {PEER_RTT}}}")
    path = tmp / f"peers{k}-{bw}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def output_spread(m: dict) -> float:
    """The model's first output's standard deviation across the data's samples, over its
    mean magnitude: ~0 when the output does not depend on the input."""
    import numpy as np

    from compactor.partition.profile import plain_session

    sess = plain_session(str(m["path"]))
    y = sess.run(None, {i.name: m["data"][0][i.name] for i in sess.get_inputs()})[0]
    return float(y.std(axis=0).mean() / max(float(np.abs(y).mean()), 1e-30))


def _err(measured: float, predicted: float) -> float:
    return (measured - predicted) / predicted if predicted else float("nan")


def host_drift(model: Path, profile: Path, data, planned_ms: float) -> float:
    """This host's full-model time right after the simulation / the time the plan used: by
    how much other jobs changed the host's speed between planning and simulating."""
    from compactor.partition.profile import TimingSettings, time_ms
    from compactor.profiles import load_profile

    prof = load_profile(str(profile))
    feeds = {k: v[:1] for k, v in data[0].items()}
    # the first device is emulated in every row: its figure is this host's steady time
    return time_ms(model, prof, feeds, TimingSettings.of(prof, quick=False),
                   pause_s=0.0) / planned_ms


def _full_ms(plan: dict) -> float:
    """The first device's whole-model time the plan used (this host's ms): the direct
    re-time of the planning call when it made one, else the segment timing's."""
    direct = plan["timing"]["direct_ms"].get(f"0:0-{plan['model']['nodes']}")
    return direct if direct is not None else plan["timing"]["groups"][0]["full_ms"]


def chain_rows(models, devices, scenarios, requests, profiles, tmp,
               compress: str = "none") -> list[dict]:
    """``scenarios``: (objective, bandwidths, line) per kind of row; ``compress``: int8 on
    the wire or none."""
    from compactor.partition.multi import ChainOptions, plan_chain_model
    from compactor.partition.topology import load_topology

    rows = []
    for name, m in models.items():
        cache: dict = {}
        for objective, bandwidths, line in scenarios:
            for n in devices:
                for bw in bandwidths:
                    rows.append(_chain_row(name, m, n, bw, objective, line, requests,
                                           profiles, tmp, cache, plan_chain_model,
                                           ChainOptions, load_topology, compress))
    return rows


def _chain_row(name, m, n, bw, objective, line, requests, profiles, tmp, cache,
               plan_chain_model, ChainOptions, load_topology,  # noqa: N803 - classes
               compress: str = "none") -> dict:
    topo = load_topology(chain_topology(tmp, profiles, n, bw, SLOWDOWNS[name][0], line))
    t0 = time.time()
    r = plan_chain_model(m["path"], topo, ChainOptions(objective=objective,
                                                       compress_transfer=compress),
                         data=m["data"], targets=m.get("targets"),
                         out_dir=tmp / f"{name}-{n}-{bw}-{objective}-{compress}",
                         simulate=True, simulate_requests=requests, timing_cache=cache)
    p, sim = r.plan, r.plan["simulate"]
    ch = p["choice"]
    one, two = p["best_single_device"], p["best_two_devices"]
    e_lat = _err(sim["latency_ms"]["p50"], ch["latency_ms"])
    e_thr = _err(sim["throughput_rps"], ch["throughput_rps"])
    drift = host_drift(m["path"], profiles["phone"], m["data"], _full_ms(p))
    # speed-up in the objective's own figure, all on the same basis (one request at a time
    # timings; the choice's stream-timed bottleneck is for its error against the simulation)
    if objective == "throughput":
        mine = ch.get("bottleneck_ms_one_at_a_time", ch["bottleneck_ms"])
        x1, x2 = one["bottleneck_ms"] / mine, two["bottleneck_ms"] / mine
    else:
        x1, x2 = one["latency_ms"] / ch["latency_ms"], two["latency_ms"] / ch["latency_ms"]
    row = {
        "model": name, "devices": n, "bandwidth": bw, "objective": objective,
        "topology": "line of identical boards" if line else "phone → gateway → … → cloud",
        "plan": ch["description"], "computing": ch["devices_computing"],
        "predicted_ms": ch["latency_ms"], "simulated_ms": sim["latency_ms"]["p50"],
        "error_latency": e_lat, "simulated_min_ms": sim["latency_ms"]["min"],
        "predicted_rps": ch["throughput_rps"],
        "simulated_rps": sim["throughput_rps"], "error_throughput": e_thr,
        "speedup_vs_single": x1, "speedup_vs_two": x2,
        "single": one["description"], "two": two["description"],
        "verification_max_abs": p["verification"]["max_abs_error"],
        # where an error comes from: each device's compute, planned (one at a time, in a
        # stream) vs simulated
        "compute_ms": {st["name"]: [st["compute_ms"], st.get("compute_stream_ms"),
                                    sim["compute_ms_p50"].get(st["name"])]
                       for st in ch["stages"]},
        "host_drift": drift,
        "stream_host_busy": sim.get("stream_host_busy"),
        "wire": "int8" if compress == "int8" else "fp32",
        "compression": _wire_summary(p.get("compression")),
        "passed": abs(e_lat) <= TARGET and abs(e_thr) <= TARGET and _wire_ok(p),
        "seconds": round(time.time() - t0, 1),
    }
    print(f"{name} {n} dev {bw} {objective}{' line' if line else ''} {row['wire']}: "  # noqa: T201 - script
          f"{ch['description']} | {ch['latency_ms']:.1f} → {sim['latency_ms']['p50']:.1f} ms "
          f"({e_lat:+.0%}), {ch['throughput_rps']:.1f} → {sim['throughput_rps']:.1f} req/s "
          f"({e_thr:+.0%}), x{x1:.2f} single, x{x2:.2f} two", flush=True)
    return row


def _wire_ok(plan: dict) -> bool:
    """An int8 row fails when the output it sends ends further than ``WIRE_MIN_SQNR_DB``
    from float's (a wire that breaks the model must not pass on its timings alone)."""
    comp = plan.get("compression")
    return not (comp and comp.get("cuts")) or comp["sqnr_db"] >= WIRE_MIN_SQNR_DB


def _wire_summary(comp: dict | None) -> dict | None:
    """plan.json's ``compression`` in short: the inner cuts sent as int8 and, where one is,
    the output's SQNR against float (and accuracy with and without, on labels)."""
    if comp is None:
        return None
    out = {"int8_cuts": [c["position"] for c in comp["cuts"]],
           "bytes_float": comp.get("bytes_float"), "bytes_int8": comp.get("bytes_int8")}
    for k in ("sqnr_db", "top1_agreement", "accuracy_float", "accuracy_int8_transfer",
              "evaluated_samples"):
        if k in comp:
            out[k] = comp[k]
    return out


def _wire_cell(w: dict) -> str:
    """The row's wire: fp32, or int8 with the measured SQNR (— when no inner cut is sent:
    nothing was quantized)."""
    c = w.get("compression")
    if w.get("wire", "fp32") == "fp32" or c is None:
        return "fp32"
    if not c["int8_cuts"]:
        return "int8 (no inner cut sent)"
    acc = (f", acc {c['accuracy_float']:.3f}→{c['accuracy_int8_transfer']:.3f}"
           if "accuracy_float" in c else "")
    return f"int8 at {', '.join(map(str, c['int8_cuts']))} ({c['sqnr_db']:.1f} dB{acc})"


def peer_rows(models, peers, bandwidths, requests, profiles, tmp) -> list[dict]:
    from compactor.partition.spatial import SpatialOptions, plan_spatial_model
    from compactor.partition.topology import load_topology

    rows = []
    for name, m in models.items():
        for k in peers:
            for bw in bandwidths:
                topo = load_topology(peers_topology(tmp, profiles, k, bw, PEER_SLOWDOWN[name]))
                r = plan_spatial_model(m["path"], topo, SpatialOptions(), data=m["data"],
                                       out_dir=tmp / f"{name}-p{k}-{bw}", simulate=True,
                                       simulate_requests=requests)
                p, sim = r.plan, r.plan["simulate"]
                ch, one = p["choice"], p["best_single_device"]
                e = _err(sim["latency_ms"]["p50"], ch["latency_ms"])
                e_thr = _err(sim["throughput_rps"], ch["throughput_rps"])
                rows.append({
                    "model": name, "peers": k, "bandwidth": bw, "plan": ch["description"],
                    "chosen_k": ch["peers"], "depth": ch["depth"],
                    "predicted_ms": ch["latency_ms"], "simulated_ms": sim["latency_ms"]["p50"],
                    "error_latency": e, "predicted_rps": ch["throughput_rps"],
                    "simulated_rps": sim["throughput_rps"], "error_throughput": e_thr,
                    "speedup_vs_single": one["latency_ms"] / ch["latency_ms"],
                    "verification_max_abs": p["verification"]["max_abs_error"],
                    # per device: planned one at a time, planned in a stream, simulated
                    "compute_ms": {
                        **{f"tile{t}": [ch["tile_ms"][t], ch["tile_stream_ms"][t],
                                        sim["compute_ms_p50"].get(f"tile{t}")]
                           for t in range(ch["peers"])},
                        "rest": [ch["rest_ms"], ch["rest_stream_ms"],
                                 sim["compute_ms_p50"].get("rest")]},
                    "bottleneck_ms_one_at_a_time": ch["bottleneck_ms_one_at_a_time"],
                    "stream_host_busy": sim.get("stream_host_busy"),
                    "passed": abs(e) <= TARGET and abs(e_thr) <= TARGET,
                })
                print(f"{name} {k} peers {bw}: {ch['description']} | "  # noqa: T201 - script
                      f"{ch['latency_ms']:.1f} → {sim['latency_ms']['p50']:.1f} ms ({e:+.0%}), "
                      f"{ch['throughput_rps']:.1f} → {sim['throughput_rps']:.1f} req/s "
                      f"({e_thr:+.0%})", flush=True)
    return rows


def _latency_note(chains: list[dict]) -> str:
    lat = [w for w in chains if w.get("objective", "latency") == "latency"]
    single = sum(len(w["computing"]) == 1 for w in lat)
    if lat and single == len(lat):
        return ("in every row one device computes it all (the phone forwards the input to "
                "the fastest device it reaches, or computes it itself): with these devices "
                "and links no split pays for one request, so ×single is 1.00×")
    return f"{len(lat) - single} of {len(lat)} rows split the model"


def _miss_notes(rows: list[dict]) -> list[str]:
    """Per row that misses the target: the simulated compute ÷ the planned (stream) one,
    median over its computing devices: where the error comes from."""
    out = []
    for w in rows:
        if w["passed"]:
            continue
        ratios = sorted(v[2] / (v[1] or v[0]) for v in w.get("compute_ms", {}).values()
                        if v[2] and (v[1] or v[0]))
        what = (f"simulated compute {ratios[len(ratios) // 2]:.2f}× the planned"
                if ratios else "no per-device figures")
        if (w.get("stream_host_busy") or 0) >= 0.9:
            what += (f"; this host's cores {w['stream_host_busy']:.0%} busy in the stream "
                     "(the host, not the plan, bounded it)")
        out.append(f"{w['model']} {w.get('devices', w.get('peers'))} "
                   f"{w.get('objective', 'peers')} {w['bandwidth']}: {what}")
    return out


def render(r: dict) -> str:
    mach = r["machine"]
    lines = [
        "## Partition across several devices (chains and peers)"
        if r.get("compress_transfer", "none") == "none" else
        f"## Partition across a chain of devices, {r['compress_transfer']} on the wire",
        "",
        f"`{r['command']}`",
        "",
        f"- date: {r['date']}; host: {mach['cpu']}, {mach['cores']} cores, ISA "
        f"{r['isa']}; 1-min load at end {mach['load_avg_1m']:.2f}"
        + ("; **reduced run (--quick)**" if r["quick"] else ""),
        *([f"- **a busy host** (1-min load {mach['load_avg_1m']:.1f} on {mach['cores']} "
           "cores): the simulated processes wait for a core at every wake-up, so the errors "
           "measure the host's scheduling as much as the planner; rerun "
           "`python benchmarks/partition_chain.py` on a quiet host"]
          if (mach["load_avg_1m"] or 0) > (mach["cores"] or 1) else []),
        f"- devices emulated on this host, {r['threads']} intra-op thread(s) each; "
        + "; ".join(f"{k}: {v[1]}" for k, v in SLOWDOWNS.items() if k in r["models"]),
        f"- link RTTs per hop: {', '.join(f'{x:g} ms' for x in RTTS)}; every hop at the "
        "row's bandwidth. Peers share one link (RTT " + PEER_RTT + "), each board as slow "
        "as the phone (" + ", ".join(f"{k} {PEER_SLOWDOWN[k]:g}×" for k in r["models"]) + ").",
        f"- target: |simulated − predicted| ≤ {r['target']:.0%} of predicted (latency p50 "
        "and stream throughput)"
        + (f"; an int8 row also needs its output within {WIRE_MIN_SQNR_DB:g} dB SQNR of "
           "float's" if r.get("compress_transfer") == "int8" else ""),
        "- latency rows (phone → gateway → (edge server →) cloud, objective latency): "
        + _latency_note(r["chains"]) + "; throughput rows (a line of identical boards, "
        "each as slow as the phone, LAN links "
        f"{', '.join(r.get('line_bandwidths', []))}, RTT {LINE_RTT:g} ms, "
        "`--objective throughput`): a pipelined stream where each board takes a slice",
        "- speed-ups are predicted (same cost model, one-request-at-a-time timings), in the "
        "objective's own figure (latency, or the stream's bottleneck): best plan vs the "
        "best plan on one device / on at most two devices",
        "- host drift: the first device's full-model time re-measured right after the "
        "simulation ÷ the time the plan used (1.00× = the host's speed did not move)",
        *(["- rows missing the target (simulated compute ÷ planned, median over the "
            "devices; below 1: the devices ran faster in the simulation than timed alone): "
            + "; ".join(_miss_notes(r["chains"] + r["peers"]))]
          if _miss_notes(r["chains"] + r["peers"]) else []),
        *(["- int8 on the wire (`--compress-transfer int8`): every inner cut's float32 "
           "tensors sent as uint8 (scales from the data's first batches), a cut at 0 sends "
           "the raw input; the wire column gives the cuts sent as int8 (node positions) and "
           "the output's SQNR against float (and the digits' accuracy, float → int8 on the "
           "wire) on batches not used for the scales; ×single and ×two compare with the best "
           "one- and two-device plans with int8 on the wire too. Peers are not compressed "
           "(left out)"]
          if r.get("compress_transfer") == "int8" else []),
        *([f"- {m}: its output does not depend on its input (spread across the samples "
           f"{v:.1e} of its magnitude: seeded random weights, no trained model), so its SQNR "
           "only says the wire's rounding does not reach that constant; it says nothing of "
           "int8's effect on a trained model (the digits CNN's figures do)"
           for m, v in r.get("output_spread", {}).items() if v < 1e-6]
          if r.get("compress_transfer") == "int8" else []),
        "",
        "| model | devices | objective | bandwidth | wire | plan | predicted → simulated ms | "
        "error | predicted → simulated req/s | error | ×single | ×two | max abs err | "
        "host drift | target |",
        "|---|---:|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for w in r["chains"]:
        lines.append(
            f"| {w['model']} | {w['devices']} | {w.get('objective', 'latency')} | "
            f"{w['bandwidth']} | {_wire_cell(w)} | {w['plan']} | "
            f"{w['predicted_ms']:.2f} → {w['simulated_ms']:.2f} | {w['error_latency']:+.1%} | "
            f"{w['predicted_rps']:.1f} → {w['simulated_rps']:.1f} | "
            f"{w['error_throughput']:+.1%} | {w['speedup_vs_single']:.2f}× | "
            f"{w['speedup_vs_two']:.2f}× | {w['verification_max_abs']:.1e} | "
            f"{w['host_drift']:.2f}× | {'✅' if w['passed'] else '❌'} |")
    if r["peers"]:
        lines += ["", "| model | peers | bandwidth | plan | predicted → simulated ms | "
                  "error | predicted → simulated req/s | error | ×single | max abs err | "
                  "target |",
                  "|---|---:|---|---|---|---:|---|---:|---:|---:|---|"]
        for w in r["peers"]:
            lines.append(
                f"| {w['model']} | {w['peers']} | {w['bandwidth']} | {w['plan']} | "
                f"{w['predicted_ms']:.2f} → {w['simulated_ms']:.2f} | "
                f"{w['error_latency']:+.1%} | {w['predicted_rps']:.1f} → "
                f"{w['simulated_rps']:.1f} | {w['error_throughput']:+.1%} | "
                f"{w['speedup_vs_single']:.2f}× | {w['verification_max_abs']:.1e} | "
                f"{'✅' if w['passed'] else '❌'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--models", nargs="+", choices=list(SLOWDOWNS), default=list(SLOWDOWNS))
    ap.add_argument("--devices", nargs="+", type=int, choices=(3, 4), default=[3, 4])
    ap.add_argument("--bandwidths", nargs="+", default=list(BANDWIDTHS))
    ap.add_argument("--requests", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-bandwidths", nargs="+", default=list(PEER_BANDWIDTHS))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--line-bandwidths", nargs="+", default=list(LINE_BANDWIDTHS),
                    help="links of the throughput rows (a line of identical boards)")
    ap.add_argument("--chains", nargs="*", choices=("latency", "throughput"),
                    default=["latency", "throughput"],
                    help="which chain rows: latency (phone → ... → cloud), throughput (a line "
                    "of identical boards); none: peers only")
    ap.add_argument("--compress-transfer", choices=("none", "int8"), default="none",
                    help="int8: the chain rows with int8 on the wire (their own results "
                    "section, partition-chain-int8; peers left out: they are not compressed)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: digits CNN, 3 devices, one bandwidth, 5 requests")
    args = ap.parse_args()
    if args.quick:
        (args.models, args.devices, args.bandwidths, args.peer_bandwidths,
         args.line_bandwidths, args.requests) = (["digits-cnn"], [3], ["50Mbps"],
                                                 ["100Mbps"], ["200Mbps"], 5)
    sys.path.insert(0, str(HERE))
    from _results import machine, write_json, write_section

    from compactor.quantization.isa import detect

    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp_s:
        tmp = Path(tmp_s)
        models = _bench_partition().build_models(tmp, args.models)
        spread = {name: output_spread(m) for name, m in models.items()}
        profiles = _profiles(tmp, args.threads)
        scenarios = ([("latency", args.bandwidths, False)] if "latency" in args.chains
                     else []) + ([("throughput", args.line_bandwidths, True)]
                                 if "throughput" in args.chains else [])
        chains = chain_rows(models, args.devices, scenarios, args.requests, profiles, tmp,
                            args.compress_transfer)
        no_peers = args.no_peers or args.compress_transfer != "none"
        peers = [] if no_peers else peer_rows(models, args.devices, args.peer_bandwidths,
                                              args.requests, profiles, tmp)
    name = NAME if args.compress_transfer == "none" else f"{NAME}-{args.compress_transfer}"
    r = {"benchmark": name, "compress_transfer": args.compress_transfer,
         "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "command": "python benchmarks/partition_chain.py " + " ".join(sys.argv[1:]),
         "quick": args.quick, "threads": args.threads,
         "isa": detect().path,
         "models": args.models, "target": TARGET, "chains": chains, "peers": peers,
         "output_spread": spread,
         "line_bandwidths": args.line_bandwidths if "throughput" in args.chains else [],
         "machine": machine(),
         "passed": all(x["passed"] for x in chains + peers)}
    write_json(name, r, args.results_dir)
    write_section(name, render(r), args.results_dir)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
