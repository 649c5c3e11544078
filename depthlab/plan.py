"""What a sweep will run: its cells, their size, the compute they need, and (measured here) how long."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import SweepConfig
from .layout import CellState
from .models import net_size
from .sweep import auto_jobs, cell_state


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
        state = cell_state(out_dir, cell)
        rows.append({"id": cell.id, "arch": cell.arch, "depth": cell.depth, "seed": cell.seed, "shortcut": cell.shortcut,
                     "params": params, "macs": macs, "iterations": length.iterations, "epochs": images / n_train,
                     "train_flops": 3 * 2 * macs * images,  # forward + backward ≈ 3 forwards, 2 FLOPs per MAC
                     "status": _plan_status(state), "state": state.value})
    return rows


def _plan_status(state: CellState) -> str:
    """`status` as plan has always printed it: finished (ended), partial, stale or pending; and damaged."""
    if state.ended:
        return "finished"
    return {CellState.FAILED: "partial", CellState.PARTIAL: "partial", CellState.STALE: "stale",
            CellState.DAMAGED: "damaged"}.get(state, "pending")


def make_plan(config: SweepConfig, out_dir: Path, estimate: bool = False, jobs: Optional[int] = None) -> Plan:
    """The plan; with `estimate`, each distinct model is timed briefly on the config's device to project the wall time."""
    rows = plan_cells(config, out_dir)
    if not estimate:
        return Plan(rows)
    from .bench import estimate_seconds
    from .train import resolve_device

    device = resolve_device(config.runtime.device)
    todo = [cell for cell, row in zip(config.cells, rows) if row["status"] != "finished"]
    k = jobs or (auto_jobs(device, todo, config.runtime) if config.runtime.jobs == "auto" else config.runtime.jobs)
    projection = estimate_seconds(todo, device, config.runtime, config.data.expected_train_images(), k)
    for row in rows:
        row["estimated_seconds"] = projection["cells"].get(row["id"], 0.0)
    return Plan(rows, projection)
