"""Benchmark: the dynamic batching `compactor package --triton` derives, against the
measured curve and the latency budget, for the demo CNN and all-MiniLM-L6-v2; and, where a
Triton server can run on this host, the throughput and p99 it reaches with that config vs
dynamic batching off.

Each model is measured by ``compactor optimize`` (no compression pass: the fp32 model as
exported) on a cloud profile with ``--threads`` intra-op threads at batch sizes 1..64 (1..16
for MiniLM at seq 128), with a p99 latency budget per model (``BUDGETS_MS``). The artifact
is then packaged into a Triton repository and the config's batching (preferred sizes,
queue delay, max_batch_size, the reasons) is recorded beside the curve it came from.

The server half needs a ``tritonserver`` binary on PATH (NVIDIA ships it in its container
images; PyPI has no server build for this Python: ``tritonserver`` resolves only to a
0.0.1.dev0 placeholder) and ``tritonclient[http]``. When either is missing the half is
skipped and the reason written to the results. With both: the server loads the repository
on loopback, and a bounded closed-loop load (``--concurrency`` clients, ``--seconds`` each)
is sent with tritonclient at batch 1, once with the derived config and once with
dynamic_batching removed; throughput and client-side p99 are recorded.

Not named triton.py: the script's folder is on sys.path, and torch imports the ``triton``
package (the GPU kernel compiler), which a triton.py there would shadow.

Usage: python benchmarks/triton_batching.py [--results-dir DIR] [--quick] [--threads N]
       [--models cnn,minilm] [--concurrency 16] [--seconds 20]
``--quick``: smoke run (fewer batch sizes, short timing, small data): checks the script end
to end; its numbers are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _results import machine, wait_for_idle, write_json, write_section

NAME = "triton_batching"
BUDGETS_MS = {"cnn": 10.0, "minilm": 150.0}  # p99 per request: a cloud service's limit
BATCHES = {"cnn": [1, 2, 4, 8, 16, 32, 64], "minilm": [1, 2, 4, 8, 16]}
QUICK_BATCHES = {"cnn": [1, 4, 16], "minilm": [1, 4]}

PROFILE = """\
name: bench-cloud
class: cloud
description: a cloud CPU slice, {threads} intra-op threads, a batch sweep for Triton
execution_providers: [CPUExecutionProvider]
intra_op_threads: {threads}
inter_op_threads: 1
batch_sizes: {batches}
graph_optimization_level: all
timing: {timing}
"""


def _timing(quick: bool) -> str:
    if quick:
        return "{warmup: 1, min_runs: 5, min_time_s: 0, max_time_s: 0.3}"
    return "{warmup: 5, min_runs: 30, min_time_s: 1, max_time_s: 5}"


def cnn_recipe(work: Path, key: str, quick: bool) -> Path:
    """The demo's digits CNN (trained on first use, cached), exported to ONNX, fp32."""
    (work / "recipe.yaml").write_text(f"""\
version: 1
name: digits-cnn
model:
  factory: compactor.examples.digits:build_pretrained
  args: {{width: 64, epochs: 8}}
  inputs:
    - {{name: image, shape: [batch, 1, 16, 16], dtype: float32}}
data:
  eval: compactor.examples.digits:eval_batches
metric: accuracy
passes:
  - export: {{opset: 18}}
targets:
  - profile: profile.yaml
    budgets: {{max_latency_ms: {{p99: {BUDGETS_MS[key]}}}}}
output: out
""", encoding="utf-8")
    return work / "recipe.yaml"


