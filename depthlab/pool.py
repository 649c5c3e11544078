"""The worker pool: a sweep's cells trained at once in worker processes on this machine.

How many workers fit (`auto_jobs`, from an upper estimate of one worker's GPU memory), which cell a free worker
trains next (another seed of the net it compiled, else the longest; with runtime.group_seeds, up to that many
cells that differ only in seed as one unit, trained as one grouped model, each cell still ending alone), and
what happens when a worker dies or outlives its sweep: a cell that killed its worker goes to a fresh one (`attempt.retry_policy`), and a worker
whose sweep died ends itself (`die_with_parent`). Workers forward their cells' events as `events.ForwardedEvents`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import math
import os
import signal
import threading
import time
from functools import lru_cache
from multiprocessing import connection, reduction
from pathlib import Path
from typing import Any, Callable

import torch

from .attempt import CellOutcome, retry_policy, run_cell, run_group
from .config import Cell, DataSpec, RuntimeSpec, SweepConfig
from .data import load_images
from .errors import StorageError
from .events import ForwardedEvents, RunEvents, deliver
from .group_training import plan_groups
from .models import build_net, net_size
from .options import NetSpec
from .train import prepare_worker_process, resolve_compile

GIB = 1024**3
CUDA_CONTEXT_BYTES = GIB  # a guess, not measured: one process's CUDA context, cuDNN/cuBLAS handles and workspaces
ACTIVATION_ALLOWANCE = 2.0  # a guess, not measured: backward's transient gradients, cached allocator blocks, a CUDA-graph pool
PARAMETER_COPIES = 4  # weights, gradients, momentum, and one spare for autocast's bf16 weights or optimizer scratch
MAX_JOBS_PER_GPU = 6  # a guess, never measured: small nets stop gaining from more processes somewhere around here
IMAGE_BYTES = 3 * 32 * 32 + 8  # uint8 pixels and an int64 label
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WORKER_EXIT_SECONDS = 30.0  # a guess: how long a worker that got its stop signal may take to finish exiting
WORKER_POLL_SECONDS = 5.0  # a choice: how often the sweep looks whether a silent worker is still alive
ORPHAN_POLL_SECONDS = 1.0  # a choice: how often a worker looks whether its sweep is still alive (where no kernel signal tells it)
ENDED = "ended"  # a worker's message for an attempt that ended, beside the forwarded cell events


# ----------------------------------------------------------------------------- how many workers


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


def memory_per_job(cell: Cell, runtime: RuntimeSpec, members: int = 1) -> int:
    """An upper estimate of one worker's GPU memory while it trains `cell` (see docs/performance.md).

    The CUDA context, the dataset, the parameters with their gradients and momentum, and the
    larger of training's saved activations (with an allowance) and an evaluation batch's.
    A worker that trains `members` seeds as one grouped model holds each of these but the
    context and the dataset that many times (its layers have that many times the channels).
    """
    params, _ = net_size(cell.net_spec())
    per_image, largest = saved_activation_bytes(cell.net_spec())
    training = ACTIVATION_ALLOWANCE * per_image * cell.train.batch_size
    evaluation = 3 * largest * runtime.eval_batch_size  # no_grad: a layer's input, output and one temporary at a time
    return int(CUDA_CONTEXT_BYTES + dataset_bytes(cell.data) + members * (PARAMETER_COPIES * 4 * params + max(training, evaluation)))


def auto_jobs(device: torch.device, cells: list[Cell], runtime: RuntimeSpec, members: int = 1) -> int:
    """Workers to run at once: one on the CPU; on GPUs, as many as free memory holds of the largest cell, capped per GPU.

    `members`: each worker trains up to that many seeds as one grouped model, so `cells` make fewer units of work.
    """
    units = math.ceil(len(cells) / max(1, members))
    if device.type != "cuda" or units <= 1:
        return 1
    per_job = max(memory_per_job(cell, runtime, members) for cell in cells)
    gpus = torch.cuda.device_count() if device.index is None else 1
    per_gpu = []
    for index in range(gpus) if device.index is None else [device.index]:
        free, _ = torch.cuda.mem_get_info(index)
        per_gpu.append(max(1, min(MAX_JOBS_PER_GPU, free // per_job)))
    return int(max(1, min(units, sum(per_gpu))))


def worker_device(device: torch.device, worker: int) -> torch.device:
    """Spread workers over all visible GPUs unless one GPU was named."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


