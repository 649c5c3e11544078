"""Running a sweep: the resume and conflict rules, then the cells trained inline, in the worker pool or by an executor.

The results folder's files live in `results_folder`; one attempt at a cell in `attempt`; the worker processes
in `pool`. Re-running the same command skips finished cells and continues interrupted ones from their
checkpoint. A finished cell whose configuration has since changed is never overwritten: the sweep refuses, or
with `force` moves it to `superseded/` first. Files that do not read back whole (a truncated metrics.csv, a
corrupt checkpoint, an unreadable sweep.yaml) are moved to `damaged/`; their cell resumes from its checkpoint
when that is sound and is trained again otherwise. The engine draws nothing: it tells a `SweepEvents` (a display
chosen by the CLI, or anything else) what happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
import yaml

from . import __version__, files
from .attempt import run_group, storage_errors
from .config import Cell, ConfigError, SweepConfig, check_fits_data, parse_config
from .data import Images, load_images
from .errors import StorageError, SweepConflict
from .events import RunEvents
from .fastpath import prepare_memory_formats
from .group_training import plan_groups, resolve_group_seeds
from .models import net_size
from .pool import auto_jobs, run_pool
from .results_folder import CellFolder, CellRecord, CellState, Damage, ResultsFolder, read_cell
from .train import device_name, resolve_device


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


class SweepEvents(RunEvents, Protocol):
    """Everything the engine reports: a display, a log, or a remote driver implements it."""

    def sweep_started(self, start: SweepStart) -> None: ...
    def repaired(self, repair: Repair) -> None: ...


def default_out_dir(config: SweepConfig) -> Path:
    return Path("results") / config.name


def cell_record(out_dir: Path, cell: Cell) -> CellRecord:
    """A cell's folder in `out_dir`, its state judged against the cell's current configuration."""
    return read_cell(ResultsFolder(out_dir).cell(cell.id), cell.fingerprint())


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
    return net_size(cell.net_spec())[1] * images


def _run_inline(config: SweepConfig, images: Images, cells: list[Cell], out_dir: Path, device: torch.device,
                display: SweepEvents, group_seeds: int = 1) -> list[str]:
    images = images.to(device)
    failed = []
    for unit in plan_groups(cells, group_seeds):
        group = [cells[index] for index in unit]
        for cell, outcome in zip(group, run_group(group, images, device, config, out_dir, display)):
            if outcome.fault == "storage":
                raise StorageError(outcome.error)
            if outcome.error:
                failed.append(cell.id)
            display.cell_ended(cell.id, outcome.summary, outcome.error)
    return failed


class Executor(Protocol):
    """Trains the cells a sweep decided to run somewhere other than this machine's worker processes (e.g. a Ray cluster).

    The sweep has already applied the resume and conflict rules; an executor only trains `cells`,
    reports through `events`, and leaves each cell's files in `out_dir` as `run_cell` would.
    """

    def slots(self, cells: list[Cell]) -> int:
        """How many of `cells` it trains at once (for the display)."""
        ...

    def run(self, config: SweepConfig, images: Images, cells: list[Cell], out_dir: Path, events: SweepEvents) -> list[str]:
        """Train `cells`; the ids of those that failed. Raises StorageError when the results cannot be written."""
        ...


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    superseded: list[Path]
    repaired: list[Repair] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[int]:
    """One sweep at a time per results folder: a second one would train the same cells twice.

    Yields the lock's descriptor, for the workers to share (SharedLock).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(os.open(ResultsFolder(out_dir).lock, os.O_RDWR | os.O_CREAT), "rb") as lock:  # opening leaves the file untouched
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepConflict(f"{out_dir}: another depthlab sweep is running in this folder; wait for it or stop it first") from None
        yield lock.fileno()  # the lock goes with the last process holding it, however it ends


