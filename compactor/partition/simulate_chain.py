"""``--simulate`` for a chain of devices: each used device's part in its own process, the
processes joined in a line by loopback TCP links shaped to each hop's bandwidth and RTT
(:class:`~compactor.partition.simulate.ShapedLink`, as for two devices).

The calling process is the first device: the source of the requests, it runs the first
part and sends on to the second device's process. Each other device's process has four
threads: one receives from upstream and runs its part (an emulated device, one slower
than this host, then sleeps out the rest of its time: :class:`Emulated`), one sends
downstream, one receives replies from downstream, one sends them upstream; so a
device computes the next request while its link sends the last one, as a pipelined
deployment would. The last device sends its outputs back up the line.

Two measurements: the latency of one request at a time (a pause between requests, as for
two devices), and the throughput of a stream of requests sent back to back (requests per
second between the first and the last reply).
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compactor.partition.simulate import Emulated, ShapedLink, decode, encode


def simulate_chain(parts: Sequence[Any], plan, topology, sides, feeds: Mapping[str, np.ndarray],
                   requests: int = 10, stream: int | None = None, warmup: int = 2,
                   max_seconds: float = 60.0) -> dict:
    """Run ``plan``'s ``parts`` (one per used device; None forwards): the first device's
    here, each other in a process of its own; measure one request at a time, then a
    stream. ``sides``: each device's Side."""
    from compactor.errors import UsageError
    from compactor.partition.profile import PAUSE_S, make_session

    for st in plan.stages:
        if sides[st.device].slowdown < 1:
            raise UsageError(f"--simulate cannot make device {sides[st.device].role!r} faster "
                             f"than this host (its slowdown is "
                             f"{sides[st.device].slowdown:.3g})",
                             "simulate with slowdown factors of 1 or more")
    lat = max(plan.latency_ms, 1e-3)
    requests = max(3, min(requests, int(max_seconds * 500 / lat)))
    stream = stream or max(12, 2 * requests)
    stream = max(4, min(stream, int(max_seconds * 500 / max(plan.bottleneck_ms, 1e-3))))
    first = _First(make_session(parts[0], sides[0].profile) if parts[0] is not None else None,
                   sides[0], dict(feeds))
    with tempfile.TemporaryDirectory(prefix="compactor-chain-") as tmp:
        procs = _start(parts, plan, topology, sides, Path(tmp)) if len(parts) > 1 else []
        try:
            link = None
            if procs:
                hop = topology.hops[0]
                link = ShapedLink(socket.create_connection(("127.0.0.1", procs[0][1]),
                                                           timeout=300), hop.bps,
                                  hop.rtt_ms / 2)
            e2e = []
            for i in range(warmup + requests):
                t0 = time.perf_counter()
                msg = first.run()
                if link is not None:
                    link.send(msg)
                    decode(link.recv())
                if i >= warmup:
                    e2e.append((time.perf_counter() - t0) * 1000.0)
                time.sleep(PAUSE_S)
            with _HostLoad() as load:
                done = _stream(link, first, stream)
            if link is not None:
                link.send(b"")
                link.recv()
                link.sock.close()
            finished = [_finish(p) for p, _ in procs]
            compute = [first.compute_ms] + [f.get("compute_ms", []) for f in finished]
            emulation = [first.dev.summary() if first.dev else None] + [
                f.get("emulation") for f in finished]
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    a = np.asarray(e2e)
    span = done[-1] - done[0]
    return {
        "processes": len(plan.stages), "requests": requests, "stream_requests": stream,
        "latency_ms": {"p50": float(np.median(a)), "mean": float(a.mean()),
                       "min": float(a.min()), "max": float(a.max())},
        "runs_ms": [round(float(x), 3) for x in a],
        "throughput_rps": (len(done) - 1) / span if span > 0 else float("inf"),
        **load.figures(),
        "compute_ms_p50": {topology.devices[st.device].name:
                           (float(np.median(c[warmup:])) if len(c) > warmup else 0.0)
                           for st, c in zip(plan.stages, compute, strict=True)},
        "emulation": {topology.devices[st.device].name: e
                      for st, e in zip(plan.stages, emulation, strict=True) if e},
        "emulated": any(sides[st.device].slowdown != 1 for st in plan.stages),
    }


class _First:
    """The first device's part, run here (the request's source is on that device)."""

    def __init__(self, sess, side, feeds: dict):
        self.dev = (Emulated(sess, side.slowdown, side.profile, side.emulated)
                    if sess is not None else None)
        self.feeds = feeds

    @property
    def compute_ms(self) -> list[float]:
        return self.dev.compute_ms if self.dev is not None else []

    def run(self) -> bytes:
        if self.dev is None:
            return encode(self.feeds)
        outs = self.dev.run(self.feeds)
        return encode({o.name: v for o, v in zip(self.dev.sess.get_outputs(), outs,
                                                 strict=True)})


