"""Training one cell: SGD with the paper's recipe, per-epoch metrics, checkpoints and resume.

The loop keeps the GPU busy: the data is already on the device, a batch is an index gather
plus batched augmentation, and the running loss and error are summed on the device and read
once per epoch. Each epoch's shuffling and augmentation come from a generator seeded with
(seed, epoch), so a cell resumed from its checkpoint ends exactly where an uninterrupted
run of it would (on the same machine).
"""

from __future__ import annotations

import math
import platform
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import files
from .config import Cell, RuntimeSpec, TrainSpec
from .data import Images, Normalizer, epoch_batches, eval_batches, training_batch
from .models import build_model, model_size

METRIC_COLUMNS = ("epoch", "iteration", "lr", "train_loss", "train_err", "test_loss", "test_err", "val_loss", "val_err", "seconds")
WARMUP_CHECK_EVERY = 20  # iterations between looks at the training error during warm-up
DONE, SUMMARY, METRICS, CHECKPOINT, CELL_CONFIG, WEIGHTS = "DONE", "summary.json", "metrics.csv", "checkpoint.pt", "config.json", "model.pt"


class Progress(Protocol):
    """Receives a cell's progress (a rich display, a log, or a queue to the sweep's process)."""

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None: ...
    def epoch_done(self, cell_id: str, row: dict) -> None: ...


