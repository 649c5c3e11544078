"""A sweep's results as tables to load: one row per cell, one row per epoch of every cell, and where they came from.

    from depthlab.results import load_results
    cells, curves = load_results("results/cpu")   # two pandas DataFrames
    cells[cells.state == "finished"].groupby(["arch", "depth"]).clean_train_err.mean()

`depthlab report` writes the same tables as cells.csv and curves.csv into the results folder.
Every cell of the sweep is a row of `cells`, also those not finished (their `state` says which;
their final numbers are empty). `curves` holds every epoch each readable cell has recorded, with
the same identity columns and, where the cell recorded them, the training dynamics of that epoch.
Cells whose files do not read back whole (state `damaged`) have no curve.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from . import files
from .config import Cell, ConfigError, parse_config
from .results_folder import CellFolder, CellState, FinalErrors, ResultsFolder, cell_identity, read_cell

IDENTITY = ["id", "arch", "depth", "seed", "variant", "shortcut"]
FINAL = list(FinalErrors.__annotations__)  # train_loss, train_err, test_loss, … clean_train_err
HOW = ["epochs", "iterations", "train_seconds", "compile_seconds", "images_per_second", "precision", "device_name"]
CELL_COLUMNS = IDENTITY + ["state"] + FINAL + HOW


def _expected(results: ResultsFolder) -> dict[str, Cell]:
    """The sweep's cells by id, from its sweep.yaml; none when it is missing or does not read back."""
    try:
        config = parse_config(yaml.safe_load(results.sweep_file.read_text()), source=str(results.sweep_file))
    except (OSError, ConfigError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return {cell.id: cell for cell in config.cells}


def _cell_row(folder: CellFolder, expected: Optional[Cell]) -> tuple[dict[str, Any], Optional[pd.DataFrame]]:
    """A cell's row of `cells` and its epochs (None when it has none it can vouch for)."""
    record = read_cell(folder, expected.fingerprint() if expected is not None else None)
    summary: dict[str, Any] = dict(record.summary or {})
    described = summary or record.config or (expected.to_record() if expected is not None else {})
    row = {**cell_identity(folder.id, described), "state": record.state.value, **summary.get("final", {}),
           **{key: summary.get(key) for key in HOW}}
    if record.metrics is None:
        return row, None
    curve = pd.DataFrame(record.metrics)
    if folder.dynamics.is_file():
        try:
            curve = curve.merge(pd.read_csv(folder.dynamics), on="epoch", how="left")
        except (ValueError, KeyError, UnicodeDecodeError):  # optional: a dynamics file that does not read back is left out
            pass
    return row, curve.assign(**{key: row[key] for key in IDENTITY + ["state"]})


def load_results(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, curves) of the results folder at `path`: one row per cell, and one row per epoch of every cell.

    `cells` columns: id, arch, depth, seed, variant, shortcut, state (finished, diverged, partial, failed,
    pending, stale or damaged), the final errors and losses in % (empty for cells that did not end),
    epochs, iterations, train_seconds, compile_seconds, images_per_second, precision, device_name.
    `curves` columns: id, arch, depth, seed, variant, shortcut, state, then metrics.csv's (epoch, iteration,
    lr, train_loss, train_err, test_loss, test_err, val_*, seconds) and dynamics.csv's, where recorded.
    """
    results = ResultsFolder(Path(path))
    if not results.cells_dir.is_dir():
        raise FileNotFoundError(f"{results.path}: no '{results.cells_dir.name}' folder; run `depthlab sweep CONFIG` first")
    expected = _expected(results)
    on_disk = {folder.id: folder for folder in results.cells_on_disk()}
    rows, curves = [], []
    for cell_id in list(expected) + [name for name in on_disk if name not in expected]:
        if cell_id not in on_disk:
            rows.append({**cell_identity(cell_id, expected[cell_id].to_record()), "state": CellState.PENDING.value})
            continue
        row, curve = _cell_row(on_disk[cell_id], expected.get(cell_id))
        rows.append(row)
        if curve is not None:
            curves.append(curve)
    cells = pd.DataFrame(rows).reindex(columns=CELL_COLUMNS)
    curve_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=IDENTITY + ["state", "epoch"])
    leading = IDENTITY + ["state"]
    return cells, curve_frame[leading + [c for c in curve_frame.columns if c not in leading]]


def write_tables(results_dir: Path) -> list[Path]:
    """cells.csv and curves.csv in `results_dir` (what `load_results` returns); their paths."""
    cells, curves = load_results(results_dir)
    results = ResultsFolder(Path(results_dir))
    for path, frame in ((results.cells_table, cells), (results.curves_table, curves)):
        files.write_text(path, frame.to_csv(index=False))
    return [results.cells_table, results.curves_table]


# ----------------------------------------------------------------------------- provenance

PROVENANCE_KEYS = ("git_commit", "depthlab", "torch", "python", "cuda", "device", "device_name", "started_at")


def _time(text: Any) -> Optional[datetime]:
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def provenance(results_dir: Path) -> dict[str, Any]:
    """What produced these results: commit, versions and device of the latest sweep run (environment.json), when its
    last cell ended, the wall time from that run's start to then, and the training time summed over all ended cells.

    Empty values where a folder does not record them (environment.json is written by sweeps that trained a cell).
    """
    results = ResultsFolder(Path(results_dir))
    try:
        environment = files.read_json(results.environment) if results.environment.is_file() else {}
    except (OSError, ValueError):
        environment = {}
    records = (read_cell(folder) for folder in results.cells_on_disk())
    summaries = [record.summary for record in records if record.summary is not None]
    ends = [t for t in (_time(s.get("finished_at")) for s in summaries) if t is not None]
    finished = max(ends) if ends else None
    started = _time(environment.get("started_at"))
    wall = (finished - started).total_seconds() if finished and started and finished >= started else None
    cell_seconds = sum(float(s.get("train_seconds") or 0) + float(s.get("compile_seconds") or 0) for s in summaries)
    return {**{key: environment.get(key) if isinstance(environment, dict) else None for key in PROVENANCE_KEYS},
            "finished_at": finished.isoformat() if finished else None, "wall_seconds": wall,
            "cells_ended": len(summaries), "cell_train_seconds": cell_seconds if summaries else None}


def provenance_line(record: dict[str, Any]) -> Optional[str]:
    """'commit 66575ba, depthlab 0.1.0, torch 2.5.1, on AMD EPYC (cpu), 2026-12-03T08:00:00+00:00 → …, wall 7.5 min, …'."""
    if not any(record.get(key) for key in PROVENANCE_KEYS):
        return None
    parts = [f"commit {(record.get('git_commit') or 'unknown')[:12]}",
             f"depthlab {record.get('depthlab') or '?'}", f"torch {record.get('torch') or '?'}",
             f"on {record.get('device_name') or '?'} ({record.get('device') or '?'})"]
    if record.get("started_at"):
        parts.append(f"latest run started {record['started_at']}" + (f", last cell ended {record['finished_at']}"
                                                                      if record.get("finished_at") else ""))
    if record.get("wall_seconds") is not None:
        parts.append(f"wall time {record['wall_seconds'] / 60:.1f} min")
    if record.get("cell_train_seconds") is not None:
        parts.append(f"training time {record['cell_train_seconds'] / 60:.1f} min over {record['cells_ended']} cell(s)")
    return ", ".join(parts)
