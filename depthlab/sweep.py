"""Running a sweep: the results folder, resume and conflict rules, progress, and cells in parallel.

Layout of `results/<name>/`: `sweep.yaml` (the config as run), `environment.json`, and per cell
`cells/<id>/` with `config.json`, `metrics.csv`, `summary.json`, `model.pt` and the `DONE`
marker (written last, atomically). Re-running the same command skips finished cells and
continues interrupted ones from their checkpoint. A finished cell whose configuration has
since changed is never overwritten: the sweep refuses, or with `force` moves it to
`superseded/` first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import queue
import shutil
import signal
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__, files, train
from .config import Cell, SweepConfig
from .data import Images, load_images
from .models import model_size
from .train import CHECKPOINT, CELL_CONFIG, DONE, device_name, resolve_device, train_cell

CELLS, SUPERSEDED, SWEEP_FILE, ERROR_LOG, LOCK = "cells", "superseded", "sweep.yaml", "error.txt", ".lock"
GIB = 1024**3
MEMORY_PER_JOB = 3 * GIB  # a generous bound for one cell's data, weights and activations at batch 128
MAX_JOBS_PER_GPU = 6  # beyond this, more processes no longer add throughput on one GPU


class SweepConflict(Exception):
    """Finished results exist for cells whose configuration has changed."""


def default_out_dir(config: SweepConfig) -> Path:
    return Path("results") / config.name


def cell_status(out_dir: Path, cell: Cell) -> str:
    """'finished', 'stale' (done, or checkpointed, under another config), 'partial' or 'pending'."""
    cell_dir = out_dir / CELLS / cell.id
    if (cell_dir / DONE).is_file():
        return "finished" if (cell_dir / DONE).read_text().strip() == cell.fingerprint() else "stale"
    if (cell_dir / CHECKPOINT).is_file():
        saved = files.read_json(cell_dir / CELL_CONFIG) if (cell_dir / CELL_CONFIG).is_file() else {}
        return "partial" if saved.get("fingerprint") == cell.fingerprint() else "stale"
    return "pending"


def supersede(out_dir: Path, cell: Cell) -> Path:
    """Move a stale cell's folder aside (never delete results) and return where it went."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = out_dir / SUPERSEDED / f"{cell.id}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(out_dir / CELLS / cell.id), target)
    return target


def environment(device: torch.device) -> dict[str, Any]:
    """What produced these numbers: versions, device and the code's git commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"depthlab": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "device": str(device), "device_name": device_name(device),
            "cuda": torch.version.cuda, "git_commit": commit,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cell_cost(cell: Cell) -> float:
    """Relative training cost, for running the longest cells first."""
    spec = cell.train
    length = spec.iterations if spec.iterations is not None else spec.epochs * 400
    return model_size(cell.arch, cell.depth, cell.shortcut)[1] * length * spec.batch_size


def auto_jobs(device: torch.device, n_cells: int) -> int:
    """Cells to train at once: one on the CPU; on GPUs, as many as memory allows, capped per GPU."""
    if device.type != "cuda" or n_cells <= 1:
        return 1
    gpus = torch.cuda.device_count() if device.index is None else 1
    per_gpu = []
    for index in range(gpus) if device.index is None else [device.index]:
        free, _ = torch.cuda.mem_get_info(index)
        per_gpu.append(max(1, min(MAX_JOBS_PER_GPU, free // MEMORY_PER_JOB)))
    return int(max(1, min(n_cells, sum(per_gpu))))


def worker_device(device: torch.device, worker: int) -> torch.device:
    """Spread workers over all visible GPUs unless one GPU was named."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


# ----------------------------------------------------------------------------- progress


