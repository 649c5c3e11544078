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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import files
from .config import Cell, RunLength, RuntimeSpec, TrainSpec
from .data import Images, Normalizer, epoch_batches, eval_batches, training_batch
from .layout import METRIC_COLUMNS, CellFolder, Summary
from .models import build_model, model_size

WARMUP_CHECK_EVERY = 20  # iterations between looks at the training error during warm-up
PROGRESS_SECONDS = 2.0  # a choice, not measured: a live bar that moves, at a cost of one host clock read per step


class CellEvents(Protocol):
    """What a training cell reports while it runs (the sweep forwards it to a display)."""

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None: ...
    def epoch_done(self, cell_id: str, row: dict) -> None: ...
    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None: ...


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
    def for_cell(cls, spec: TrainSpec, length: RunLength) -> "Schedule":
        per = 1 if spec.iterations is not None else length.iterations_per_epoch
        return cls(spec.lr, spec.lr_decay, [m * per for m in spec.decay_points()], length.iterations, spec.warmup_lr,
                   spec.warmup_until_err)

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


class Throttled:
    """Passes an iteration count on to `report` at most once per `seconds` of wall time.

    It reads the host clock and a Python int, never the device, so it adds no synchronisation
    (on a GPU the count is of steps queued, which run ahead of those finished by a few).
    """

    def __init__(self, report: Callable[[int], None], seconds: float):
        self.report, self.seconds, self.last = report, seconds, time.monotonic()

    def __call__(self, iterations: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            self.report(iterations)


@dataclass
class TrainState:
    """The loop's progress, saved in each checkpoint: enough to continue exactly where it stopped."""

    epoch: int = 0
    iteration: int = 0
    rows: list[dict] = field(default_factory=list)  # metrics.csv so far
    warming_up: bool = False
    train_seconds: float = 0.0


@dataclass
class TrainingSetup:
    """What one cell trains with: the model, its optimizer, the step, and the input layout."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    memory_format: torch.memory_format


def make_step(cell: Cell, device: torch.device, runtime: RuntimeSpec) -> TrainingSetup:
    """The model (initialised from the cell's seed alone), optimizer and step that `train_cell` and `bench` both use."""
    configure_device(device)
    torch.manual_seed(cell.seed)
    model = build_model(cell.arch, cell.depth, cell.shortcut).to(device)
    memory_format = resolve_memory_format(runtime, device)
    model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, cell.train, device)
    step = TrainStep(model, optimizer, cell.train.precision == "bf16", resolve_compile(runtime.compile, device))
    return TrainingSetup(model, optimizer, step, memory_format)


def train_epoch(step: TrainStep, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule,
                state: TrainState, device: torch.device,
                progress: Callable[[int], None] | None = None) -> tuple[float, float, float]:
    """One pass over the batches (or what is left of the iteration budget): running loss, error % and the last lr.

    Advances `state.iteration` and ends the warm-up in `state`; `progress` gets the count of
    this epoch's iterations after each step. Loss and errors are summed on the
    device and read once at the end. During a warm-up the error of each window of
    WARMUP_CHECK_EVERY batches is read to decide when it ends; windows restart with each epoch,
    so a run resumed at an epoch boundary decides exactly as before.
    """
    loss_sum = torch.zeros((), device=device)
    errors = torch.zeros((), device=device, dtype=torch.long)
    window_errors = torch.zeros((), device=device, dtype=torch.long)
    seen = window_seen = 0
    first_iteration = state.iteration
    lr = schedule.lr_at(state.iteration, state.warming_up)
    for x, y in batches:
        if state.iteration >= schedule.total:
            break
        lr = schedule.lr_at(state.iteration, state.warming_up)
        for group in step.optimizer.param_groups:
            group["lr"] = lr
        loss, wrong = step(x, y)
        loss_sum += loss * len(y)
        errors += wrong
        seen += len(y)
        state.iteration += 1
        if progress is not None:
            progress(state.iteration - first_iteration)
        if state.warming_up:
            window_errors += wrong
            window_seen += len(y)
            if window_seen == WARMUP_CHECK_EVERY * len(y):  # the only host syncs, and only during warm-up
                state.warming_up = 100.0 * window_errors.item() / window_seen >= schedule.warmup_until_err
                window_errors.zero_()
                window_seen = 0
    total_loss, wrong_count = torch.stack([loss_sum, errors.float()]).tolist()
    return total_loss / seen, 100.0 * wrong_count / seen, lr


def _resume(folder: CellFolder, cell: Cell, setup: TrainingSetup, device: torch.device) -> TrainState:
    """The state saved after the last finished epoch (weights and optimizer restored), or a fresh one."""
    if not folder.checkpoint.is_file():
        return TrainState(warming_up=cell.train.warmup_lr is not None)
    saved = torch.load(folder.checkpoint, map_location=device, weights_only=False)
    if saved["fingerprint"] != cell.fingerprint():
        raise RuntimeError(f"{folder.checkpoint} belongs to a different configuration of {cell.id}")
    setup.model.load_state_dict(saved["model"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    return TrainState(**saved["state"])


def _save_epoch(folder: CellFolder, cell: Cell, setup: TrainingSetup, state: TrainState) -> None:
    """metrics.csv and the checkpoint after an epoch, each written atomically."""
    files.write_text(folder.metrics, pd.DataFrame(state.rows, columns=list(METRIC_COLUMNS)).to_csv(index=False))
    files.save_torch(folder.checkpoint, {"fingerprint": cell.fingerprint(), "model": setup.model.state_dict(),
                                         "optimizer": setup.optimizer.state_dict(), "state": asdict(state)})


def train_cell(cell: Cell, images: Images, device: torch.device, runtime: RuntimeSpec, cell_dir: Path,
               events: CellEvents | None = None, stop_after_epochs: int | None = None) -> dict:
    """Train `cell` on `images` (already on `device`), writing metrics, checkpoints and a summary to `cell_dir`.

    Resumes from the cell's checkpoint when one exists. `stop_after_epochs` ends the call early
    (as an interruption would), leaving the checkpoint for a later call to continue from.
    """
    folder = CellFolder(cell_dir)
    spec = cell.train
    n_train = len(images.train_y)
    try:
        length = spec.run_length(n_train)
    except ValueError as err:
        raise ValueError(f"{cell.id}: {err}") from None
    schedule = Schedule.for_cell(spec, length)
    setup = make_step(cell, device, runtime)
    normalize = Normalizer(images.train_x, cell.data.normalize)
    bf16 = spec.precision == "bf16"

    def evaluate_on(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return evaluate(setup.model, x, y, normalize, runtime.eval_batch_size, bf16)

    state = _resume(folder, cell, setup, device)
    files.write_json(folder.config, {**cell.to_dict(), "fingerprint": cell.fingerprint(), "data_path": cell.data.path,
                                     "run_length": asdict(length)})
    if events:
        events.cell_started(cell.id, length.epochs, state.epoch)
    progress = Throttled(lambda done: events.epoch_progress(cell.id, state.epoch + 1, done, length.iterations_per_epoch),
                         PROGRESS_SECONDS) if events else None

    diverged = False
    epochs_this_call = 0
    while state.iteration < schedule.total and not diverged:
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            return {"id": cell.id, "status": "interrupted", "epochs": state.epoch}
        started = time.perf_counter()
        setup.model.train()
        generator = epoch_generator(cell.seed, state.epoch, device)
        batches = ((training_batch(images.train_x, index, normalize, generator, setup.memory_format), images.train_y[index])
                   for index in epoch_batches(n_train, spec.batch_size, generator, device))
        train_loss, train_err, lr = train_epoch(setup.step, batches, schedule, state, device, progress)
        diverged = not math.isfinite(train_loss)
        state.train_seconds += time.perf_counter() - started
        row = {"epoch": state.epoch + 1, "iteration": state.iteration, "lr": lr, "train_loss": train_loss, "train_err": train_err}
        row["test_loss"], row["test_err"] = evaluate_on(images.test_x, images.test_y)
        if images.val_y is not None:
            row["val_loss"], row["val_err"] = evaluate_on(images.val_x, images.val_y)
        row["seconds"] = time.perf_counter() - started
        state.epoch += 1
        state.rows.append(row)
        epochs_this_call += 1
        _save_epoch(folder, cell, setup, state)
        if events:
            events.epoch_done(cell.id, row)

    summary = _summary(cell, state, diverged, device)
    if not diverged:
        clean_loss, clean_err = evaluate_on(images.train_x, images.train_y)
        summary["final"].update(clean_train_loss=clean_loss, clean_train_err=clean_err)
        files.save_torch(folder.weights, setup.model.state_dict())
    files.write_json(folder.summary, summary)
    folder.mark_done(cell.fingerprint())
    folder.checkpoint.unlink(missing_ok=True)
    return summary


def _summary(cell: Cell, state: TrainState, diverged: bool, device: torch.device) -> Summary:
    """summary.json of an ended cell (the clean training error is added by the caller when there is one)."""
    params, macs = model_size(cell.arch, cell.depth, cell.shortcut)
    last = state.rows[-1]
    return Summary(**cell.to_dict(), fingerprint=cell.fingerprint(), status="diverged" if diverged else "finished",
                   params=params, macs=macs, epochs=state.epoch, iterations=state.iteration,
                   train_seconds=state.train_seconds, device=str(device), device_name=device_name(device),
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   images_per_second=state.iteration * cell.train.batch_size / max(state.train_seconds, 1e-9),
                   final={k: v for k, v in last.items() if k not in ("epoch", "iteration", "lr", "seconds")})