class _HostLoad:
    """How busy this host's cores were during the stream (every process: the simulated
    devices and anything else): near 1, the stream's rate is this host's, not the plan's."""

    BOUND = 0.9

    def __enter__(self) -> _HostLoad:
        from compactor.measure.host import host_busy_seconds

        self.busy0, self.t0 = host_busy_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        from compactor.measure.host import host_busy_seconds

        self.busy1, self.t1 = host_busy_seconds(), time.perf_counter()

    def figures(self) -> dict:
        import os

        cores = os.cpu_count() or 1
        wall = self.t1 - self.t0
        if self.busy0 is None or self.busy1 is None or wall <= 0:
            return {"stream_host_busy": None, "host_bound": None}
        busy = (self.busy1 - self.busy0) / (wall * cores)
        out: dict = {"stream_host_busy": round(busy, 3), "host_bound": busy >= self.BOUND}
        if busy >= self.BOUND:
            out["note"] = (f"this host's {cores} cores were {busy:.0%} busy during the "
                           "stream: its rate is bounded by this host (every simulated "
                           "device's process shares them), not only by the plan")
        return out


def _stream(link: ShapedLink | None, first: _First, n: int) -> list[float]:
    """``n`` requests back to back: the first device computes them one after another (a
    thread), another thread sends them; returns when each reply came in."""
    if link is None:  # all on the first device
        done = []
        for _ in range(n):
            first.run()
            done.append(time.perf_counter())
        return done
    q: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=lambda: [q.put(first.run()) for _ in range(n)],
                                daemon=True),
               threading.Thread(target=lambda: [link.send(q.get()) for _ in range(n)],
                                daemon=True)]
    for t in threads:
        t.start()
    done = []
    for _ in range(n):
        decode(link.recv())
        done.append(time.perf_counter())
    for t in threads:
        t.join()
    return done


def _start(parts, plan, topology, sides, tmp: Path) -> list[tuple[subprocess.Popen, int]]:
    """One process per used device after the first; each prints its port, then learns its
    downstream's."""
    procs = []
    for i in range(1, len(plan.stages)):
        st, part = plan.stages[i], parts[i]
        model = None
        if part is not None:
            model = str(tmp / f"part{i}.onnx")
            Path(model).write_bytes(part.SerializeToString())
        last = i == len(plan.stages) - 1
        hop = None if last else topology.hops[st.device]
        up = topology.hops[st.device - 1]
        procs.append(_spawn(tmp / f"job{i}.json", model, sides[st.device], last, hop, up))
    for i, (p, _) in enumerate(procs):
        down = procs[i + 1][1] if i + 1 < len(procs) else 0
        assert p.stdin is not None
        p.stdin.write(f"{down}\n")
        p.stdin.flush()
    return procs


def _finish(p: subprocess.Popen) -> dict:
    """A device process's last word: its compute times and its emulation's figures."""
    out, err = p.communicate(timeout=120)
    if p.returncode != 0:
        raise _failed(p, err)
    for ln in reversed(out.splitlines()):
        if ln.startswith("{"):
            return json.loads(ln)
    return {}


def _failed(p: subprocess.Popen, err: str | None = None):
    from compactor.errors import PassError

    if err is None:
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
    last = [ln for ln in (err or "").splitlines() if ln.strip()]
    return PassError(f"a simulated device failed: {last[-1][:300] if last else 'no output'}",
                     "rerun with --debug; each device runs `python -m "
                     "compactor.partition.simulate_chain`")


# --------------------------------------------------------------------------- a device


def _pump(recv_link: ShapedLink, out: queue.Queue, work=None) -> None:
    """Receive messages, transform them with ``work`` (None: as they are), queue them; an
    empty message ends the stream and is passed on."""
    while True:
        msg = recv_link.recv()
        if not msg:
            out.put(b"")
            return
        out.put(work(msg) if work else msg)


def _relay(recv_link: ShapedLink, send_link: ShapedLink, work=None) -> None:
    """Receive, transform with ``work`` (None: as it is), send on; an empty message ends."""
    while True:
        msg = recv_link.recv()
        send_link.send(work(msg) if msg and work else msg)
        if not msg:
            return


def _drain(send_link: ShapedLink, q: queue.Queue) -> None:
    while True:
        msg = q.get()
        send_link.send(msg)
        if not msg:
            return


