"""Running a sweep: resume and conflict rules, and cells in parallel, reported as events.

The results folder's files live in `results_folder`. Re-running the same command skips finished
cells and continues interrupted ones from their checkpoint. A finished cell whose
configuration has since changed is never overwritten: the sweep refuses, or with `force`
moves it to `superseded/` first. Files that do not read back whole (a truncated metrics.csv,
a corrupt checkpoint, an unreadable sweep.yaml) are moved to `damaged/`; their cell resumes
from its checkpoint when that is sound and is trained again otherwise. The engine draws nothing: it tells a `SweepEvents` (a
display chosen by the CLI, or anything else) what happens.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import os
import signal
import subprocess
import sys
import traceback
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from multiprocessing import connection, reduction
from typing import Any, Callable, Iterator, Literal, Optional, Protocol

import torch
import yaml

from . import __version__, files
from .config import Cell, ConfigError, DataSpec, RuntimeSpec, SweepConfig, check_fits_data, parse_config
from .data import Images, load_images
from .errors import StorageError, SweepConflict
from .fastpath import prepare_memory_formats
from .results_folder import CellFolder, CellRecord, CellState, Damage, ResultsFolder, read_cell
from .options import NetSpec
from .models import build_net, net_size
from .train import CellEvents, device_name, prepare_worker_process, resolve_compile, resolve_device, train_cell

GIB = 1024**3
CUDA_CONTEXT_BYTES = GIB  # a guess, not measured: one process's CUDA context, cuDNN/cuBLAS handles and workspaces
ACTIVATION_ALLOWANCE = 2.0  # a guess, not measured: backward's transient gradients, cached allocator blocks, a CUDA-graph pool
PARAMETER_COPIES = 4  # weights, gradients, momentum, and one spare for autocast's bf16 weights or optimizer scratch
MAX_JOBS_PER_GPU = 6  # a guess, never measured: small nets stop gaining from more processes somewhere around here
IMAGE_BYTES = 3 * 32 * 32 + 8  # uint8 pixels and an int64 label


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


@lru_cache(maxsize=None)
def saved_activation_bytes(spec: NetSpec) -> tuple[int, int]:
    """Bytes per image that autograd keeps for the backward pass in fp32: in all, and the largest tensor.

    Measured on the CPU, in a forward pass of two images under saved-tensor hooks that count
    each saved storage once and leave out the parameters; a GPU keeps the same tensors.
    """
    model = build_net(spec)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        model(torch.zeros(2, 3, 32, 32))
    return sum(saved.values()) // 2, max(saved.values()) // 2


def dataset_bytes(data: DataSpec) -> int:
    """What a worker keeps on its device: every image as uint8 and every label (a folder dataset is assumed CIFAR-sized)."""
    return sum(data.image_counts()) * IMAGE_BYTES


def memory_per_job(cell: Cell, runtime: RuntimeSpec) -> int:
    """An upper estimate of one worker's GPU memory while it trains `cell` (see docs/performance.md).

    The CUDA context, the dataset, the parameters with their gradients and momentum, and the
    larger of training's saved activations (with an allowance) and an evaluation batch's.
    """
    params, _ = net_size(cell.net_spec())
    per_image, largest = saved_activation_bytes(cell.net_spec())
    training = ACTIVATION_ALLOWANCE * per_image * cell.train.batch_size
    evaluation = 3 * largest * runtime.eval_batch_size  # no_grad: a layer's input, output and one temporary at a time
    return int(CUDA_CONTEXT_BYTES + dataset_bytes(cell.data) + PARAMETER_COPIES * 4 * params + max(training, evaluation))


def auto_jobs(device: torch.device, cells: list[Cell], runtime: RuntimeSpec) -> int:
    """Cells to train at once: one on the CPU; on GPUs, as many as free memory holds of the largest cell, capped per GPU."""
    if device.type != "cuda" or len(cells) <= 1:
        return 1
    per_job = max(memory_per_job(cell, runtime) for cell in cells)
    gpus = torch.cuda.device_count() if device.index is None else 1
    per_gpu = []
    for index in range(gpus) if device.index is None else [device.index]:
        free, _ = torch.cuda.mem_get_info(index)
        per_gpu.append(max(1, min(MAX_JOBS_PER_GPU, free // per_job)))
    return int(max(1, min(len(cells), sum(per_gpu))))


def worker_device(device: torch.device, worker: int) -> torch.device:
    """Spread workers over all visible GPUs unless one GPU was named."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


# ----------------------------------------------------------------------------- running