class DeviceError(Exception):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """'auto' is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but no CUDA GPU is visible to torch (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def configure_device(device: torch.device) -> None:
    """Let cuDNN pick the fastest conv algorithms: shapes are static, so it searches once per shape."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        return f"{model.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


@dataclass
class Schedule:
    """Learning rate per iteration: step decays at milestones, after an optional warm-up."""

    lr: float
    decay: float
    milestones: list[int]  # in iterations
    total: int  # iterations
    warmup_lr: float | None
    warmup_until_err: float

    @classmethod
    def for_cell(cls, spec: TrainSpec, iters_per_epoch: int) -> "Schedule":
        per = 1 if spec.iterations is not None else iters_per_epoch
        total = spec.iterations if spec.iterations is not None else spec.epochs * iters_per_epoch
        return cls(spec.lr, spec.lr_decay, [m * per for m in spec.decay_points()], total, spec.warmup_lr, spec.warmup_until_err)

    def lr_at(self, iteration: int, warming_up: bool) -> float:
        if warming_up and self.warmup_lr is not None:
            return self.warmup_lr
        return float(f"{self.lr * self.decay ** sum(iteration >= m for m in self.milestones):.12g}")  # 0.001, not 0.0010000000000000002


class TrainStep:
    """One SGD step on a batch, optionally graph-compiled; returns loss and error count on the device."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bf16: bool, compile_mode: str):
        self.model, self.optimizer, self.bf16 = model, optimizer, bf16
        self.forward = model if compile_mode == "none" else torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        self.compiled = compile_mode != "none"
        self.cudagraphs = compile_mode == "reduce-overhead"

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().float(), (logits.detach().argmax(1) != y).sum()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.compiled:
            return self._run(x, y)
        try:
            return self._run(x, y)
        except Exception as err:  # a compiler failure must not cost the run: fall back to eager
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); training this cell eagerly")
            self.forward, self.compiled, self.cudagraphs = self.model, False, False
            return self._run(x, y)


def make_optimizer(model: nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter; fused kernels on the GPU."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, **fast)


def resolve_compile(mode: str, device: torch.device) -> str:
    """'auto' captures the step in CUDA graphs on a GPU and stays eager on the CPU."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


def resolve_memory_format(runtime: RuntimeSpec, device: torch.device) -> torch.memory_format:
    """channels_last feeds the GPU's tensor cores without transposes; the CPU prefers NCHW."""
    channels_last = runtime.channels_last if runtime.channels_last != "auto" else device.type == "cuda"
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalizer, batch_size: int, bf16: bool) -> tuple[float, float]:
    """Mean loss and error (%) in eval mode without augmentation, in large batches."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    errors = torch.zeros((), device=x.device, dtype=torch.long)
    for part in eval_batches(len(y), batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(normalize(x[part]))
        loss_sum += F.cross_entropy(logits.float(), y[part], reduction="sum")
        errors += (logits.argmax(1) != y[part]).sum()
    model.train(was_training)
    loss, err = torch.stack([loss_sum, errors.float()]).tolist()
    return loss / len(y), 100.0 * err / len(y)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The RNG of one epoch's shuffle and augmentation: a function of (seed, epoch) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def train_epoch(step: TrainStep, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule, state: dict,
                warmup_until_err: float, device: torch.device) -> tuple[float, float, float]:
    """One pass over the batches (or what is left of the iteration budget): running loss, error % and the last lr.

    Loss and errors are summed on the device and read once at the end. During a warm-up the
    error of each window of WARMUP_CHECK_EVERY batches is read to decide when it ends; windows
    restart with each epoch, so a run resumed at an epoch boundary decides exactly as before.
    """
    loss_sum = torch.zeros((), device=device)
    errors = torch.zeros((), device=device, dtype=torch.long)
    window_errors = torch.zeros((), device=device, dtype=torch.long)
    seen = window_seen = 0
    lr = schedule.lr_at(state["iteration"], state["warming_up"])
    for x, y in batches:
        if state["iteration"] >= schedule.total:
            break
        lr = schedule.lr_at(state["iteration"], state["warming_up"])
        for group in step.optimizer.param_groups:
            group["lr"] = lr
        loss, wrong = step(x, y)
        loss_sum += loss * len(y)
        errors += wrong
        seen += len(y)
        state["iteration"] += 1
        if state["warming_up"]:
            window_errors += wrong
            window_seen += len(y)
            if window_seen == WARMUP_CHECK_EVERY * len(y):  # the only host syncs, and only during warm-up
                state["warming_up"] = 100.0 * window_errors.item() / window_seen >= warmup_until_err
                window_errors.zero_()
                window_seen = 0
    total_loss, wrong_count = torch.stack([loss_sum, errors.float()]).tolist()
    return total_loss / seen, 100.0 * wrong_count / seen, lr


def train_cell(cell: Cell, images: Images, device: torch.device, runtime: RuntimeSpec, cell_dir: Path,
               progress: Progress | None = None, stop_after_epochs: int | None = None) -> dict:
    """Train `cell` on `images` (already on `device`), writing metrics, checkpoints and a summary to `cell_dir`.

    Resumes from `cell_dir/checkpoint.pt` when one exists. `stop_after_epochs` ends the call early
    (as an interruption would), leaving the checkpoint for a later call to continue from.
    """
    spec = cell.train
    n_train = len(images.train_y)
    if n_train < spec.batch_size:
        raise ValueError(f"{cell.id}: {n_train} training images are fewer than one batch of {spec.batch_size}")
    iters_per_epoch = n_train // spec.batch_size
    schedule = Schedule.for_cell(spec, iters_per_epoch)
    total_epochs = math.ceil(schedule.total / iters_per_epoch)

    configure_device(device)
    params, macs = model_size(cell.arch, cell.depth, cell.shortcut)
    torch.manual_seed(cell.seed)  # the initial weights are a function of the seed alone
    model = build_model(cell.arch, cell.depth, cell.shortcut)
    model.to(device)
    memory_format = resolve_memory_format(runtime, device)
    model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, spec, device)
    normalize = Normalizer(images.train_x, cell.data.normalize)
    bf16 = spec.precision == "bf16"

    state = {"epoch": 0, "iteration": 0, "rows": [], "warming_up": spec.warmup_lr is not None, "train_seconds": 0.0}
    checkpoint = cell_dir / CHECKPOINT
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved["fingerprint"] != cell.fingerprint():
            raise RuntimeError(f"{checkpoint} belongs to a different configuration of {cell.id}")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    files.write_json(cell_dir / CELL_CONFIG, {**cell.to_dict(), "fingerprint": cell.fingerprint(), "data_path": cell.data.path})
    if progress:
        progress.cell_started(cell.id, total_epochs, state["epoch"])

    step = TrainStep(model, optimizer, bf16, resolve_compile(runtime.compile, device))
    diverged = False
    epochs_this_call = 0
    while state["iteration"] < schedule.total and not diverged:
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            return {"id": cell.id, "status": "interrupted", "epochs": state["epoch"]}
        started = time.perf_counter()
        model.train()
        generator = epoch_generator(cell.seed, state["epoch"], device)
        batches = ((training_batch(images.train_x, index, normalize, generator, memory_format), images.train_y[index])
                   for index in epoch_batches(n_train, spec.batch_size, generator, device))
        train_loss, train_err, lr = train_epoch(step, batches, schedule, state, spec.warmup_until_err, device)
        diverged = not math.isfinite(train_loss)
        state["train_seconds"] += time.perf_counter() - started
        row = {"epoch": state["epoch"] + 1, "iteration": state["iteration"], "lr": lr,
               "train_loss": train_loss, "train_err": train_err}
        row["test_loss"], row["test_err"] = evaluate(model, images.test_x, images.test_y, normalize, runtime.eval_batch_size, bf16)
        if images.val_y is not None:
            row["val_loss"], row["val_err"] = evaluate(model, images.val_x, images.val_y, normalize, runtime.eval_batch_size, bf16)
        row["seconds"] = time.perf_counter() - started
        state["epoch"] += 1
        state["rows"].append(row)
        epochs_this_call += 1
        files.write_text(cell_dir / METRICS, pd.DataFrame(state["rows"], columns=list(METRIC_COLUMNS)).to_csv(index=False))
        files.save_torch(checkpoint, {"fingerprint": cell.fingerprint(), "model": model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "state": state})
        if progress:
            progress.epoch_done(cell.id, row)

    summary = {**cell.to_dict(), "fingerprint": cell.fingerprint(), "status": "diverged" if diverged else "finished",
               "params": params, "macs": macs, "epochs": state["epoch"], "iterations": state["iteration"],
               "train_seconds": state["train_seconds"], "device": str(device), "device_name": device_name(device),
               "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "final": {k: v for k, v in state["rows"][-1].items() if k not in ("epoch", "iteration", "lr", "seconds")}}
    if not diverged:
        clean_loss, clean_err = evaluate(model, images.train_x, images.train_y, normalize, runtime.eval_batch_size, bf16)
        summary["final"].update(clean_train_loss=clean_loss, clean_train_err=clean_err)
        files.save_torch(cell_dir / WEIGHTS, model.state_dict())
    summary["images_per_second"] = state["iteration"] * spec.batch_size / max(state["train_seconds"], 1e-9)
    files.write_json(cell_dir / SUMMARY, summary)
    files.write_text(cell_dir / DONE, cell.fingerprint() + "\n")
    checkpoint.unlink(missing_ok=True)
    return summary