# ----------------------------------------------------------------------------- the workers


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
    """End this worker when the sweep process dies: the kernel SIGKILLs it at once (Linux), and a watchdog thread
    ends it within ORPHAN_POLL_SECONDS elsewhere; end now if the sweep is gone already. Until the worker has exited
    it holds the folder's lock (SharedLock), so no new sweep trains its cell meanwhile."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog below is what ends the worker
        pass
    exit_if_orphaned(parent_pid)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="depthlab-orphan-watch").start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(ORPHAN_POLL_SECONDS)
        exit_if_orphaned(parent_pid)


def exit_if_orphaned(parent_pid: int) -> None:
    """End this worker at once when its sweep is gone: a new sweep may soon train its cell."""
    if os.getppid() != parent_pid:
        os._exit(1)


Work = int | list[int]  # what a worker is sent: a cell's index, or the indices of cells to train as one group


def serve(conn: Any, run: Callable[[Work], CellOutcome | list[CellOutcome]]) -> None:
    """A worker's loop: train the cells the parent sends until it sends None, or until this process is unfit.

    `run` returns a cell's CellOutcome, or a group's list of them; each cell's ending is sent on its own.
    Each worker has its own pipe and waits on it: no shared queue whose lock a crashed worker could
    keep, and no non-blocking read that mistakes a busy queue for an empty one.
    """
    while (work := conn.recv()) is not None:
        result = run(work)
        ended = list(zip(work, result)) if isinstance(work, list) else [(work, result)]
        for index, outcome in ended:
            conn.send((ENDED, index, outcome))
        if any(outcome.fault in ("worker", "storage") for _, outcome in ended):
            return


def _worker(rank: int, parent_pid: int, lock: SharedLock, config: SweepConfig, cells: list[Cell], out_dir: Path,
            device: torch.device, jobs: int, conn: Any) -> None:
    """A worker process: load the data onto its device once, then train the cells it is sent."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    device = worker_device(device, rank)
    prepare_worker_process(device, jobs, resolve_compile(config.runtime.compile, device))
    images = load_images(config.data).to(device)
    forward = ForwardedEvents(conn.send)
    serve(conn, lambda work: run_group([cells[index] for index in work], images, device, config, out_dir, forward)
          if isinstance(work, list) else run_cell(cells[work], images, device, config, out_dir, forward))


@dataclasses.dataclass
class WorkerHandle:
    """The parent's side of one worker: its process, its pipe, the cell or group it was sent and the net it last trained."""

    process: Any
    conn: Any
    cell: Work | None = None
    net: tuple | None = None
    waiting: set[int] = dataclasses.field(default_factory=set)  # the cells sent whose ending has not come back


def compile_key(cell: Cell) -> tuple:
    """What a worker compiles once and reuses: cells that share it (other seeds of a net) share its graphs."""
    return cell.net_spec(), cell.train.batch_size, cell.train.precision


def next_cell(pending: collections.deque, cells: list[Cell], net: tuple | None) -> Work:
    """The first pending cell (or group) of the net the worker already compiled, else the first pending one (the longest)."""
    same = next((work for work in pending if net is not None and compile_key(cells[cells_of(work)[0]]) == net), None)
    if same is None:
        return pending.popleft()
    pending.remove(same)
    return same


def cells_of(work: Work) -> list[int]:
    """The indices of the cells in a unit of work."""
    return work if isinstance(work, list) else [work]


def units_of_work(cells: list[Cell], group_seeds: int) -> list[Work]:
    """`cells` as units of work: a cell's index, or the indices of up to `group_seeds` cells that differ only in seed."""
    return [unit if len(unit) > 1 else unit[0] for unit in plan_groups(cells, group_seeds)]


def run_pool(config: SweepConfig, cells: list[Cell], out_dir: Path, device: torch.device, jobs: int,
             display: RunEvents, lock_fd: int, target: Callable[..., None] = _worker, group_seeds: int = 1) -> list[str]:
    """Train `cells` in `jobs` worker processes (`target`), replacing each one that a cell leaves unfit; the failed ids.
    Up to `group_seeds` cells that differ only in seed go to one worker as one group."""
    return _Pool(config, cells, out_dir, device, display, lock_fd, target, jobs, group_seeds).run()