Fault = Literal["cell", "worker", "storage"]
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
DEAD_CONTEXT_MARKERS = ("CUDA error", "illegal memory access", "device-side assert")
ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())  # torch >= 2.8 raises it for CUDA errors; older ones a RuntimeError
WORKER_FAULT_RETRIES = 2  # a guess: a cell that kills two fresh workers more is itself the cause, not bad luck
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WORKER_EXIT_SECONDS = 30.0  # a guess: how long a worker that got its stop signal may take to finish exiting
WORKER_POLL_SECONDS = 5.0  # a choice: how often the sweep looks whether a silent worker is still alive


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


def run_cell(cell: Cell, images: Images, device: torch.device, config: SweepConfig, out_dir: Path, events: CellEvents,
             before_write: Callable[[], None] | None = None) -> CellOutcome:
    """Train one cell, from wherever it stopped; an error is returned, not raised, so that the other cells still run.

    The whole unit of work of a sweep: a worker process here, or a remote one, calls only this.
    """
    folder = ResultsFolder(out_dir).cell(cell.id)
    try:
        files.remove_temp_files(folder.path)  # the sweep's lock makes this the only writer of the folder
        return CellOutcome(train_cell(cell, images, device, config.runtime, folder.path, events, before_write=before_write))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded per cell so that the other cells still run
        fault = classify_error(err)
        if fault == "storage":  # writing error.txt would fail the same way
            return CellOutcome(None, storage_message(err, folder.path), fault)
        if before_write:
            before_write()
        try:
            files.write_text(folder.error_log, traceback.format_exc())
        except OSError as log_err:
            if classify_error(log_err) != "storage":
                raise
            return CellOutcome(None, storage_message(log_err, folder.path), "storage")
        return CellOutcome(None, f"{type(err).__name__}: {err}", fault)


class SharedLock:
    """The sweep's folder lock, handed to a worker process: the folder stays locked until every holder has exited.

    Pickling it for a spawned process passes the descriptor itself (the same open file, hence the same
    flock), so a worker that outlives its sweep for a moment still keeps a second sweep out.
    """

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _adopt_lock, (reduction.DupFd(self.fd),)


def _adopt_lock(inherited: Any) -> SharedLock:
    return SharedLock(inherited.detach())


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the sweep process dies (Linux), and end now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: exit_if_orphaned before each write is the fallback
        pass
    exit_if_orphaned(parent_pid)


def exit_if_orphaned(parent_pid: int) -> None:
    """End this worker at once when its sweep is gone: a new sweep may already be training its cell."""
    if os.getppid() != parent_pid:
        os._exit(1)


class PipeEvents:
    """Forwards a worker's events to the parent process, over the worker's own pipe."""

    def __init__(self, conn: Any):
        self.conn = conn

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.conn.send(("started", cell_id, total_epochs, done_epochs))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.conn.send(("epoch", cell_id, row))

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        self.conn.send(("progress", cell_id, epoch, iterations, per_epoch))


def serve(conn: Any, run: Callable[[int], CellOutcome]) -> None:
    """A worker's loop: train the cells the parent sends until it sends None, or until this process is unfit.

    Each worker has its own pipe and waits on it: no shared queue whose lock a crashed worker could
    keep, and no non-blocking read that mistakes a busy queue for an empty one.
    """
    while (index := conn.recv()) is not None:
        outcome = run(index)
        conn.send(("ended", index, outcome))
        if outcome.fault in ("worker", "storage"):
            return


def _worker(rank: int, parent_pid: int, lock: SharedLock, config: SweepConfig, cells: list[Cell], out_dir: Path,
            device: torch.device, jobs: int, conn: Any) -> None:
    """A worker process: load the data onto its device once, then train the cells it is sent."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    device = worker_device(device, rank)
    prepare_worker_process(device, jobs, resolve_compile(config.runtime.compile, device))
    images = load_images(config.data).to(device)
    forward = PipeEvents(conn)
    serve(conn, lambda index: run_cell(cells[index], images, device, config, out_dir, forward,
                                       before_write=lambda: exit_if_orphaned(parent_pid)))


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


@dataclasses.dataclass
class WorkerHandle:
    """The parent's side of one worker: its process, its pipe, the cell it was sent and the net it last trained."""

    process: Any
    conn: Any
    cell: int | None = None
    net: tuple | None = None


def compile_key(cell: Cell) -> tuple:
    """What a worker compiles once and reuses: cells that share it (other seeds of a net) share its graphs."""
    return cell.net_spec(), cell.train.batch_size, cell.train.precision


def next_cell(pending: collections.deque, cells: list[Cell], net: tuple | None) -> int:
    """The first pending cell of the net the worker already compiled, else the first pending cell (the longest)."""
    same = next((index for index in pending if net is not None and compile_key(cells[index]) == net), None)
    if same is None:
        return pending.popleft()
    pending.remove(same)
    return same


