"""Latency measurement in a fresh process, so the caller's threads and memory (a torch
training loop, say) do not distort it.

Run as ``python -m compactor.measure.worker JOB.json``. The job names the model, the
profile's settings, one ``.npz`` of inputs per batch size and the timing limits. The worker
prints one JSON line per batch size as it finishes, then a final line with the session's
cold-start figures and the process's peak memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main(job_path: str) -> int:
    import numpy as np

    from compactor.measure.latency import measure_latency, session
    from compactor.profiles import Profile

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    profile = Profile.model_validate(job["profile"])
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
        lat = measure_latency(sess, feeds, int(bs), **job.get("timing", {}))
        print(json.dumps({"latency": lat.to_dict()}), flush=True)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"session_create_ms": create_ms, "first_run_ms": first_ms,
                      "peak_rss_mb": rss_kb / 1024.0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
