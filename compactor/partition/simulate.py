"""``--simulate``: run the head and the tail in two processes over a shaped loopback link
and time whole requests for real.

The link is shaped in userspace on both ends of one TCP connection over 127.0.0.1:

- bandwidth: the sender paces each message at the link's rate (the clock decides when
  each chunk may leave) and stamps it with the time its last byte has gone out at that
  rate, ``bytes / rate`` after its first, so a message takes its transmission time however
  fast loopback is;
- round-trip time: the receiver hands a message over ``rtt / 2`` after that stamp
  (CLOCK_MONOTONIC is shared by processes on one host), so a request and its reply
  together add one RTT. Delivering at the stamped time, rather than when the bytes came
  in, keeps a late wake-up of the sender on a busy host out of the measurement, as long
  as it is shorter than the one-way delay.

The device side runs in the calling process, the server side in a child process
(``python -m compactor.partition.simulate JOB.json``), each with its profile's ONNX
Runtime settings. Where a profile stands for a slower machine (slowdown factor above 1),
each part's run takes the factor times this host's steady time for it, as the planner
defines that machine (:class:`Emulated`): an emulation, labelled as one. A factor below 1
(a faster server than this host) cannot be emulated and is refused.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_LEN = struct.Struct("!Q")
_STAMP = struct.Struct("!d")


SPIN_S = 0.0003  # a sleep wakes ~0.1 ms late here: the last of each wait is spun


def _sleep_until(t: float) -> None:
    """Wait until ``t`` (time.monotonic): one sleep to within ``SPIN_S`` of it, then a spin
    (a sleep's wake-up runs ~0.1 ms late on a quiet host, more on a busy one, and a request
    waits several times on its way: the emulation would add that to every link and
    device)."""
    left = t - time.monotonic() - SPIN_S
    if left > 0:
        time.sleep(left)
    while time.monotonic() < t:
        pass


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    """A message: a small binary header naming each tensor, then the raw bytes."""
    parts = [struct.pack("!I", len(tensors))]
    for name, v in tensors.items():
        n, dt = name.encode(), v.dtype.str.encode()
        parts += [struct.pack("!H", len(n)), n, struct.pack("!B", len(dt)), dt,
                  struct.pack("!B", v.ndim), struct.pack(f"!{v.ndim}Q", *v.shape)]
    parts += [np.ascontiguousarray(v).tobytes() for v in tensors.values()]
    return b"".join(parts)


def message_bytes(tensors: Sequence[tuple[str, str, Sequence[int]]]) -> int:
    """Bytes on the link for tensors given as (name, numpy dtype, shape): what
    :func:`encode` makes plus the link's length prefix. The planner costs the same bytes."""
    total = _LEN.size + 4
    for name, dtype, shape in tensors:
        dt = np.dtype(dtype)
        total += 2 + len(name.encode()) + 1 + len(dt.str) + 1 + 8 * len(shape)
        total += int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    return total


def decode(buf: bytes) -> dict[str, np.ndarray]:
    (count,) = struct.unpack_from("!I", buf)
    off, meta = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("!H", buf, off)
        name = buf[off + 2: off + 2 + n].decode()
        off += 2 + n
        (k,) = struct.unpack_from("!B", buf, off)
        dt = np.dtype(buf[off + 1: off + 1 + k].decode())
        off += 1 + k
        (nd,) = struct.unpack_from("!B", buf, off)
        shape = struct.unpack_from(f"!{nd}Q", buf, off + 1)
        off += 1 + 8 * nd
        meta.append((name, dt, shape))
    out = {}
    for name, dt, shape in meta:
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(buf, dt, count, off).reshape(shape)
        off += count * dt.itemsize
    return out