def minilm_recipe(work: Path, key: str, quick: bool) -> Path:
    """all-MiniLM-L6-v2 (the quant_minilm benchmark's export), seq 128, fp32."""
    import quant_minilm as q

    sentences = q.splits(sizes={"calibration": 0, "eval": 16 if quick else 64, "test": 0})
    data = q.tokenize(sentences["eval"])
    np.savez(work / "eval.npz", **data)
    q.export_fp32(work / "fp32.onnx", data)
    (work / "recipe.yaml").write_text(f"""\
version: 1
name: all-minilm-l6-v2
model:
  onnx: fp32.onnx
data:
  eval: eval.npz
  batch_size: 16
metric: fidelity
passes: []
targets:
  - profile: profile.yaml
    budgets: {{max_latency_ms: {{p99: {BUDGETS_MS[key]}}}}}
output: out
""", encoding="utf-8")
    return work / "recipe.yaml"


RECIPES = {"cnn": cnn_recipe, "minilm": minilm_recipe}


def measure_and_package(key: str, work: Path, threads: int, quick: bool) -> dict:
    from compactor.deploy.repository import Gate, publish
    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    batches = (QUICK_BATCHES if quick else BATCHES)[key]
    (work / "profile.yaml").write_text(PROFILE.format(threads=threads, batches=batches,
                                                      timing=_timing(quick)), encoding="utf-8")
    recipe = RECIPES[key](work, key, quick)
    if not quick:
        wait_for_idle()
    t0 = time.perf_counter()
    result = optimize(load_recipe(recipe))
    seconds = time.perf_counter() - t0
    repo = work / "repo"
    # the batching is the subject here, not the release gate: a p99 verdict left undecided
    # on a busy host does not stop the packaging
    pub = publish(result.artifact, repo, gate=Gate(allow_inconclusive=True))
    config = (repo / pub.model / "config.pbtxt").read_text(encoding="utf-8")
    return {"model": pub.model, "artifact": str(result.artifact), "repo": str(repo),
            "optimize_s": round(seconds, 1), "budget_p99_ms": BUDGETS_MS[key],
            "batching": pub.batching.to_dict(), "config": config}


# --------------------------------------------------------------------------- the server


def server_missing() -> str | None:
    """Why the server half cannot run here (None when it can)."""
    if shutil.which("tritonserver") is None:
        return ("no `tritonserver` binary on PATH: NVIDIA ships the server in its container "
                "images; on PyPI `tritonserver` resolves only to a 0.0.1.dev0 placeholder for "
                f"Python {sys.version_info.major}.{sys.version_info.minor} (no server build)")
    try:
        import tritonclient.http  # noqa: F401 - only checking that the extra is installed
    except ImportError as e:
        return f"tritonclient[http] is not installed ({e})"
    return None


def _without_dynamic_batching(repo: Path, model: str) -> Path:
    """A copy of the repository whose config has no dynamic_batching block."""
    off = repo.parent / "repo-nobatching"
    shutil.rmtree(off, ignore_errors=True)
    shutil.copytree(repo, off)
    cfg = off / model / "config.pbtxt"
    text = cfg.read_text(encoding="utf-8")
    start = text.find("dynamic_batching {")
    if start != -1:
        end = text.index("}\n", start) + 2
        text = text[:start] + text[end:]
    cfg.write_text(text, encoding="utf-8")
    return off


