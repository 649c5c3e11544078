"""Running a sweep: resume and conflict rules, and cells in parallel, reported as events.

The results folder's layout lives in `layout`. Re-running the same command skips finished
cells and continues interrupted ones from their checkpoint. A finished cell whose
configuration has since changed is never overwritten: the sweep refuses, or with `force`
moves it to `superseded/` first. Files that do not read back whole (a truncated metrics.csv,
a corrupt checkpoint, an unreadable sweep.yaml) are moved to `damaged/`; their cell resumes
from its checkpoint when that is sound and is trained again otherwise. The engine draws nothing: it tells a `SweepEvents` (a
display chosen by the CLI, or anything else) what happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import queue
import signal
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
import yaml

from . import __version__, files
from .config import Cell, ConfigError, SweepConfig, parse_config
from .data import Images, load_images
from .layout import CellFolder, CellState, Damage, ResultsFolder
from .models import model_size
from .train import CellEvents, device_name, resolve_device, train_cell

GIB = 1024**3
MEMORY_PER_JOB = 3 * GIB  # a guess, never measured: one cell's data, weights and activations at batch 128, with room to spare
MAX_JOBS_PER_GPU = 6  # a guess, never measured: small nets stop gaining from more processes somewhere around here


class SweepConflict(Exception):
    """Finished results exist for cells whose configuration has changed, or another sweep holds the folder."""


@dataclasses.dataclass(frozen=True)
class SweepStart:
    """What a sweep is about to do."""

    name: str
    out_dir: Path
    total: int  # cells in the sweep
    finished: int  # already ended, skipped
    to_train: int
    jobs: int
    device: str
    device_name: str


@dataclasses.dataclass(frozen=True)
class Repair:
    """Damaged results that the sweep moved aside before training."""

    item: str  # a cell id, or the sweep file's name
    damage: str  # what was wrong, e.g. "checkpoint.pt does not load (EOFError)"
    moved_to: Path
    action: str  # what the sweep does next, e.g. "training it again from scratch"


class SweepEvents(CellEvents, Protocol):
    """Everything the engine reports: a display, a log, or a remote driver implements it."""

    def sweep_started(self, start: SweepStart) -> None: ...
    def cell_ended(self, cell_id: str, summary: dict | None, error: str | None) -> None: ...
    def repaired(self, repair: Repair) -> None: ...


def default_out_dir(config: SweepConfig) -> Path:
    return Path("results") / config.name


def cell_state(out_dir: Path, cell: Cell) -> CellState:
    """A cell's state in `out_dir`, judged against its current configuration."""
    return ResultsFolder(out_dir).cell(cell.id).state(cell.fingerprint())


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


def cell_cost(cell: Cell, n_train: int) -> float:
    """Relative training cost (MACs × images), for running the longest cells first."""
    images = cell.train.run_length(n_train).iterations * cell.train.batch_size
    return model_size(cell.arch, cell.depth, cell.shortcut)[1] * images


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


# ----------------------------------------------------------------------------- running


class QueueEvents:
    """Forwards a worker's events to the parent process, and ends the worker if the parent is gone."""

    def __init__(self, events: Any):
        self.events, self.parent = events, os.getppid()

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.events.put(("started", cell_id, total_epochs, done_epochs))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        if os.getppid() != self.parent:  # the sweep was killed: stop before a re-run trains this cell too
            os._exit(1)
        self.events.put(("epoch", cell_id, row))

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        self.events.put(("progress", cell_id, epoch, iterations, per_epoch))


def _train_safely(cell: Cell, images: Images, device: torch.device, config: SweepConfig, out_dir: Path,
                  events: CellEvents) -> tuple[dict | None, str | None]:
    """Train one cell; an unexpected error fails this cell, not the sweep."""
    folder = ResultsFolder(out_dir).cell(cell.id)
    try:
        return train_cell(cell, images, device, config.runtime, folder.path, events), None
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded per cell so that the other cells still run
        files.write_text(folder.error_log, traceback.format_exc())
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
    forward = QueueEvents(events)
    while True:
        try:
            index = tasks.get_nowait()
        except queue.Empty:
            return
        summary, error = _train_safely(cells[index], images, device, config, out_dir, forward)
        events.put(("ended", cells[index].id, summary, error))


def _run_parallel(config: SweepConfig, cells: list[Cell], out_dir: Path, device: torch.device, jobs: int,
                  display: SweepEvents) -> list[str]:
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
            elif kind == "progress":
                display.epoch_progress(cell_id, *rest)
            else:
                summary, error = rest
                ended += 1
                if error:
                    failed.append(cell_id)
                display.cell_ended(cell_id, summary, error)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    return failed


def _run_inline(config: SweepConfig, images: Images, cells: list[Cell], out_dir: Path, device: torch.device,
                display: SweepEvents) -> list[str]:
    images = images.to(device)
    failed = []
    for cell in cells:
        summary, error = _train_safely(cell, images, device, config, out_dir, display)
        if error:
            failed.append(cell.id)
        display.cell_ended(cell.id, summary, error)
    return failed


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    superseded: list[Path]
    repaired: list[Repair] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One sweep at a time per results folder: a second one would train the same cells twice."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(os.open(ResultsFolder(out_dir).lock, os.O_RDWR | os.O_CREAT), "rb") as lock:  # opening leaves the file untouched
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepConflict(f"{out_dir}: another depthlab sweep is running in this folder; wait for it or stop it first") from None
        yield  # the lock goes with the process, however it ends