class RichProgress:
    """A bar for the whole sweep and one per running cell, with live loss and error."""

    def __init__(self, console: Console, total_cells: int, done_cells: int):
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.overall = self.bars.add_task("[bold]cells", total=total_cells, completed=done_cells)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.tasks[cell_id] = self.bars.add_task(f"  {cell_id}", total=total_epochs, completed=done_epochs)

    def epoch_done(self, cell_id: str, row: dict) -> None:
        text = f"  {cell_id}  loss {row['train_loss']:.3f}  train {row['train_err']:.2f}%  test {row['test_err']:.2f}%"
        self.bars.update(self.tasks[cell_id], advance=1, description=text)

    def cell_ended(self, cell_id: str, message: str) -> None:
        if cell_id in self.tasks:
            self.bars.remove_task(self.tasks.pop(cell_id))
        self.bars.console.print(message)
        self.bars.advance(self.overall)


class LogProgress:
    """Plain log lines, for logs and pipes where a live display would be noise."""

    def __init__(self, console: Console, total_cells: int, done_cells: int):
        self.console, self.total, self.done = console, total_cells, done_cells
        self.epochs: dict[str, int] = {}

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.epochs[cell_id] = total_epochs
        resumed = f" (resuming after epoch {done_epochs})" if done_epochs else ""
        self.console.print(f"start {cell_id}: {total_epochs} epochs{resumed}")

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.console.print(f"{cell_id} epoch {row['epoch']}/{self.epochs.get(cell_id, '?')} loss {row['train_loss']:.4f} "
                           f"train_err {row['train_err']:.2f}% test_err {row['test_err']:.2f}% ({row['seconds']:.1f}s)")

    def cell_ended(self, cell_id: str, message: str) -> None:
        self.done += 1
        self.console.print(f"[{self.done}/{self.total}] {message}")


def ended_message(cell_id: str, summary: dict | None, error: str | None) -> str:
    if error:
        return f"[red]✗ {cell_id} failed: {error}[/red]"
    final = summary["final"]
    if summary["status"] == "diverged":
        return f"[yellow]! {cell_id} diverged after {summary['epochs']} epochs (recorded; the sweep goes on)[/yellow]"
    return (f"[green]✓[/green] {cell_id}: train err {final['train_err']:.2f}% (clean {final['clean_train_err']:.2f}%), "
            f"test err {final['test_err']:.2f}% in {summary['train_seconds']:.0f}s")


# ----------------------------------------------------------------------------- running


class QueueProgress:
    """Forwards a worker's progress to the parent process, and ends the worker if the parent is gone."""

    def __init__(self, events: Any):
        self.events, self.parent = events, os.getppid()

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.events.put(("started", cell_id, total_epochs, done_epochs))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        if os.getppid() != self.parent:  # the sweep was killed: stop before a re-run trains this cell too
            os._exit(1)
        self.events.put(("epoch", cell_id, row))


def _train_safely(cell: Cell, images: Images, device: torch.device, config: SweepConfig, out_dir: Path,
                  progress: train.Progress) -> tuple[dict | None, str | None]:
    """Train one cell; an unexpected error fails this cell, not the sweep."""
    try:
        return train_cell(cell, images, device, config.runtime, out_dir / CELLS / cell.id, progress), None
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded per cell so that the other cells still run
        files.write_text(out_dir / CELLS / cell.id / ERROR_LOG, traceback.format_exc())
        return None, f"{type(err).__name__}: {err}"