def _run_parallel(config: SweepConfig, cells: list[Cell], out_dir: Path, device: torch.device, jobs: int,
                  display: SweepEvents, lock_fd: int, target: Callable[..., None] = _worker) -> list[str]:
    """Train `cells` in `jobs` worker processes (`target`), replacing each one that a cell leaves unfit."""
    context = torch.multiprocessing.get_context("spawn")
    pending = collections.deque(range(len(cells)))

    def start(rank: int) -> WorkerHandle:
        conn, child_conn = context.Pipe()
        process = context.Process(target=target, daemon=True, args=(rank, os.getpid(), SharedLock(lock_fd), config, cells,
                                                                     out_dir, device, jobs, child_conn))
        process.start()
        child_conn.close()  # the worker's end lives in the worker only: its death reads as end of file here
        return WorkerHandle(process, conn)

    workers = {rank: start(rank) for rank in range(jobs)}
    retired: list[Any] = []  # processes no longer sent anything, on their way out
    attempts = [0] * len(cells)
    failed, ended = [], 0

    def settle(rank: int, index: int, outcome: CellOutcome) -> None:
        nonlocal ended
        workers[rank].cell = None
        attempts[index] += 1
        step = retry_policy(outcome, attempts[index])
        if step == "stop":
            raise StorageError(outcome.error)
        if outcome.fault == "worker":  # that process is gone or going: a fresh one takes its place
            retired.append(workers[rank].process)
            workers[rank].conn.close()
            workers[rank] = start(rank)
        if step == "retry":
            pending.append(index)
            return
        ended += 1
        if outcome.error:
            failed.append(cells[index].id)
        display.cell_ended(cells[index].id, outcome.summary, outcome.error)

    def lost(rank: int) -> None:
        """A worker's pipe closed without a word: the process died (a crash, the OOM killer)."""
        handle = workers[rank]
        handle.process.join(WORKER_EXIT_SECONDS)
        if handle.cell is not None:
            settle(rank, handle.cell, CellOutcome(None, f"its worker process died (exit code {handle.process.exitcode})", "worker"))
        else:  # died idle, e.g. while loading the data: a fresh one would likely die the same way
            retired.append(handle.process)
            handle.conn.close()
            del workers[rank]

    try:
        while ended < len(cells):
            # asking a retired worker for its exit code waits for it once it has ended: no zombie until the sweep ends
            retired = [process for process in retired if process.exitcode is None]
            for handle in workers.values():
                if handle.cell is None and pending:
                    handle.cell = next_cell(pending, cells, handle.net)
                    handle.net = compile_key(cells[handle.cell])
                    with contextlib.suppress(BrokenPipeError):  # it just died: its end of file is read below
                        handle.conn.send(handle.cell)
            if not workers:
                raise RuntimeError("all worker processes exited before the sweep finished (see the messages above)")
            by_conn = {handle.conn: rank for rank, handle in workers.items()}
            ready = connection.wait(list(by_conn), WORKER_POLL_SECONDS)
            for conn, rank in by_conn.items():  # a dead worker whose pipe another process still holds open sends no end of file
                if conn not in ready and not workers[rank].process.is_alive() and not conn.poll():
                    lost(rank)
            for conn in ready:
                rank = by_conn[conn]
                try:
                    kind, *rest = conn.recv()
                except EOFError:
                    lost(rank)
                    continue
                if kind == "started":
                    display.cell_started(*rest)
                elif kind == "epoch":
                    display.epoch_done(*rest)
                elif kind == "progress":
                    display.epoch_progress(*rest)
                else:
                    settle(rank, *rest)
        for handle in workers.values():
            with contextlib.suppress(BrokenPipeError):
                handle.conn.send(None)
        for process in [*(handle.process for handle in workers.values()), *retired]:
            process.join(WORKER_EXIT_SECONDS)
    finally:
        for process in [*(handle.process for handle in workers.values()), *retired]:
            if process.is_alive():
                process.terminate()
            process.join()
    return failed


def _run_inline(config: SweepConfig, images: Images, cells: list[Cell], out_dir: Path, device: torch.device,
                display: SweepEvents) -> list[str]:
    images = images.to(device)
    failed = []
    for cell in cells:
        outcome = run_cell(cell, images, device, config, out_dir, display)
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

    if executor is not None:
        jobs = executor.slots(todo)
    else:
        jobs = min(auto_jobs(device, todo, config.runtime) if config.runtime.jobs == "auto" else config.runtime.jobs, len(todo))
    events.sweep_started(SweepStart(name=config.name, out_dir=results.path, total=len(config.cells), finished=len(skipped),
                                    to_train=len(todo), jobs=jobs, device=str(device), device_name=device_name(device)))
    if executor is not None:
        failed = executor.run(config, images, todo, results.path, events)
    elif jobs > 1:
        failed = _run_parallel(config, todo, results.path, device, jobs, events, lock_fd)
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
