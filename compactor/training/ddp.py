"""Data-parallel training under ``torchrun``.

When ``WORLD_SIZE`` > 1, every process runs the same pipeline; the training pass joins a
process group (nccl on GPUs, gloo on CPU), wraps the student in DistributedDataParallel and
trains on its own share of the batches. Only rank 0 writes (checkpoints, the run folder, the
artifact); the other ranks stop after the last pass that trains.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

# A rank waits at the process group while rank 0 measures stages; give it time.
TIMEOUT = _dt.timedelta(minutes=60)


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def launched() -> bool:
    """True when this process is one of several started by torchrun."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def ensure_initialized(use_cuda: bool) -> bool:
    """Join the process group if launched under torchrun; True when distributed."""
    if not launched():
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            import torch

            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def initialized() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group, if this process joined one: every rank waits for the
    others first (a rank tearing its group down while a peer was still in its last
    collective aborted the peer, SIGABRT "terminate called without an active exception",
    seen in a full test run on a 2-core host)."""
    if initialized():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def shard(items: Sequence[Any], rank_: int, world: int) -> list[Any]:
    """This rank's share of ``items``: every ``world``-th one, starting at ``rank_``.

    The list is cut to a multiple of ``world`` first, so every rank takes the same number
    of steps (a rank with one step more would wait forever for the others' gradients)."""
    n = (len(items) // world) * world
    return [items[i] for i in range(rank_, n, world)]


def any_flag(flags: Sequence[bool], device: Any = None) -> list[bool]:
    """Each flag OR-ed over all ranks (a no-op when not distributed).

    Used every step so that a NaN loss or a Ctrl-C seen by one rank stops them all at the
    same step."""
    if not initialized():
        return list(flags)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def wrap(module: Any, device: Any, find_unused: bool = False) -> Any:
    """``module`` wrapped in DistributedDataParallel (unchanged when not distributed).

    ``find_unused``: some parameters get no gradient (a transformer's unused pooler, say);
    DDP must then look for them every step."""
    if not initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if getattr(device, "type", "cpu") == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
