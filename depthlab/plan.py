"""What a sweep will run: its cells, their size, the compute they need, and (measured here) how long."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from contextlib import contextmanager

from .config import SweepConfig
from .models import net_size
from .pool import auto_jobs
from .sweep import cell_record


@dataclass
class Plan:
    """One row per cell, and the projected wall time when it was estimated."""

    rows: list[dict[str, Any]]
    projection: Optional[dict[str, Any]] = None


def plan_cells(config: SweepConfig, out_dir: Path) -> list[dict[str, Any]]:
    """One row per cell: model size, forward MACs per image, training compute and current status."""
    n_train = config.data.expected_train_images()
    rows = []
    for cell in config.cells:
        params, macs = net_size(cell.net_spec())
        length = cell.train.run_length(n_train)
        images = length.iterations * cell.train.batch_size
        state = cell_record(out_dir, cell).state
        rows.append({"id": cell.id, "arch": cell.arch, "depth": cell.depth, "seed": cell.seed, "shortcut": cell.shortcut,
                     "params": params, "macs": macs, "iterations": length.iterations, "epochs": images / n_train,
                     "train_flops": 3 * 2 * macs * images,  # forward + backward ≈ 3 forwards, 2 FLOPs per MAC
                     "status": state.plan_status, "state": state.value})
    return rows


FLOP_UNITS = (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6))
HEARTBEAT_SECONDS = 30.0  # a choice: a line every half minute tells a log that the estimate is still timing


def compute_text(flops: float) -> str:
    """Training compute in the largest unit that keeps at least one whole unit: '3.5 TFLOP', not '0.00 PFLOP'."""
    for unit, size in FLOP_UNITS:
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.3g} FLOP"


@contextmanager
def _heartbeat(say: Callable[[str], None], every: float) -> Iterator[None]:
    """Say how long the timing has run, every `every` seconds, until the block ends."""
    started, done = time.monotonic(), threading.Event()

    def beat() -> None:
        while not done.wait(every):
            say(f"  still timing ({time.monotonic() - started:.0f} s so far)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    say(f"  timed in {time.monotonic() - started:.0f} s")


def make_plan(config: SweepConfig, out_dir: Path, estimate: bool = False, jobs: Optional[int] = None,
              progress: Callable[[str], None] = lambda line: None) -> Plan:
    """The plan; with `estimate`, each distinct model is timed briefly on the config's device to project the wall time,
    and `progress` is told what is timed and, while it runs, how long it has taken so far."""
    rows = plan_cells(config, out_dir)
    if not estimate:
        return Plan(rows)
    from .bench import ESTIMATE_REPEATS, _model_key, estimate_seconds
    from .train import device_name, resolve_device

    device = resolve_device(config.runtime.device)
    todo = [cell for cell, row in zip(config.cells, rows) if row["status"] != "finished"]
    k = jobs or (auto_jobs(device, todo, config.runtime) if config.runtime.jobs == "auto" else config.runtime.jobs)
    models = {_model_key(cell) for cell in todo}  # what estimate_seconds times once each
    progress(f"timing {len(models)} distinct model(s) on {device_name(device)} ({device}): one warm-up, then "
             f"{ESTIMATE_REPEATS} rounds over all of them")
    with _heartbeat(progress, HEARTBEAT_SECONDS):
        projection = estimate_seconds(todo, device, config.runtime, config.data.expected_train_images(), k)
    for row in rows:
        row["estimated_seconds"] = projection["cells"].get(row["id"], 0.0)
    return Plan(rows, projection)
