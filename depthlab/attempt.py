"""One attempt at a cell or at a group of cells, and what the sweep does with how it ended: the retry policy.

`run_cell` is the whole unit of work of a sweep (a local worker process or a Ray task calls it); `run_group` is
the same for cells that differ only in seed, trained as one grouped model in one local worker. Each cell's
`CellOutcome` says whom an error condemns: the cell (recorded as failed), the worker process (a dead CUDA
context: the cell is retried on a fresh one) or the whole sweep (the disk: it stops, and running it again continues).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import traceback
from pathlib import Path
from typing import Iterator, Literal

import torch

from . import files
from .config import Cell, SweepConfig
from .data import Images
from .errors import StorageError
from .events import CellEvents
from .group_training import train_group
from .results_folder import CellFolder, ResultsFolder, read_cell
from .train import train_cell

Fault = Literal["cell", "worker", "storage"]
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
DEAD_CONTEXT_MARKERS = ("CUDA error", "illegal memory access", "device-side assert")
ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())  # torch >= 2.8 raises it for CUDA errors; older ones a RuntimeError
WORKER_FAULT_RETRIES = 2  # a guess: a cell that kills two fresh workers more is itself the cause, not bad luck


def classify_error(err: BaseException) -> Fault:
    """Whom an exception condemns: the cell, the worker process (a dead CUDA context), or the whole sweep (storage)."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return "storage"
    if isinstance(err, ACCELERATOR_ERROR) or (isinstance(err, RuntimeError) and any(m in str(err) for m in DEAD_CONTEXT_MARKERS)):
        return "worker"
    return "cell"


RESUME_ADVICE = ("finished cells and the last checkpoint of each other cell are kept: free space or make the folder writable "
                 "(or use another --out), then run the same command again")


def storage_message(err: OSError, where: Path, advice: str = RESUME_ADVICE) -> str:
    """One line: which path could not be written, why, and what to do (for a sweep: that running it again continues)."""
    return f"{err.filename or where}: cannot write the results: {err.strerror or err}; {advice}"


@contextlib.contextmanager
def storage_errors(where: Path, advice: str = RESUME_ADVICE) -> Iterator[None]:
    """A write that fails because of the disk or permissions becomes one StorageError line, not a traceback."""
    try:
        yield
    except OSError as err:
        if classify_error(err) != "storage":
            raise
        raise StorageError(storage_message(err, where, advice)) from None


@dataclasses.dataclass(frozen=True)
class CellOutcome:
    """How one attempt at a cell ended: its summary, or its error and whom that error condemns."""

    summary: dict | None
    error: str | None = None
    fault: Fault | None = None


def run_cell(cell: Cell, images: Images, device: torch.device, config: SweepConfig, out_dir: Path, events: CellEvents) -> CellOutcome:
    """Train one cell, from wherever it stopped; an error is returned, not raised, so that the other cells still run.

    The whole unit of work of a sweep: a worker process here, or a remote one, calls only this or `run_group`.
    """
    return run_group([cell], images, device, config, out_dir, events)[0]


def run_group(cells: list[Cell], images: Images, device: torch.device, config: SweepConfig, out_dir: Path,
              events: CellEvents) -> list[CellOutcome]:
    """`run_cell` for cells that differ only in seed, trained as one grouped model (one cell: `train_cell`); an outcome
    per cell, in their order. An error ends the group's unfinished cells alike, each with it in its own error.txt; a
    member that ended before the error (a diverged net) keeps its result and is neither failed nor retried."""
    folders = [ResultsFolder(out_dir).cell(cell.id) for cell in cells]
    try:
        for folder in folders:
            files.remove_temp_files(folder.path)  # the sweep's lock makes this the only writer of the folder
        if len(cells) == 1:
            summaries = [train_cell(cells[0], images, device, config.runtime, folders[0].path, events)]
        else:
            summaries = train_group(cells, images, device, config.runtime, [folder.path for folder in folders], events)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded per cell so that the other cells still run
        return [_ended_outcome(folder) or _failure(err, folder) for folder in folders]
    return [CellOutcome(summary) for summary in summaries]


def _ended_outcome(folder: CellFolder) -> CellOutcome | None:
    """The outcome of a cell that ended (its DONE written) before its group's error: its result, or None."""
    record = read_cell(folder)
    return CellOutcome(dict(record.summary)) if record.state.ended and record.summary is not None else None


def _failure(err: Exception, folder: CellFolder) -> CellOutcome:
    """The outcome of a cell whose training raised `err` (called while it is handled): its traceback in error.txt."""
    fault = classify_error(err)
    if fault == "storage":  # writing error.txt would fail the same way
        return CellOutcome(None, storage_message(err, folder.path), fault)
    try:
        files.write_text(folder.error_log, traceback.format_exc())
    except OSError as log_err:
        if classify_error(log_err) != "storage":
            raise
        return CellOutcome(None, storage_message(log_err, folder.path), "storage")
    return CellOutcome(None, f"{type(err).__name__}: {err}", fault)


def retry_policy(outcome: CellOutcome, attempts: int) -> Literal["record", "retry", "stop"]:
    """What the sweep does with an attempt's outcome, after `attempts` attempts at that cell.

    A storage error stops the sweep; a cell that killed its worker is retried on a fresh one, a bounded
    number of times, then recorded as failed like any other.
    """
    if outcome.fault == "storage":
        return "stop"
    if outcome.fault == "worker" and attempts <= WORKER_FAULT_RETRIES:
        return "retry"
    return "record"