class ShapedLink:
    """One end of a loopback TCP connection with a rate limit and a one-way delay."""

    def __init__(self, sock: socket.socket, bps: float, one_way_ms: float):
        self.sock = sock
        self.rate = bps / 8.0  # bytes per second
        self.delay_s = one_way_ms / 1000.0
        self.free_at = 0.0  # when the last message sent has gone out at the link's rate
        # links into or out of one device that share its network interface share a clock
        # (one-element lists): their messages queue behind each other's
        self.tx_shared: list[float] | None = None
        self.rx_shared: list[float] | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes) -> None:
        """Pace ``payload`` at the link's rate; the stamp says when its last byte has gone
        out at that rate (the receiver delivers it one delay later, which also absorbs any
        lateness of the paced chunks)."""
        data = _LEN.pack(len(payload)) + payload
        chunk = int(max(1024, min(256 * 1024, self.rate * 0.002)))  # ~2 ms of data
        # back-to-back messages (a pipelined stream) queue behind each other on the link
        t0 = max(time.monotonic(), self.free_at,
                 self.tx_shared[0] if self.tx_shared is not None else 0.0)
        _sleep_until(t0)
        view = memoryview(data)
        for off in range(0, len(data), chunk):
            if off:
                _sleep_until(t0 + off / self.rate)
            self.sock.sendall(view[off: off + chunk])
        self.free_at = t0 + len(data) / self.rate
        if self.tx_shared is not None:
            self.tx_shared[0] = self.free_at
        self.sock.sendall(_STAMP.pack(self.free_at))

    def recv(self) -> bytes:
        (n,) = _LEN.unpack(self._exact(_LEN.size))
        payload = self._exact(n)
        (sent,) = _STAMP.unpack(self._exact(_STAMP.size))
        if self.rx_shared is not None:  # behind what came in before on the same interface
            sent = max(sent, self.rx_shared[0] + (n + _LEN.size) / self.rate)
            self.rx_shared[0] = sent
        _sleep_until(sent + self.delay_s)
        return payload

    def _exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("the other side closed the link")
            got += k
        return bytes(buf)


class Emulated:
    """One device's part as the simulation runs it.

    A device slower than this host (``slowdown`` > 1) is emulated as the planner defines it:
    each run takes ``slowdown`` x this host's steady time for the part. That time is
    measured here, in the device's own process, back to back (as the planner times an
    emulated device) on the first request's inputs before that request runs; each run then
    computes the part and sleeps until its time is up. Scaling each run's own time instead
    would multiply how cold this host is after the sleep (1.8x on a small CNN) by the
    slowdown. A run that overruns its time (a busy host) keeps its own length, counted in
    ``overruns``. A device at slowdown 1 is this host: its runs are simply timed."""

    def __init__(self, sess, slowdown: float, profile, emulate: bool | None = None):
        self.sess, self.slowdown, self.profile = sess, slowdown, profile
        self.emulate = slowdown != 1 if emulate is None else emulate
        self.host_ms: float | None = None  # this host's steady time, once measured
        self.compute_ms: list[float] = []
        self.overruns = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> list:
        from compactor.partition.profile import TimingSettings, time_session

        feeds = {i.name: feeds[i.name] for i in self.sess.get_inputs()}
        if self.emulate and self.host_ms is None:
            self.host_ms = time_session(self.sess, feeds,
                                        TimingSettings.of(self.profile, quick=False), 0.0)
        t0 = time.monotonic()
        outs = self.sess.run(None, feeds)
        if self.host_ms is not None:
            end = t0 + self.slowdown * self.host_ms / 1000.0
            if time.monotonic() < end:
                _sleep_until(end)
            else:
                self.overruns += 1
        self.compute_ms.append((time.monotonic() - t0) * 1000.0)
        return outs

    def summary(self) -> dict:
        return {"slowdown": self.slowdown, "host_ms": self.host_ms,
                "runs": len(self.compute_ms), "overruns": self.overruns}



# --------------------------------------------------------------------------- server


def serve(job_path: str) -> int:
    """The server process: receive tensors, run the tail, send the outputs back."""
    from compactor.partition.profile import make_session
    from compactor.profiles import Profile

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    profile = Profile.model_validate(job["profile"])
    dev = Emulated(make_session(job["model"], profile), float(job["slowdown"]), profile,
                   bool(job["emulated"]))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)  # noqa: T201 - to the parent
    listener.settimeout(60)
    conn, _ = listener.accept()
    link = ShapedLink(conn, float(job["bps"]), float(job["one_way_ms"]))
    while True:
        try:
            payload = link.recv()
        except ConnectionError:
            break
        if not payload:
            break
        outs = dev.run(decode(payload))
        link.send(encode({o.name: v for o, v in zip(dev.sess.get_outputs(), outs,
                                                    strict=True)}))
    conn.close()
    print(json.dumps({"server_ms": dev.compute_ms,  # noqa: T201 - to the parent
                      "emulation": dev.summary()}), flush=True)
    return 0


# --------------------------------------------------------------------------- device