def serve(job_path: str) -> int:
    """A device process: run its part on what comes from upstream, pass results on."""
    from compactor.partition.profile import make_session
    from compactor.profiles import Profile

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    dev = None
    if job["model"]:
        profile = Profile.model_validate(job["profile"])
        dev = Emulated(make_session(job["model"], profile), float(job["slowdown"]), profile,
                       bool(job["emulated"]))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)  # noqa: T201 - to the parent
    down_port = int(sys.stdin.readline())
    down = None
    if down_port:
        down = ShapedLink(socket.create_connection(("127.0.0.1", down_port), timeout=300),
                          float(job["bps"]), float(job["one_way_ms"]))
    listener.settimeout(300)
    conn, _ = listener.accept()
    up = ShapedLink(conn, float(job["up_bps"]), float(job["up_one_way_ms"]))

    def work(msg: bytes) -> bytes:
        if dev is None:
            return msg
        outs = dev.run(decode(msg))
        return encode({o.name: v for o, v in zip(dev.sess.get_outputs(), outs, strict=True)})

    # a hand-off between threads costs a wake-up on a busy host: the last device replies,
    # and a forwarding one passes on, from the thread that received (its link is the
    # stream's pace anyway); a computing one sends from another thread, to overlap them
    if down is None:
        threads = [threading.Thread(target=_relay, args=(up, up, work))]
    elif dev is None:
        threads = [threading.Thread(target=_relay, args=(up, down, work)),
                   threading.Thread(target=_relay, args=(down, up, None))]
    else:
        to_down: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=_pump, args=(up, to_down, work)),
                   threading.Thread(target=_drain, args=(down, to_down)),
                   threading.Thread(target=_relay, args=(down, up, None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"compute_ms": dev.compute_ms if dev else [],  # noqa: T201 - to parent
                      "emulation": dev.summary() if dev else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))


# --------------------------------------------------------------------------- peers


def simulate_spatial(graph, choice, tl, tile_models, rest, topology, sides,
                     feeds: Mapping[str, np.ndarray], requests: int = 10,
                     warmup: int = 2, stream: int | None = None) -> dict:
    """Time a spatial split: the first device (this process) sends the peers' tiles over
    its one shaped interface, computes its own tile, takes the strips back over the same
    interface, and runs the rest; each peer's tile runs in a process of its own. One
    request at a time (latency), then a stream sent back to back (throughput)."""
    from compactor.partition.profile import PAUSE_S

    for s in sides[: choice.k]:
        if s.slowdown < 1:
            from compactor.errors import UsageError

            raise UsageError(f"--simulate cannot make peer {s.role!r} faster than this host",
                             "simulate with slowdown factors of 1 or more")
    hop = topology.hops[0]
    stream = stream or max(12, 2 * requests)
    with tempfile.TemporaryDirectory(prefix="compactor-peers-") as tmp:
        procs: list[subprocess.Popen] = []
        try:
            links = []
            for t in range(1, choice.k):
                p, port = _start_peer(tile_models[t], sides[t], hop, Path(tmp), t)
                procs.append(p)
                links.append(ShapedLink(socket.create_connection(("127.0.0.1", port),
                                                                 timeout=300),
                                        hop.bps, hop.rtt_ms / 2))
            g = _gatherer(graph, choice, tl, tile_models[0], rest, sides[0], links, feeds)
            g.calibrate()
            e2e = []
            for i in range(warmup + requests):
                t0 = time.perf_counter()
                g.one()
                if i >= warmup:
                    e2e.append((time.perf_counter() - t0) * 1000.0)
                time.sleep(PAUSE_S)
            with _HostLoad() as load:
                done = g.stream(stream)
            for lk in links:
                lk.send(b"")
                lk.recv()
                lk.sock.close()
            finished = [_finish(p) for p in procs]
            peer_compute = [f.get("compute_ms", []) for f in finished]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    a = np.asarray(e2e)
    span = done[-1] - done[0]
    return {"processes": choice.k, "requests": requests, "stream_requests": stream,
            "latency_ms": {"p50": float(np.median(a)), "mean": float(a.mean()),
                           "min": float(a.min()), "max": float(a.max())},
            "runs_ms": [round(float(v), 3) for v in a],
            "throughput_rps": (len(done) - 1) / span if span > 0 else float("inf"),
            **load.figures(),
            # the calibrating request is one more run to leave out
            "compute_ms_p50": {"tile0": _p50(g.compute["tile"], warmup + 1),
                               "rest": _p50(g.compute["rest"], warmup + 1),
                               **{f"tile{t}": _p50(c, warmup + 1)
                                  for t, c in enumerate(peer_compute, start=1)}},
            "emulation": {"tile0": g.own.summary(), "rest": g.rest.summary(),
                          **{f"tile{t}": f.get("emulation")
                             for t, f in enumerate(finished, start=1)}},
            "emulated": any(s.slowdown != 1 for s in sides[: choice.k])}


def _p50(runs: Sequence[float], skip: int) -> float | None:
    return float(np.median(runs[skip:])) if len(runs) > skip else None


