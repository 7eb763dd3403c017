"""Latency measurement in a fresh process, so the caller's threads and memory (a torch
training loop, say) do not distort it.

Run as ``python -m compactor.measure.worker JOB.json``. The job names the model, the
profile's settings, one ``.npz`` of inputs per batch size and the timing settings. The worker
prints one JSON line per batch size as it finishes, then a final line with the session's
cold-start figures and the process's memory.

Peak memory is the process's own high-water mark (``VmHWM``), which exec resets; the
``ru_maxrss`` of getrusage would carry over the parent's peak from before the fork.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def main(job_path: str) -> int:
    import numpy as np
    import onnxruntime  # noqa: F401 - loaded before the baseline RSS is read

    from compactor.measure.latency import measure_latency, session
    from compactor.profiles import Profile

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    profile = Profile.model_validate(job["profile"])
    runtime_rss = rss_mb()
    threads, _ = profile.threads_on_host()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    sess = session(Path(job["model"]), profile)
    create_ms = (time.perf_counter() - t0) * 1000.0
    first_ms = None
    for bs, feeds_path in job["feeds"].items():
        with np.load(feeds_path) as npz:
            feeds = {k: npz[k] for k in npz.files}
        if first_ms is None:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            first_ms = (time.perf_counter() - t0) * 1000.0
        lat = measure_latency(sess, feeds, int(bs), threads=threads, **job.get("timing", {}))
        print(json.dumps({"latency": lat.to_dict()}), flush=True)  # noqa: T201 - to the parent
    print(json.dumps({  # noqa: T201 - to the parent: stdout is this process's report
        "session_create_ms": create_ms,
        "first_run_ms": first_ms,
        "peak_rss_mb": peak_rss_mb(),
        "runtime_rss_mb": runtime_rss,
        "providers": sess.get_providers(),
        "threads": threads,
        "load_avg_1m": load,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