def run_sweep(config: SweepConfig, out_dir: Path, events: SweepEvents, force: bool = False,
              executor: Executor | None = None) -> SweepOutcome:
    """Train every cell of `config` that is not finished yet, several at once where that helps.

    `executor` trains them elsewhere; without one, this machine's worker processes do.
    """
    device = resolve_device(config.runtime.device)  # a wrong device or dataset stops the sweep before it writes anything
    images = load_images(config.data)  # decoded and cached once, before any worker starts
    check_fits_data(config, len(images.train_y))  # a folder dataset's size is known only now; nothing is written yet
    with storage_errors(out_dir), exclusive(out_dir) as lock_fd:
        return _run_sweep(config, images, device, ResultsFolder(out_dir), events, force, lock_fd, executor)


def _run_sweep(config: SweepConfig, images: Images, device: torch.device, results: ResultsFolder, events: SweepEvents,
               force: bool, lock_fd: int, executor: Executor | None = None) -> SweepOutcome:
    records = {cell.id: cell_record(results.path, cell) for cell in config.cells}
    states = {cell_id: record.state for cell_id, record in records.items()}
    stale = [cell for cell in config.cells if states[cell.id] is CellState.STALE]
    if stale and not force:
        names = ", ".join(c.id for c in stale[:6]) + (" …" if len(stale) > 6 else "")
        raise SweepConflict(
            f"{results.path}: {len(stale)} cell(s) already have results under a different configuration ({names}). "
            "Use another --out folder or name, restore the old config, or pass --force to move those results to "
            f"{results.superseded_dir}/ and train them again."
        )
    moved = [results.supersede(cell.id) for cell in stale]
    repairs = [_repair_cell(results, records[cell.id]) for cell in config.cells] + [_repair_sweep_file(results)]
    repairs = [repair for repair in repairs if repair is not None]
    for repair in repairs:
        events.repaired(repair)
    n_train = len(images.train_y)
    todo = sorted((c for c in config.cells if not states[c.id].ended), key=lambda c: cell_cost(c, n_train), reverse=True)
    skipped = [c.id for c in config.cells if states[c.id].ended]

    files.write_text(results.sweep_file, config.to_yaml())  # headed by the --set overrides, if any
    if not todo:
        return SweepOutcome(results.path, [], skipped, [], moved, repairs)
    files.write_json(results.environment, environment(device))  # the latest run; each summary names its device
    prepare_memory_formats(config.runtime.channels_last, device, {cell.train.precision for cell in todo})

    group_seeds = 1 if executor is not None else resolve_group_seeds(config.runtime.group_seeds, device)  # an executor trains cells alone
    if executor is not None:
        jobs = executor.slots(todo)
    else:
        units = len(plan_groups(todo, group_seeds))
        jobs = min(auto_jobs(device, todo, config.runtime, group_seeds) if config.runtime.jobs == "auto" else config.runtime.jobs, units)
    events.sweep_started(SweepStart(name=config.name, out_dir=results.path, total=len(config.cells), finished=len(skipped),
                                    to_train=len(todo), jobs=jobs, device=str(device), device_name=device_name(device)))
    if executor is not None:
        failed = executor.run(config, images, todo, results.path, events)
    elif jobs > 1:
        failed = run_pool(config, todo, results.path, device, jobs, events, lock_fd, group_seeds=group_seeds)
    else:
        failed = _run_inline(config, images, todo, results.path, device, events, group_seeds)
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


def _repair_cell(results: ResultsFolder, record: CellRecord) -> Optional[Repair]:
    """Move a cell's damaged files to damaged/: only a bad metrics.csv when a sound checkpoint can resume
    the cell (it writes the metrics again from its own), else the whole folder, to train the cell from scratch."""
    if record.state not in (CellState.DAMAGED, CellState.PARTIAL, CellState.FAILED):
        return None
    cell_id, folder = record.id, results.cell(record.id)
    damage, checkpoint = record.damage, _checkpoint_damage(folder)
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
