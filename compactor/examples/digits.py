"""The bundled demo: a small CNN on scikit-learn's real handwritten digits.

The 8x8 digit images are upsampled to 16x16. The CNN is trained on first use and cached
under the user's cache folder, so later runs reuse it. The demo recipe builds it at width 64
(2.15M parameters, 94.5M MACs: enough for pruning and int8 to win at batch 1) and trains it
8 epochs, about half a minute on 2 idle cores.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

N_TRAIN = 1200  # of 1797 samples; the rest is the held-out eval split
SIZE = 16


def cache_dir() -> Path:
    root = os.environ.get("COMPACTOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "compactor"
    )
    return Path(root)


def _splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = x.repeat(SIZE // 8, axis=1).repeat(SIZE // 8, axis=2)  # 8x8 -> 16x16
    x = ((x - 0.3) / 0.4)[:, None, :, :].astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    tr, ev = order[:N_TRAIN], order[N_TRAIN:]
    return x[tr], y[tr], x[ev], y[ev]


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def train_batches(batch_size: int = 32):
    x, y, _, _ = _splits()
    return _batches(x, y, batch_size)


def calibration_batches(batch_size: int = 32):
    """Training images (never eval ones) for int8 calibration."""
    x, y, _, _ = _splits()
    return _batches(x[:256], y[:256], batch_size)


def eval_batches(batch_size: int = 64):
    _, _, x, y = _splits()
    return _batches(x, y, batch_size)


def build(width: int = 48):
    """The demo CNN, untrained: five 3x3 conv blocks, global pooling, a linear head."""
    from torch import nn

    w = width

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, w),
        *block(w, 2 * w),
        nn.MaxPool2d(2),  # 8x8
        *block(2 * w, 4 * w),
        *block(4 * w, 4 * w),
        nn.MaxPool2d(2),  # 4x4
        *block(4 * w, 8 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, 10),
    )


def _fingerprint(width: int, epochs: int) -> str:
    src = inspect.getsource(build) + inspect.getsource(_train) + inspect.getsource(_splits)
    return hashlib.sha256(f"{src}{width}{epochs}".encode()).hexdigest()[:12]


def _train(model, epochs: int, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    x, y, _, _ = _splits()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(xt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb = xt[idx]
            # small random shifts: the digits set is tiny, this keeps the CNN honest
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _training_threads(model) -> int:
    """The faster of all threads and one, timed on a few training steps of a copy.

    On a shared machine whose other cores are busy, torch's threads wait for each other at
    every small op: measured on a 2-core host at 1-min load 3.3, one epoch of the width-64
    CNN took 21-26 s on 2 threads and 6-7 s on one."""
    import copy
    import time

    import torch

    many = torch.get_num_threads()
    if many <= 1:
        return many
    x, y, _, _ = _splits()
    xb, yb = torch.from_numpy(x[:64]), torch.from_numpy(y[:64])
    probe = copy.deepcopy(model).train()
    opt = torch.optim.SGD(probe.parameters(), lr=0.0)
    best: tuple[float, int] | None = None
    for n in (many, 1):
        torch.set_num_threads(n)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(probe(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        t = times[-1]  # the first step warms the thread pool up
        if best is None or t < best[0]:
            best = (t, n)
    torch.set_num_threads(many)
    return best[1]


def build_pretrained(width: int = 48, epochs: int = 12):
    """The demo CNN trained on the digits' train split, cached after the first call."""
    import torch

    model = build(width)
    path = cache_dir() / f"digits-cnn-{_fingerprint(width, epochs)}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # noqa: BLE001 - a damaged cache is retrained, not fatal
            log.warning("cached demo weights at %s are unreadable; retraining", path)
    log.info("training the demo CNN (first run only); caching to %s", path)
    threads = torch.get_num_threads()
    torch.set_num_threads(_training_threads(model))
    try:
        _train(model, epochs)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent run never reads half a file
    return model.eval()