class _Pool:
    """The parent's side of the worker processes of one run_pool call."""

    def __init__(self, config: SweepConfig, cells: list[Cell], out_dir: Path, device: torch.device, display: RunEvents,
                 lock_fd: int, target: Callable[..., None], jobs: int, group_seeds: int):
        self.context = torch.multiprocessing.get_context("spawn")
        self.args = (config, cells, out_dir, device, jobs)
        self.cells, self.display, self.lock_fd, self.target = cells, display, lock_fd, target
        self.pending: collections.deque[Work] = collections.deque(units_of_work(cells, group_seeds))
        self.attempts = [0] * len(cells)
        self.failed: list[str] = []
        self.ended = 0
        self.retired: list[Any] = []  # processes no longer sent anything, on their way out
        self.workers = {rank: self.start(rank) for rank in range(jobs)}

    def start(self, rank: int) -> WorkerHandle:
        conn, child_conn = self.context.Pipe()
        process = self.context.Process(target=self.target, daemon=True,
                                       args=(rank, os.getpid(), SharedLock(self.lock_fd), *self.args, child_conn))
        process.start()
        child_conn.close()  # the worker's end lives in the worker only: its death reads as end of file here
        return WorkerHandle(process, conn)

    def run(self) -> list[str]:
        try:
            while self.ended < len(self.cells):
                # asking a retired worker for its exit code waits for it once it has ended: no zombie until the sweep ends
                self.retired = [process for process in self.retired if process.exitcode is None]
                self.hand_out()
                self.receive()
            for handle in self.workers.values():
                with contextlib.suppress(BrokenPipeError):
                    handle.conn.send(None)
            for process in self.processes():
                process.join(WORKER_EXIT_SECONDS)
        finally:
            for process in self.processes():
                if process.is_alive():
                    process.terminate()
                process.join()
        return self.failed

    def processes(self) -> list[Any]:
        return [*(handle.process for handle in self.workers.values()), *self.retired]

    def hand_out(self) -> None:
        """Send each idle worker its next cell or group."""
        for handle in self.workers.values():
            if handle.cell is None and self.pending:
                handle.cell = next_cell(self.pending, self.cells, handle.net)
                handle.waiting = set(cells_of(handle.cell))
                handle.net = compile_key(self.cells[cells_of(handle.cell)[0]])
                with contextlib.suppress(BrokenPipeError):  # it just died: its end of file is read below
                    handle.conn.send(handle.cell)
        if not self.workers:
            raise RuntimeError("all worker processes exited before the sweep finished (see the messages above)")

    def receive(self) -> None:
        """Wait for the workers' messages, and notice those that died."""
        by_conn = {handle.conn: rank for rank, handle in self.workers.items()}
        ready = connection.wait(list(by_conn), WORKER_POLL_SECONDS)
        for conn, rank in by_conn.items():  # a dead worker whose pipe another process still holds open sends no end of file
            if conn not in ready and not self.workers[rank].process.is_alive() and not conn.poll():
                self.lost(rank)
        for conn in ready:
            rank = by_conn[conn]
            try:
                message = conn.recv()
            except EOFError:
                self.lost(rank)
                continue
            if message[0] == ENDED:
                self.settle(rank, *message[1:])
            else:
                deliver(message, self.display)

    def settle(self, rank: int, index: int, outcome: CellOutcome) -> None:
        """An attempt at cells[index] ended on worker `rank`: retry it (alone), record it, or stop the sweep (retry_policy).
        The worker is free once every cell it was sent has ended."""
        handle = self.workers[rank]
        handle.waiting.discard(index)
        if not handle.waiting:
            handle.cell = None
        self.attempts[index] += 1
        step = retry_policy(outcome, self.attempts[index])
        if step == "stop":
            raise StorageError(outcome.error)
        if outcome.fault == "worker" and handle.cell is None:  # that process is gone or going: a fresh one takes its place
            self.retire(rank)
            self.workers[rank] = self.start(rank)
        if step == "retry":
            self.pending.append(index)
            return
        self.ended += 1
        if outcome.error:
            self.failed.append(self.cells[index].id)
        self.display.cell_ended(self.cells[index].id, outcome.summary, outcome.error)

    def lost(self, rank: int) -> None:
        """A worker's pipe closed without a word: the process died (a crash, the OOM killer)."""
        handle = self.workers[rank]
        handle.process.join(WORKER_EXIT_SECONDS)
        if handle.cell is not None:
            for index in sorted(handle.waiting):
                self.settle(rank, index, CellOutcome(None, f"its worker process died (exit code {handle.process.exitcode})", "worker"))
        else:  # died idle, e.g. while loading the data: a fresh one would likely die the same way
            self.retire(rank)
            del self.workers[rank]

    def retire(self, rank: int) -> None:
        self.retired.append(self.workers[rank].process)
        self.workers[rank].conn.close()
