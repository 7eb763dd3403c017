"""The training loop of a training pass.

AdamW (no weight decay on biases and norms), linear warmup then cosine decay, a budget in
epochs or steps, gradient clipping, an evaluation on the eval split after every epoch that
keeps the best weights and can stop early, a fixed seed, and a checkpoint after every epoch.

Interrupts are graceful: Ctrl-C (SIGINT) or SIGTERM during training lets the current step
finish, saves a checkpoint, then raises KeyboardInterrupt; a second Ctrl-C stops at once.
A NaN/inf loss or gradient stops training with a PassError and leaves the last good
checkpoint in place. Under torchrun every rank takes the same number of steps on its own
share of the batches, and only the rank that writes saves checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from compactor.errors import PassError, RecipeError
from compactor.training import ddp
from compactor.training.checkpoint import load_torch, save_torch
from compactor.training.threads import ThreadChooser

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 3
    steps: int | None = None  # when set: the budget in optimizer steps, not epochs
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of all steps spent warming up
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    select_best: bool = True
    patience: int | None = None  # epochs without improvement before stopping
    min_delta: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class EvalResult:
    """The metric on the eval split (``value``), the training loss there (``loss``) and,
    where the loss has several terms, each of them (``parts``, e.g. one per model output)."""

    value: float
    loss: float
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainTask:
    """What the loop trains: ``module`` (its parameters are optimized and its state
    checkpointed), ``step`` (one batch → loss, its weighted parts, samples seen),
    ``evaluate`` (the eval split → EvalResult) and the training ``batches``."""

    module: nn.Module
    step: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor], int]]
    evaluate: Callable[[], EvalResult]
    batches: Sequence[Any]
    metric_name: str = "metric"
    higher_is_better: bool = True
    device: Any = None


@dataclass
class TrainResult:
    epochs: int
    steps: int
    total_steps: int
    best_epoch: int | None
    best: EvalResult | None
    stopped_early: bool
    resumed_from: dict[str, int] | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_s: float = 0.0
    world_size: int = 1
    threads: dict[str, Any] | None = None  # the thread count the loop chose, and why

    def to_record(self) -> dict[str, Any]:
        return {
            "epochs_run": self.epochs,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "best_epoch": self.best_epoch,
            "best_metric": None if self.best is None else round(self.best.value, 6),
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
            "history": self.history,
            "train_seconds": round(self.seconds, 2),
            "samples_per_s": round(self.samples_per_s, 1),
            "world_size": self.world_size,
            **({"threads": self.threads} if self.threads else {}),
        }


# --------------------------------------------------------------------------- pieces


def lr_lambda(total: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0 (or flat)."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def optimizer_for(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The batch order of one epoch: a permutation fixed by the seed and the epoch, so a
    resumed run (and every rank) sees the same order as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


class _Stop:
    requested = False
    signal_name = ""


@contextlib.contextmanager
def graceful_interrupt() -> Iterator[_Stop]:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next safe point."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        if stop.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        stop.requested = True
        stop.signal_name = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _better(new: EvalResult, best: EvalResult | None, higher: bool, min_delta: float) -> bool:
    """Better metric; on a tie (accuracy often ties), the lower eval loss wins."""
    if best is None:
        return True
    gain = (new.value - best.value) if higher else (best.value - new.value)
    if gain > min_delta:
        return True
    return gain >= 0 and abs(gain) <= 1e-12 and new.loss < best.loss


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rng_state(device: Any) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if getattr(device, "type", "cpu") == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: Any) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- the loop


def train(task: TrainTask, cfg: LoopConfig, checkpoint_dir: Path, *, key: str,
          progress: Any, resume: bool = False, writable: bool = True,
          label: str = "train") -> TrainResult:
    """Train ``task.module`` in place; on return it holds the best weights (or the last,
    with ``select_best`` off)."""
    t_start = time.perf_counter()
    run = _Run(task, cfg, checkpoint_dir, key=key, writable=writable, label=label)
    if resume and run.last_path.is_file():
        run.resume()
    t_train = time.perf_counter()
    st = run.st
    with progress.task(f"{label}", total=run.total) as bar, graceful_interrupt() as stop:
        if st["global_step"]:
            bar.advance(st["global_step"])
        try:
            while st["epoch"] < run.epochs and not st["stopped_early"]:
                run.train_epoch(bar, stop)
                run.end_epoch()
                (stopping,) = ddp.any_flag([stop.requested], task.device)
                if stopping:
                    raise KeyboardInterrupt(f"{label}: stopped by {stop.signal_name}")
        finally:
            run.threads.restore()
    if cfg.select_best and run.best_state is not None:
        task.module.load_state_dict(run.best_state)
    return run.result(t_start, t_train)


class _Run:
    """One call of :func:`train`: its optimizer and schedule, the counters a checkpoint
    carries (``st``: plain values, so a resumed run continues where this one stopped), the
    best weights so far and the throughput figures."""

    def __init__(self, task: TrainTask, cfg: LoopConfig, checkpoint_dir: Path, *, key: str,
                 writable: bool, label: str) -> None:
        self.task, self.cfg, self.key, self.writable, self.label = (
            task, cfg, key, writable, label)
        self.world, self.rank = (ddp.world_size(), ddp.rank()) if ddp.initialized() else (1, 0)
        self.n_batches = len(task.batches)
        per_epoch = self.n_batches // self.world
        if per_epoch < 1:
            raise PassError(
                f"{label}: {self.n_batches} training batch(es) cannot be shared by "
                f"{self.world} processes",
                "give data.train more batches, or launch fewer processes",
            )
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        self.epochs = math.ceil(self.total / per_epoch)
        self.opt = optimizer_for(task.module, cfg.lr, cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.total, round(cfg.warmup * self.total), cfg.schedule)
        )
        self.st: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0,
                                   "best": None, "best_epoch": None, "bad_epochs": 0,
                                   "history": [], "stopped_early": False}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.resumed_from: dict[str, int] | None = None
        self.checkpoint_dir = checkpoint_dir
        self.last_path, self.best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
        self.seen = self.steps_here = 0
        self.loss_ema: float | None = None
        self.parts_ema: dict[str, float] = {}
        self.last_metric: float | None = None
        self.step_time = 0.0
        self.threads = ThreadChooser(task.device, self.total, distributed=self.world > 1)

    def resume(self) -> None:
        st, module = self.st, self.task.module
        ck = load_torch(self.last_path)
        if ck.get("key") != self.key:
            raise RecipeError(
                f"cannot resume: the checkpoint in {self.checkpoint_dir} was saved by a run "
                "with different settings",
                "rerun without --resume to start over",
            )
        module.load_state_dict(ck["module"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"], self.task.device)
        st.update(ck["state"])
        if st["best"] is not None:  # saved as plain values (weights-only checkpoints)
            st["best"] = EvalResult(**st["best"])
        if self.best_path.is_file():
            self.best_state = load_torch(self.best_path)["module"]
        self.resumed_from = {"epoch": st["epoch"], "step": st["global_step"]}
        self.loss_ema = st.get("loss_ema")
        self.parts_ema = dict(st.get("parts_ema") or {})
        self.last_metric = st["best"].value if st["best"] else None
        log.info("%s: resuming at epoch %d, step %d", self.label, st["epoch"],
                 st["global_step"])

    def save_last(self) -> None:
        if not self.writable:
            return
        st = self.st
        st["loss_ema"] = self.loss_ema
        st["parts_ema"] = dict(self.parts_ema)
        # Tensors and plain values only: it is read back with weights_only=True.
        state = {**st, "best": None if st["best"] is None else dataclasses.asdict(st["best"])}
        save_torch({"key": self.key, "module": self.task.module.state_dict(),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "rng": _rng_state(self.task.device), "state": state}, self.last_path)

    def train_epoch(self, bar: Any, stop: _Stop) -> None:
        """The steps left in the current epoch (all of them, unless resumed mid-epoch), up
        to the step budget."""
        st = self.st
        mine = ddp.shard(epoch_order(self.cfg.seed, st["epoch"], self.n_batches), self.rank,
                         self.world)
        while st["step_in_epoch"] < len(mine) and st["global_step"] < self.total:
            stopping = self._step(self.task.batches[mine[st["step_in_epoch"]]], stop)
            bar.advance()
            self.steps_here += 1
            _status(bar, st["epoch"], self.epochs, self.loss_ema, self.task.metric_name,
                    self.last_metric, self.seen, self.steps_here, self.step_time,
                    self.total - st["global_step"])
            if stopping:
                self.save_last()
                raise KeyboardInterrupt(f"{self.label}: stopped by {stop.signal_name}")

    def _step(self, batch: Any, stop: _Stop) -> bool:
        """One optimizer step on ``batch``; whether any rank was asked to stop. A non-finite
        loss or gradient on any rank stops every rank before the weights change."""
        task, st, module = self.task, self.st, self.task.module
        self.threads.before(self.steps_here)
        t0 = time.perf_counter()
        module.train()
        loss, parts, n = task.step(batch)
        self.opt.zero_grad(set_to_none=True)
        local_bad = not bool(torch.isfinite(loss.detach()))
        if not local_bad:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                module.parameters(), self.cfg.max_grad_norm or float("inf")
            )
            local_bad = not bool(torch.isfinite(norm))
        bad, stopping = ddp.any_flag([local_bad, stop.requested], task.device)
        if bad:
            _raise_non_finite(self.label, st, loss, parts, self.last_path)
        self.opt.step()
        self.sched.step()
        st["step_in_epoch"] += 1
        st["global_step"] += 1
        self.seen += n * self.world
        self.step_time += time.perf_counter() - t0
        self.threads.after(self.steps_here, time.perf_counter() - t0)
        value = float(loss.detach())
        self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        if len(parts) > 1:  # a loss of one term says it all in loss_ema
            for k, v in parts.items():
                v = float(v.detach())
                old = self.parts_ema.get(k)
                self.parts_ema[k] = v if old is None else 0.9 * old + 0.1 * v
        return stopping

    def end_epoch(self) -> None:
        """The end of an epoch (or of the step budget): evaluate, keep the best weights,
        count epochs without improvement, checkpoint."""
        st, cfg, task = self.st, self.cfg, self.task
        epoch = st["epoch"]
        res = task.evaluate()
        self.last_metric = res.value
        entry = {"epoch": epoch + 1, "step": st["global_step"],
                 "train_loss": round(self.loss_ema, 6) if self.loss_ema else None,
                 "eval_loss": round(res.loss, 6),
                 task.metric_name: round(res.value, 6)}
        if self.parts_ema:
            entry["train_parts"] = {k: round(v, 6) for k, v in self.parts_ema.items()}
        if res.parts:
            entry["eval_parts"] = {k: round(v, 6) for k, v in res.parts.items()}
        st["history"].append(entry)
        if _better(res, st["best"], task.higher_is_better, cfg.min_delta):
            st["best"], st["best_epoch"], st["bad_epochs"] = res, epoch + 1, 0
            self.best_state = {k: v.detach().clone()
                               for k, v in task.module.state_dict().items()}
            if self.writable:
                save_torch({"key": self.key, "module": self.best_state, "epoch": epoch + 1},
                           self.best_path)
        else:
            st["bad_epochs"] += 1
            if cfg.patience is not None and st["bad_epochs"] >= cfg.patience:
                st["stopped_early"] = True
        st["epoch"] += 1
        st["step_in_epoch"] = 0
        if st["global_step"] >= self.total:
            st["epoch"] = self.epochs
        self.save_last()

    def result(self, t_start: float, t_train: float) -> TrainResult:
        st = self.st
        train_s = time.perf_counter() - t_train
        return TrainResult(
            epochs=len(st["history"]),
            steps=st["global_step"],
            total_steps=self.total,
            best_epoch=st["best_epoch"],
            best=st["best"],
            stopped_early=st["stopped_early"],
            resumed_from=self.resumed_from,
            history=st["history"],
            seconds=time.perf_counter() - t_start,
            samples_per_s=self.seen / train_s if train_s > 0 and self.seen else 0.0,
            world_size=self.world,
            threads=self.threads.record(),
        )


def _status(bar: Any, epoch: int, epochs: int, loss: float | None, metric_name: str,
            metric: float | None, seen: int, steps: int, step_time: float,
            remaining: int) -> None:
    """loss · metric · throughput · ETA on the progress bar (where it can show them)."""
    status = getattr(bar, "status", None)
    if status is None:
        return
    parts = [f"epoch {epoch + 1}/{epochs}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if metric is not None:
        parts.append(f"{metric_name} {metric:.4g}")
    if step_time > 0 and steps:
        parts.append(f"{seen / step_time:,.0f} samples/s")
        parts.append(f"ETA {_fmt_eta(step_time / steps * remaining)}")
    status(" · ".join(parts))


def _raise_non_finite(label: str, st: dict[str, Any], loss: torch.Tensor,
                      parts: dict[str, torch.Tensor], last_path: Path) -> None:
    detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
    kept = (f"the last good checkpoint (epoch {st['epoch']}) is kept in {last_path.parent}"
            if last_path.is_file() else "no checkpoint had been saved yet")
    raise PassError(
        f"{label}: the loss became {float(loss.detach())} (or its gradients non-finite) at "
        f"epoch {st['epoch'] + 1}, step {st['global_step'] + 1}"
        + (f" ({detail})" if detail else "") + f"; {kept}",
        "lower lr, raise warmup or set max_grad_norm; check that the teacher's outputs and "
        "the data hold no NaN/inf",
    )