def run_sweep(config: SweepConfig, out_dir: Path, events: SweepEvents, force: bool = False) -> SweepOutcome:
    """Train every cell of `config` that is not finished yet, several at once where that helps."""
    device = resolve_device(config.runtime.device)  # a wrong device or dataset stops the sweep before it writes anything
    images = load_images(config.data)  # decoded and cached once, before any worker starts
    with exclusive(out_dir):
        return _run_sweep(config, images, device, ResultsFolder(out_dir), events, force)


def _run_sweep(config: SweepConfig, images: Images, device: torch.device, results: ResultsFolder, events: SweepEvents,
               force: bool) -> SweepOutcome:
    states = {cell.id: cell_state(results.path, cell) for cell in config.cells}
    stale = [cell for cell in config.cells if states[cell.id] is CellState.STALE]
    if stale and not force:
        names = ", ".join(c.id for c in stale[:6]) + (" …" if len(stale) > 6 else "")
        raise SweepConflict(
            f"{results.path}: {len(stale)} cell(s) already have results under a different configuration ({names}). "
            "Use another --out folder or name, restore the old config, or pass --force to move those results to "
            f"{results.superseded_dir}/ and train them again."
        )
    moved = [results.supersede(cell.id) for cell in stale]
    repairs = [_repair_cell(results, cell.id, states[cell.id]) for cell in config.cells] + [_repair_sweep_file(results)]
    repairs = [repair for repair in repairs if repair is not None]
    for repair in repairs:
        events.repaired(repair)
    n_train = len(images.train_y)
    todo = sorted((c for c in config.cells if not states[c.id].ended), key=lambda c: cell_cost(c, n_train), reverse=True)
    skipped = [c.id for c in config.cells if states[c.id].ended]

    files.write_text(results.sweep_file, yaml.safe_dump(config.to_document(), sort_keys=False))
    if not todo:
        return SweepOutcome(results.path, [], skipped, [], moved, repairs)
    files.write_json(results.environment, environment(device))  # the latest run; each summary names its device

    jobs = min(auto_jobs(device, len(todo)) if config.runtime.jobs == "auto" else config.runtime.jobs, len(todo))
    events.sweep_started(SweepStart(name=config.name, out_dir=results.path, total=len(config.cells), finished=len(skipped),
                                    to_train=len(todo), jobs=jobs, device=str(device), device_name=device_name(device)))
    if jobs > 1:
        failed = _run_parallel(config, todo, results.path, device, jobs, events)
    else:
        failed = _run_inline(config, images, todo, results.path, device, events)
    return SweepOutcome(results.path, [c.id for c in todo], skipped, failed, moved, repairs)


def _checkpoint_damage(folder: CellFolder) -> Optional[Damage]:
    """A checkpoint that torch cannot load: left in place it would fail its cell on every retry."""
    if not folder.checkpoint.is_file():
        return None
    try:
        torch.load(folder.checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or garbled file raises anything from EOFError to RuntimeError
        return Damage(folder.checkpoint, f"{folder.checkpoint.name} does not load ({type(err).__name__})")
    return None


def _repair_cell(results: ResultsFolder, cell_id: str, state: CellState) -> Optional[Repair]:
    """Move a cell's damaged files to damaged/: only a bad metrics.csv when a sound checkpoint can resume
    the cell (it writes the metrics again from its own), else the whole folder, to train the cell from scratch."""
    if state not in (CellState.DAMAGED, CellState.PARTIAL, CellState.FAILED):
        return None
    folder = results.cell(cell_id)
    damage, checkpoint = folder.damage(), _checkpoint_damage(folder)
    if damage is None and checkpoint is None:
        return None
    resumable = checkpoint is None and folder.checkpoint.is_file() and not folder.done.is_file()
    if damage is not None and damage.file == folder.metrics and resumable:
        return Repair(cell_id, damage.reason, results.set_aside(cell_id, [folder.metrics]), "resuming from its checkpoint")
    reason = (damage or checkpoint).reason
    return Repair(cell_id, reason, results.set_aside(cell_id, list(folder.path.iterdir())), "training it again from scratch")


def _repair_sweep_file(results: ResultsFolder) -> Optional[Repair]:
    """An earlier run's sweep.yaml that does not read back is kept in damaged/ (the sweep writes it again from the config)."""
    path = results.sweep_file
    if not path.is_file():
        return None
    try:
        parse_config(yaml.safe_load(path.read_text()), source=path.name)
        return None
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as err:
        reason = f"does not read back as a sweep ({(str(err).splitlines() or [type(err).__name__])[0]})"
    return Repair(path.name, reason, results.set_aside(path.stem, [path]), "writing it again from the config")
