"""compactor/training/ddp.py: the training loop data-parallel over two CPU processes."""

from __future__ import annotations

import os

import torch

_DDP_WORKER = '''
import json, sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compactor.progress import Progress
from compactor.training import ddp
from compactor.training.loop import EvalResult, LoopConfig, TrainTask, train

out = Path(sys.argv[1])
assert ddp.ensure_initialized(use_cuda=False)
torch.manual_seed(ddp.rank())  # different initial weights: DDP must broadcast rank 0's
module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
wrapped = ddp.wrap(module, torch.device("cpu"))
g = torch.Generator().manual_seed(1)
batches = [torch.randn(8, 4, generator=g) for _ in range(7)]  # 7: one is left out
seen = []

def step(x):
    seen.append(float(x[0, 0]))
    loss = F.mse_loss(wrapped(x), x.sum(1, keepdim=True))
    return loss, {"mse": loss}, len(x)

def evaluate():
    with torch.no_grad():
        loss = float(sum(F.mse_loss(module(x), x.sum(1, keepdim=True)) for x in batches))
    return EvalResult(value=-loss, loss=loss)

task = TrainTask(module, step, evaluate, batches, "score", True, torch.device("cpu"))
ckpt = out / f"rank{ddp.rank()}"
result = train(task, LoopConfig(epochs=2, lr=0.01), ckpt, key="k", progress=Progress(),
               writable=ddp.is_main())
torch.save(module.state_dict(), out / f"weights{ddp.rank()}.pt")
(out / f"result{ddp.rank()}.json").write_text(json.dumps({**result.to_record(), "seen": seen}))
ddp.shutdown()
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_training_with_two_cpu_processes(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    for _attempt in range(2):  # a free port can be taken before rank 0 binds it: retry once
        port = str(_free_port())
        procs = []
        for rank in (0, 1):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=120)[0] for p in procs]
        if not any("address already in use" in o.lower() for o in outs):
            break
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k}: the ranks' weights differ"
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["steps"] == r1["steps"] == 2 * 3
    for epoch in (slice(0, 3), slice(3, 6)):  # each epoch, each rank has its own batches
        assert not set(r0["seen"][epoch]) & set(r1["seen"][epoch]), (r0["seen"], r1["seen"])
    assert (tmp_path / "rank0" / "last.pt").is_file()
    assert not (tmp_path / "rank1").exists(), "only rank 0 writes checkpoints"