def _gatherer(graph, choice, tl, own_model, rest, side, links, feeds) -> _Gatherer:
    from compactor.partition.profile import make_session

    name = graph.input_names[0]
    x = feeds[name]
    return _Gatherer(Emulated(make_session(own_model, side.profile), side.slowdown,
                              side.profile, side.emulated),
                     Emulated(make_session(rest, side.profile), side.slowdown, side.profile,
                              side.emulated),
                     {name: np.ascontiguousarray(x[:, :, tl[0].in0:tl[0].in1])},
                     graph.crossing(choice.depth)[0], links,
                     [encode({name: np.ascontiguousarray(x[:, :, t.in0:t.in1])})
                      for t in tl[1:]])


class _Gatherer:
    """The first device of a spatial split: its tile, the scatter and gather over its one
    interface (a shared clock each way), the rest. Its runs hold one lock: one processor."""

    def __init__(self, own: Emulated, rest: Emulated, own_feeds, cut: str, links, msgs):
        self.own, self.rest = own, rest
        self.own_feeds, self.cut, self.links, self.msgs = own_feeds, cut, links, msgs
        tx, rx = [0.0], [0.0]
        for lk in links:
            lk.tx_shared, lk.rx_shared = tx, rx
        self.cpu = threading.Lock()
        self.compute: dict[str, list[float]] = {"tile": [], "rest": []}

    def _run(self, what: str, dev: Emulated, feeds) -> list:
        with self.cpu:
            out = dev.run(feeds)
        self.compute[what].append(dev.compute_ms[-1])
        return out

    def scatter(self, n: int = 1) -> None:
        for _ in range(n):
            for lk, m in zip(self.links, self.msgs, strict=True):
                lk.send(m)

    def finish(self, own_strip) -> None:
        strips = [own_strip] + [next(iter(decode(lk.recv()).values())) for lk in self.links]
        self._run("rest", self.rest, {self.cut: np.concatenate(strips, axis=2)})

    def calibrate(self) -> None:
        """One request with no overlap: each peer, then this device's tile, then the rest,
        alone on the host, so each emulated device measures its steady time undisturbed
        (:class:`Emulated`)."""
        strips = []
        for lk, m in zip(self.links, self.msgs, strict=True):
            lk.send(m)
            strips.append(next(iter(decode(lk.recv()).values())))
        own = self._run("tile", self.own, self.own_feeds)[0]
        self._run("rest", self.rest, {self.cut: np.concatenate([own, *strips], axis=2)})

    def one(self) -> None:
        sender = threading.Thread(target=self.scatter)
        sender.start()
        own = self._run("tile", self.own, self.own_feeds)[0]
        self.finish(own)
        sender.join()

    def stream(self, n: int) -> list[float]:
        """``n`` requests back to back; returns when each request's rest was done. The
        link sends the peers' tiles in a thread of its own; the processor works in the order
        a device would: the next request's own tile while this one's strips travel, then
        this one's rest (at most one tile ahead; a queue of tiles could run ahead of the
        rests, and the replies' spacing then miss those tiles' time). The last cycle, too,
        runs a tile (unused): every gap between two replies holds one tile and one rest."""
        sender = threading.Thread(target=self.scatter, args=(n,), daemon=True)
        sender.start()
        own = self._run("tile", self.own, self.own_feeds)[0]
        done = []
        for _ in range(n):
            nxt = self._run("tile", self.own, self.own_feeds)[0]
            self.finish(own)
            done.append(time.perf_counter())
            own = nxt
        sender.join()
        return done


def _start_peer(model, side, hop, tmp: Path, t: int) -> tuple[subprocess.Popen, int]:
    path = tmp / f"tile{t}.onnx"
    path.write_bytes(model.SerializeToString())
    p, port = _spawn(tmp / f"peer{t}.json", str(path), side, True, None, hop)
    assert p.stdin is not None
    p.stdin.write("0\n")
    p.stdin.flush()
    return p, port


def _spawn(job: Path, model: str | None, side, last: bool, hop, up
           ) -> tuple[subprocess.Popen, int]:
    """One device's process (its part ``model``, or None to forward), sending on ``hop``
    (None: it replies) and receiving on ``up``; it answers with the port it listens on."""
    job.write_text(json.dumps({
        "model": model, "profile": side.profile.model_dump(mode="json", by_alias=True),
        "slowdown": side.slowdown, "emulated": side.emulated, "last": last,
        "bps": hop.bps if hop else None, "one_way_ms": hop.rtt_ms / 2 if hop else None,
        "up_bps": up.bps, "up_one_way_ms": up.rtt_ms / 2,
    }), encoding="utf-8")
    p = subprocess.Popen([sys.executable, "-m", "compactor.partition.simulate_chain",
                          str(job)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline() if p.stdout else ""
    if not line:
        raise _failed(p)
    return p, json.loads(line)["port"]