def _worker(rank: int, config: SweepConfig, cells: list[Cell], out_dir: Path, device: torch.device, jobs: int, tasks: Any, events: Any) -> None:
    """A worker process: load the data onto its device once, then train cells from the queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    device = worker_device(device, rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    else:
        torch.cuda.set_device(device)
    images = load_images(config.data).to(device)
    progress = QueueProgress(events)
    while True:
        try:
            index = tasks.get_nowait()
        except queue.Empty:
            return
        summary, error = _train_safely(cells[index], images, device, config, out_dir, progress)
        events.put(("ended", cells[index].id, summary, error))


def _run_parallel(config: SweepConfig, cells: list[Cell], out_dir: Path, device: torch.device, jobs: int, display: Any) -> list[str]:
    context = torch.multiprocessing.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    for index in range(len(cells)):
        tasks.put(index)
    workers = [context.Process(target=_worker, args=(rank, config, cells, out_dir, device, jobs, tasks, events), daemon=True)
               for rank in range(jobs)]
    for w in workers:
        w.start()
    failed, ended = [], 0
    try:
        while ended < len(cells):
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError("all worker processes exited before the sweep finished (see the messages above)")
                continue
            kind, cell_id, *rest = event
            if kind == "started":
                display.cell_started(cell_id, *rest)
            elif kind == "epoch":
                display.epoch_done(cell_id, *rest)
            else:
                summary, error = rest
                ended += 1
                if error:
                    failed.append(cell_id)
                display.cell_ended(cell_id, ended_message(cell_id, summary, error))
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    return failed


def _run_inline(config: SweepConfig, images: Images, cells: list[Cell], out_dir: Path, device: torch.device, display: Any) -> list[str]:
    images = images.to(device)
    failed = []
    for cell in cells:
        summary, error = _train_safely(cell, images, device, config, out_dir, display)
        if error:
            failed.append(cell.id)
        display.cell_ended(cell.id, ended_message(cell.id, summary, error))
    return failed


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    superseded: list[Path]


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One sweep at a time per results folder: a second one would train the same cells twice."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT), "rb") as lock:  # opening leaves the file untouched
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepConflict(f"{out_dir}: another depthlab sweep is running in this folder; wait for it or stop it first") from None
        yield  # the lock goes with the process, however it ends


def run_sweep(config: SweepConfig, out_dir: Path, console: Console, force: bool = False) -> SweepOutcome:
    """Train every cell of `config` that is not finished yet, several at once where that helps."""
    device = resolve_device(config.runtime.device)  # a wrong device or dataset stops the sweep before it writes anything
    images = load_images(config.data)  # decoded and cached once, before any worker starts
    with exclusive(out_dir):
        return _run_sweep(config, images, device, out_dir, console, force)


def _run_sweep(config: SweepConfig, images: Images, device: torch.device, out_dir: Path, console: Console,
               force: bool) -> SweepOutcome:
    statuses = {cell.id: cell_status(out_dir, cell) for cell in config.cells}
    stale = [cell for cell in config.cells if statuses[cell.id] == "stale"]
    if stale and not force:
        names = ", ".join(c.id for c in stale[:6]) + (" …" if len(stale) > 6 else "")
        raise SweepConflict(
            f"{out_dir}: {len(stale)} cell(s) already have results under a different configuration ({names}). "
            "Use another --out folder or name, restore the old config, or pass --force to move those results to "
            f"{out_dir / SUPERSEDED}/ and train them again."
        )
    moved = [supersede(out_dir, cell) for cell in stale]
    todo = sorted((c for c in config.cells if statuses[c.id] != "finished"), key=cell_cost, reverse=True)
    skipped = [c.id for c in config.cells if statuses[c.id] == "finished"]

    files.write_text(out_dir / SWEEP_FILE, yaml.safe_dump(config.raw, sort_keys=False))
    if not todo:
        return SweepOutcome(out_dir, [], skipped, [], moved)
    files.write_json(out_dir / "environment.json", environment(device))  # the latest run; each summary names its device

    jobs = min(auto_jobs(device, len(todo)) if config.runtime.jobs == "auto" else config.runtime.jobs, len(todo))
    console.print(f"[bold]{config.name}[/bold]: {len(todo)} cell(s) to train on {device_name(device)} ({device}), "
                  f"{jobs} at a time; {len(skipped)} already finished; results in {out_dir}")
    live = RichProgress if console.is_terminal else LogProgress
    with live(console, len(config.cells), len(skipped)) as display:
        if jobs > 1:
            failed = _run_parallel(config, todo, out_dir, device, jobs, display)
        else:
            failed = _run_inline(config, images, todo, out_dir, device, display)
    return SweepOutcome(out_dir, [c.id for c in todo], skipped, failed, moved)