def serve_and_load(repo: Path, model: str, feed: dict[str, np.ndarray], concurrency: int,
                   seconds: float) -> dict:
    """Start tritonserver on ``repo`` (loopback), send a closed-loop load of batch-1
    requests from ``concurrency`` clients for ``seconds``, stop it."""
    import tritonclient.http as http

    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen(
        ["tritonserver", f"--model-repository={repo}", f"--http-port={port}",
         "--allow-grpc=false", "--allow-metrics=false", "--http-address=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"127.0.0.1:{port}"
        client = http.InferenceServerClient(url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(model):
                    break
            except Exception:  # noqa: BLE001 - the server is still starting
                pass
            time.sleep(0.5)
        else:
            return {"error": "the model did not become ready within 120 s"}
        return _load(url, model, feed, concurrency, seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _load(url: str, model: str, feed: dict[str, np.ndarray], concurrency: int,
          seconds: float) -> dict:
    import tritonclient.http as http

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client_loop() -> None:
        client = http.InferenceServerClient(url)
        inputs = []
        for name, arr in feed.items():
            i = http.InferInput(name, list(arr.shape), http.np_to_triton_dtype(arr.dtype))
            i.set_data_from_numpy(arr)
            inputs.append(i)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                client.infer(model, inputs)
            except Exception as e:  # noqa: BLE001 - recorded, the load goes on
                with lock:
                    errors.append(str(e)[:200])
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[:1],
            "throughput_rps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "concurrency": concurrency, "seconds": seconds}


def server_half(row: dict, key: str, concurrency: int, seconds: float) -> dict:
    why = server_missing()
    if why:
        return {"skipped": why}
    import onnxruntime as ort

    repo = Path(row["repo"])
    sess = ort.InferenceSession(str(Path(row["artifact"]) / "model.onnx"))
    feed = {}
    for i in sess.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in i.shape]
        if key == "minilm" and len(shape) == 2:
            shape[1] = 128
        dtype = np.int64 if "int64" in i.type else np.float32
        feed[i.name] = np.ones(shape, dtype)
    on = serve_and_load(repo, row["model"], feed, concurrency, seconds)
    off = serve_and_load(_without_dynamic_batching(repo, row["model"]), row["model"], feed,
                         concurrency, seconds)
    return {"dynamic_batching": on, "no_batching": off}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="cnn,minilm")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    from compactor.measure.host import isa_flags
    from compactor.quantization.isa import detect

    rows = {}
    with tempfile.TemporaryDirectory(prefix="compactor-triton-") as tmp:
        for key in args.models.split(","):
            work = Path(tmp) / key
            work.mkdir()
            print(f"{key}: measuring and packaging ...", file=sys.stderr, flush=True)
            row = measure_and_package(key, work, args.threads, args.quick)
            row["server"] = server_half(row, key, args.concurrency,
                                        3.0 if args.quick else args.seconds)
            rows[key] = row
    summary = {"machine": machine(), "isa": detect().path, "isa_flags": isa_flags(),
               "threads": args.threads, "quick": args.quick, "models": rows}
    write_json(NAME + ("-quick" if args.quick else ""), summary, args.results_dir)
    if not args.quick:
        write_section(NAME, _markdown(summary), args.results_dir)
    print(json.dumps({k: {"batching": v["batching"], "server": v["server"]}
                      for k, v in rows.items()}, indent=2))
    return 0


def _markdown(s: dict) -> str:
    m = s["machine"]
    lines = [f"## Triton batching ({NAME}.py)", "",
             f"{m['cpu']}, {m['cores']} cores, int8 path {s['isa']}, {s['threads']} threads; "
             f"1-min load {m['load_avg_1m']:.2f}.", ""]
    for r in s["models"].values():
        b = r["batching"]
        lines += [f"### {r['model']}", "",
                  "| batch | p50 ms | p99 ms | samples/s |", "|---|---|---|---|"]
        lines += [f"| {p['batch_size']} | {p['p50_ms']:.3g} | {p['p99_ms']:.3g} | "
                  f"{p['throughput']:.4g} |" for p in b["curve"]]
        lines += ["", f"Budget {b['latency_budget']}: max_batch_size {b['max_batch_size']}, "
                  + (f"preferred {b['preferred_batch_size']}, max queue delay "
                     f"{b['max_queue_delay_microseconds']} µs" if b["dynamic_batching"]
                     else "no dynamic batching"), ""]
        lines += [f"- {x}" for x in b["reasons"]]
        srv = r["server"]
        lines += ["", ("Server: skipped: " + srv["skipped"]) if "skipped" in srv else
                  "Server (batch-1 requests, closed loop): dynamic batching "
                  f"{srv['dynamic_batching']}; off {srv['no_batching']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
