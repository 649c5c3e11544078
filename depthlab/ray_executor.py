"""Cells as Ray tasks: a sweep that outgrows one machine hands its cells to a Ray cluster, not to a scheduler of ours.

The driver (the `depthlab sweep` process) decides what runs with the same rules as a local sweep,
before any task starts; each pending cell then becomes one Ray task that calls `attempt.run_cell`.
Ray places the tasks (a GPU share each), and reruns a task whose worker process or node died, up to
`SYSTEM_RETRIES` times. The results folder stays the single source of truth: with a shared filesystem
(the driver's folder visible at the same absolute path) a task writes its cell folder directly, as a
local worker would; without one it trains in a scratch folder and returns the cell's files, which
the driver writes. Ray is imported only here, and only when this executor is used.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

from . import files, install_command
from .config import Cell, ConfigError, SweepConfig
from .data import Images
from .results_folder import DONE, ResultsFolder
from .attempt import CellOutcome, retry_policy, run_cell
from .errors import StorageError
from .events import ForwardedEvents, deliver
from .sweep import SweepEvents
from .train import resolve_device

RAY_INSTALL = install_command("ray")
SYSTEM_RETRIES = 3  # a guess: Ray reruns a task this often after its worker process or node died
POLL_SECONDS = 0.2  # how often the driver forwards the tasks' progress events to the display
SHARED_FS_MARKER = ".shared-fs-check"  # hidden: bookkeeping, not a result

CellFiles = dict[str, bytes]
Filesystem = Literal["detect", "shared", "none"]


def import_ray() -> Any:
    """Ray, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray", "", f"Ray is not installed; install it with: {RAY_INSTALL}") from None
    return ray


class EventBox:
    """A Ray actor the tasks put their cells' events into (events.ForwardedEvents) and the driver drains."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def put(self, event: tuple) -> None:
        self.events.append(event)

    def drain(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


def read_cell_files(folder: Path) -> CellFiles:
    """A cell folder's files by name (hidden temporary files left out)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def write_cell_files(folder: Path, contents: CellFiles) -> None:
    """Make `folder` hold exactly `contents`, each file written atomically and DONE last, as training writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(contents, key=lambda name: name == DONE):
        files.write_bytes(folder / name, contents[name])
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.name not in contents:
            path.unlink()  # e.g. the checkpoint, which a finished cell removes


def sees_marker(marker: Path, token: str) -> bool:
    """Whether this machine sees the driver's results folder: the marker the driver wrote is here, with its token."""
    try:
        return marker.read_text() == token
    except OSError:
        return False


def train_task(cell: Cell, images: Images, config: SweepConfig, out_dir: str, marker: str | None, token: str,
               shipped: CellFiles, box: Any, runner: Callable[..., CellOutcome]) -> tuple[CellOutcome, CellFiles | None]:
    """One Ray task: train `cell` into the shared results folder, or in a scratch folder whose files it returns.

    The device is resolved here, on the worker: Ray makes the GPUs it granted this task visible.
    """
    device = resolve_device(config.runtime.device)
    images = images.to(device)
    events = ForwardedEvents(box.put.remote)  # without waiting: a slow driver never stalls training
    if marker is not None and sees_marker(Path(marker), token):
        return runner(cell, images, device, config, Path(out_dir), events), None
    with tempfile.TemporaryDirectory(prefix="depthlab-") as scratch:
        folder = ResultsFolder(Path(scratch)).cell(cell.id)
        write_cell_files(folder.path, shipped)  # the driver's checkpoint, if any: the cell resumes from it
        outcome = runner(cell, images, device, config, Path(scratch), events)
        return outcome, read_cell_files(folder.path)


@dataclasses.dataclass
class RayExecutor:
    """Trains a sweep's cells as Ray tasks (see the module's docstring); `sweep.Executor`.

    `address` is Ray's: None starts a Ray instance on this machine (unless one is running in this
    process already), "auto" joins the cluster this machine belongs to, "ray://host:port" a remote one.
    `filesystem` is "detect" (a marker file in the results folder), "shared" or "none".
    `runner` is what each task calls to train its cell.
    """

    address: str | None = None
    gpus_per_cell: float = 0.0
    filesystem: Filesystem = "detect"
    runner: Callable[..., CellOutcome] = run_cell
    _ray: Any = dataclasses.field(default=None, init=False, repr=False)

    def connect(self) -> Any:
        if self._ray is None:
            ray = import_ray()
            if not ray.is_initialized():
                ray.init(address=self.address, include_dashboard=False, log_to_driver=True)
            self._ray = ray
        return self._ray

    def slots(self, cells: list[Cell]) -> int:
        """Cells at once: what the cluster's CPUs (or GPUs, with a GPU share per cell) hold now."""
        resources = self.connect().cluster_resources()
        if self.gpus_per_cell > 0:
            fit = int(resources.get("GPU", 0) / self.gpus_per_cell)
        else:
            fit = int(resources.get("CPU", 1))
        return max(1, min(len(cells), fit))

    def run(self, config: SweepConfig, images: Images, cells: list[Cell], out_dir: Path, events: SweepEvents) -> list[str]:
        ray = self.connect()
        results = ResultsFolder(out_dir)
        task = ray.remote(max_retries=SYSTEM_RETRIES, retry_exceptions=False, num_cpus=1, num_gpus=self.gpus_per_cell)(train_task)
        box = ray.remote(num_cpus=0)(EventBox).remote()
        images_ref = ray.put(images)  # once: each node fetches it once from the object store, not once per cell
        marker, token = results.path.resolve() / SHARED_FS_MARKER, secrets.token_hex(8)
        if self.filesystem != "none":
            files.write_text(marker, token)
        shared_path = None if self.filesystem == "none" else str(marker)

        def submit(cell: Cell) -> Any:
            shipped = {} if self.filesystem == "shared" else read_cell_files(results.cell(cell.id).path)
            return task.remote(cell, images_ref, config, str(results.path.resolve()), shared_path, token, shipped, box, self.runner)

        def forward() -> None:
            for message in ray.get(box.drain.remote()):
                deliver(message, events)

        running = {submit(cell): index for index, cell in enumerate(cells)}
        attempts = [0] * len(cells)
        failed: list[str] = []
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                forward()
                for ref in ready:
                    index = running.pop(ref)
                    cell = cells[index]
                    outcome = self.collect(ray, ref, results, cell)
                    attempts[index] += 1
                    step = retry_policy(outcome, attempts[index])
                    if step == "stop":
                        raise StorageError(outcome.error)
                    if step == "retry":
                        running[submit(cell)] = index
                        continue
                    forward()
                    if outcome.error:
                        failed.append(cell.id)
                    events.cell_ended(cell.id, outcome.summary, outcome.error)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            marker.unlink(missing_ok=True)
        return failed

    def collect(self, ray: Any, ref: Any, results: ResultsFolder, cell: Cell) -> CellOutcome:
        """A task's outcome, its files written where the task could not; a task Ray gave up on is a failed cell."""
        folder = results.cell(cell.id)
        try:
            outcome, contents = ray.get(ref)
        except ray.exceptions.RayError as err:  # retries spent on dead workers, or an error outside run_cell
            message = f"its Ray task failed: {type(err).__name__}"
            files.write_text(folder.error_log, f"{message}\n\n{err}\n")
            return CellOutcome(None, message, "cell")
        if contents is not None:
            write_cell_files(folder.path, contents)
        return outcome