def simulate(head, tail, device, server, bps: float, rtt_ms: float,
             feeds: Mapping[str, np.ndarray], requests: int = 10, warmup: int = 2,
             max_seconds: float = 60.0, expected_ms: float | None = None) -> dict:
    """Time ``requests`` whole requests: head here, tail in a server process.

    ``head``/``tail`` are ModelProtos or None (offload has no head, on-device no tail);
    ``device``/``server`` are :class:`~compactor.partition.profile.Side`. Returns the
    end-to-end milliseconds (p50, mean, each run) and the device and server compute parts.
    """
    from compactor.errors import UsageError
    from compactor.partition.profile import make_session

    for side in (device, server):
        if side.slowdown < 1:
            raise UsageError(
                f"--simulate cannot make the {side.role} faster than this host (its "
                f"slowdown is {side.slowdown:.3g})",
                "simulate with slowdown factors of 1 or more, or plan without --simulate",
            )
    if expected_ms and expected_ms > 0:
        requests = max(3, min(requests, int(max_seconds * 1000 / expected_ms)))
    head_sess = make_session(head, device.profile) if head is not None else None
    run = _Requests(head_sess, device, feeds, warmup, requests)
    server_ms: list[float] = []
    emulation = {}
    if tail is None:
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            _, ms = run.head()
            run.done(i, t0, ms)
    else:
        server_ms, emulation["server"] = _run_with_server(run, tail, server, bps, rtt_ms)
    if run.dev is not None:
        emulation["device"] = run.dev.summary()
    a = np.asarray(run.e2e)
    return {
        "requests": requests, "warmup": warmup, "uplink_bps": bps, "rtt_ms": rtt_ms,
        "measured_ms": {"p50": float(np.median(a)), "mean": float(a.mean()),
                        "min": float(a.min()), "max": float(a.max())},
        "runs_ms": [round(float(x), 3) for x in a],
        "device_ms_p50": float(np.median(run.dev_ms)) if run.dev_ms else 0.0,
        "server_ms_p50": float(np.median(server_ms)) if server_ms else 0.0,
        "emulation": {k: v for k, v in emulation.items() if v and v["host_ms"] is not None},
    }


@dataclass
class _Requests:
    """The device's side of the requests: runs the head (as fast as the device,
    :class:`Emulated`) and keeps the times after the warm-up."""

    head_sess: Any
    device: Any
    feeds: Mapping[str, np.ndarray]
    warmup: int
    requests: int
    e2e: list[float] = field(default_factory=list)
    dev_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        d, sess = self.device, self.head_sess
        self.dev = (Emulated(sess, d.slowdown, d.profile, d.emulated) if sess is not None
                    else None)
        self._out = [o.name for o in sess.get_outputs()] if sess is not None else []

    def head(self) -> tuple[dict[str, np.ndarray], float]:
        """What the device sends, and its compute ms (the device's, when emulated)."""
        if self.dev is None:
            return dict(self.feeds), 0.0
        vals = self.dev.run(self.feeds)
        return dict(zip(self._out, vals, strict=True)), self.dev.compute_ms[-1]

    def done(self, i: int, t0: float, ms: float) -> None:
        from compactor.partition.profile import PAUSE_S

        if i >= self.warmup:
            self.e2e.append((time.perf_counter() - t0) * 1000.0)
            self.dev_ms.append(ms)
        time.sleep(PAUSE_S)


def _run_with_server(run: _Requests, tail, server, bps: float, rtt_ms: float
                     ) -> tuple[list[float], dict | None]:
    """The requests with the tail in a server process over a shaped loopback link; returns
    the server's compute milliseconds after the warm-up, and its emulation's figures."""
    with tempfile.TemporaryDirectory(prefix="compactor-simulate-") as tmp:
        tail_path = Path(tmp) / "tail.onnx"
        tail_path.write_bytes(tail.SerializeToString())
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({
            "model": str(tail_path),
            "profile": server.profile.model_dump(mode="json", by_alias=True),
            "slowdown": server.slowdown, "emulated": server.emulated, "bps": bps,
            "one_way_ms": rtt_ms / 2.0,
        }), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "compactor.partition.simulate",
                                 str(job)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                raise _server_failed(proc)
            port = json.loads(line)["port"]
            sock = socket.create_connection(("127.0.0.1", port), timeout=120)
            link = ShapedLink(sock, bps, rtt_ms / 2.0)
            for i in range(run.warmup + run.requests):
                t0 = time.perf_counter()
                sent, ms = run.head()
                link.send(encode(sent))
                decode(link.recv())
                run.done(i, t0, ms)
            link.send(b"")
            sock.close()
            return _server_times(proc, run.warmup)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _server_times(proc: subprocess.Popen, warmup: int) -> tuple[list[float], dict | None]:
    rest, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise _server_failed(proc, err)
    for ln in reversed(rest.splitlines()):
        if ln.startswith("{"):
            last = json.loads(ln)
            return last.get("server_ms", [])[warmup:], last.get("emulation")
    return [], None


def _server_failed(proc: subprocess.Popen, err: str | None = None):
    from compactor.errors import PassError

    if err is None:
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    last = [ln for ln in (err or "").splitlines() if ln.strip()]
    return PassError(f"the simulated server failed: {last[-1][:300] if last else 'no output'}",
                     "rerun with --debug; the server runs `python -m "
                     "compactor.partition.simulate`")


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
