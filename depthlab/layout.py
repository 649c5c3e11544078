"""The results folder: its file names, a cell's state, and the summary's schema — the one place they live.

    results/<name>/
        sweep.yaml          the config as run (every cell spelled out)
        environment.json    versions, device and git commit of the latest run
        .lock               held while a sweep, or any of its workers, runs in this folder
        report.md, report.csv, figure6.png, dynamics.png, verdict.png
        verdict_looks.jsonl the seed sets the verdict has judged (one JSON object a line)
        cells/<id>/
            config.json     what defines the cell, its fingerprint and its run length
            metrics.csv     one row per epoch (METRIC_COLUMNS)
            dynamics.csv    one row per epoch: gradient norm per section, mean branch ratio per stage (optional)
            checkpoint.pt   while unfinished: weights, optimizer and loop state after the last epoch
            error.txt       the traceback of the last attempt that crashed
            summary.json    the final numbers (Summary)
            model.pt        the trained weights
            DONE            the fingerprint, written last: the cell is finished
        superseded/<id>-<time>/   cells moved aside by `sweep --force`
        damaged/<id>-<time>/      files that did not read back whole, moved aside by `sweep` before it trains the cell again

sweep, train, plan and report all go through this module; none of them spells a file name.
It needs neither torch nor pandas.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Optional, TypedDict

from . import files

METRIC_COLUMNS = ("epoch", "iteration", "lr", "train_loss", "train_err", "test_loss", "test_err", "val_loss", "val_err", "seconds")
PLOTTED_COLUMNS = ("epoch", "iteration", "train_err", "test_err")  # what the report reads from every metrics.csv
SUMMARY_KEYS = ("id", "arch", "depth", "seed", "status", "epochs", "final")  # what the report reads from every summary.json


class CellState(str, Enum):
    """Where a cell stands, in the words every command uses."""

    PENDING = "pending"  # nothing trained yet
    PARTIAL = "partial"  # some epochs trained (running now, or interrupted): the sweep resumes it
    FAILED = "failed"  # the last attempt crashed (error.txt is newer than the last epoch): the sweep retries it
    FINISHED = "finished"
    DIVERGED = "diverged"  # finished early with a non-finite loss: a result, recorded as such
    STALE = "stale"  # results (or a checkpoint) under another configuration: the sweep refuses or supersedes
    DAMAGED = "damaged"  # a file does not read back whole (CellFolder.damage): the sweep moves it aside and trains again

    @property
    def ended(self) -> bool:
        """Finished or diverged: the sweep will not train it again."""
        return self in (CellState.FINISHED, CellState.DIVERGED)


class FinalErrors(TypedDict, total=False):
    """The last epoch's numbers, and the clean training error of a finished cell (all errors in %)."""

    train_loss: float
    train_err: float  # running error over the last epoch's augmented mini-batches
    test_loss: float
    test_err: float
    val_loss: float
    val_err: float
    clean_train_loss: float  # eval mode, whole un-augmented training set; absent when diverged
    clean_train_err: float


class Summary(TypedDict, total=False):
    """summary.json: what `train` writes when a cell ends and `report` reads (Cell.to_dict() plus these)."""

    id: str
    arch: str
    depth: int
    seed: int
    shortcut: str
    train: dict[str, Any]
    data: dict[str, Any]
    tags: dict[str, Any]
    fingerprint: str
    status: str  # "finished" | "diverged"
    params: int
    macs: int
    epochs: int
    iterations: int
    train_seconds: float  # the training loop, without evaluation and (since compile_seconds) without compilation
    images_per_second: float
    device: str
    device_name: str
    cpu_threads: int  # torch's intra-op threads of the run that finished the cell: on a CPU, part of what fixes the rounding
    finished_at: str
    final: FinalErrors
    warmup_ended_at: Optional[int]  # the iteration at which a warm-up (warmup_lr) ended; None without one
    # how it ran (absent from summaries written before these were recorded); none of it changes what the cell means
    compile_requested: str  # runtime.compile as configured: auto | none | default | reduce-overhead | max-autotune
    compile_mode: str  # what that resolved to on this device
    compile_backend: str  # torch.compile's backend (inductor)
    execution: str  # compiled | eager (as asked) | eager-fallback (the compiler failed: see fallback_reason)
    fallback_reason: Optional[str]
    compile_seconds: float  # the first compiled steps of every process that trained the cell, apart from train_seconds
    deterministic: bool  # runtime.deterministic: deterministic kernels, no cuDNN autotuning
    cudnn_benchmark: bool  # cuDNN autotuned its convolutions (GPU only)
    conv_tf32: bool  # fp32 convolutions ran in TF32 (GPU only)
    float32_matmul_precision: str  # torch.get_float32_matmul_precision(): highest = fp32, high = TF32 on a GPU
    precision: str  # fp32 | bf16 (autocast): train.precision as it ran on this device (auto resolved)
    memory_format: str  # nchw | channels_last: runtime.channels_last as it ran (auto resolved)


@dataclass(frozen=True)
class Damage:
    """A cell file that does not read back whole, and how."""

    file: Path
    reason: str  # e.g. "metrics.csv has 1 of the 2 epochs that summary.json reports"


class _Unreadable(Exception):
    """Raised inside CellFolder.damage by the first file that fails its check."""

    def __init__(self, file: Path, reason: str):
        super().__init__(reason)
        self.damage = Damage(file, reason)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, summary.json)."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise _Unreadable(path, f"{path.name} is empty or not a JSON object")
    return value


def _metric_epochs(path: Path) -> int:
    """The number of epochs in a metrics.csv whose header and rows are whole, numbered 1, 2, …"""
    try:
        text = path.read_text()
        header, *rows = list(csv.reader(io.StringIO(text))) or [[]]
    except (UnicodeDecodeError, csv.Error):
        raise _Unreadable(path, f"{path.name} is not readable text") from None
    if text and not text.endswith("\n"):  # every row the trainer writes ends with a newline: a cut inside the last value
        raise _Unreadable(path, f"{path.name} is truncated (a row is cut short)")
    if not set(PLOTTED_COLUMNS) <= set(header):
        raise _Unreadable(path, f"{path.name} is empty or lacks its header")
    if any(len(row) != len(header) for row in rows):
        raise _Unreadable(path, f"{path.name} is truncated (a row is cut short)")
    epoch = header.index("epoch")
    if [row[epoch] for row in rows] != [str(e) for e in range(1, len(rows) + 1)]:
        raise _Unreadable(path, f"{path.name} does not number its epochs 1, 2, …")
    return len(rows)


@dataclass(frozen=True)
class CellFolder:
    """The files of one cell."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def done(self) -> Path:
        return self.path / "DONE"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def dynamics(self) -> Path:
        return self.path / "dynamics.csv"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def weights(self) -> Path:
        return self.path / "model.pt"

    @property
    def error_log(self) -> Path:
        return self.path / "error.txt"

    def read_summary(self) -> Summary:
        return files.read_json(self.summary)

    def read_config(self) -> dict[str, Any]:
        return files.read_json(self.config) if self.config.is_file() else {}

    def mark_done(self, fingerprint: str) -> None:
        """The last write of a finished cell: from here on it is never trained again."""
        files.write_text(self.done, fingerprint + "\n")

    def done_fingerprint(self) -> Optional[str]:
        return self.done.read_text().strip() if self.done.is_file() else None

    def damage(self) -> Optional[Damage]:
        """The first file that does not read back whole, or None.

        An ended cell needs a fingerprint in DONE, a summary with SUMMARY_KEYS and a metrics.csv with
        exactly the summary's epochs (else its curve and its table row would disagree). Without torch
        a checkpoint is only checked for being empty; the sweep loads it to be sure.
        """
        try:
            if self.config.is_file():
                _json_object(self.config)
            epochs = _metric_epochs(self.metrics) if self.metrics.is_file() else None
            if self.checkpoint.is_file() and self.checkpoint.stat().st_size == 0:
                raise _Unreadable(self.checkpoint, f"{self.checkpoint.name} is empty")
            if self.done.is_file():
                self._check_ended(epochs)
        except _Unreadable as err:
            return err.damage
        return None

    def _check_ended(self, metric_epochs: Optional[int]) -> None:
        """An ended cell's DONE, summary and metrics agree (metric_epochs: None when metrics.csv is missing)."""
        if not self.done_fingerprint():
            raise _Unreadable(self.done, f"{self.done.name} is empty")
        if not self.summary.is_file():
            raise _Unreadable(self.summary, f"{self.summary.name} is missing")
        summary = _json_object(self.summary)
        lacking = [key for key in SUMMARY_KEYS if key not in summary]
        if lacking or not isinstance(summary["final"], dict) or not isinstance(summary["epochs"], int):
            raise _Unreadable(self.summary, f"{self.summary.name} lacks {', '.join(lacking) or 'a valid final or epochs'}")
        if metric_epochs is None:
            raise _Unreadable(self.metrics, f"{self.metrics.name} is missing")
        if metric_epochs != summary["epochs"]:
            raise _Unreadable(self.metrics, f"{self.metrics.name} has {metric_epochs} of the {summary['epochs']} epochs "
                                            f"that {self.summary.name} reports")

    def state(self, fingerprint: Optional[str] = None) -> CellState:
        """This cell's state; with `fingerprint`, results made under any other configuration are STALE."""
        if self.damage() is not None:
            return CellState.DAMAGED
        done = self.done_fingerprint()
        if done is not None:
            if fingerprint is not None and done != fingerprint:
                return CellState.STALE
            status = self.read_summary().get("status") if self.summary.is_file() else None
            return CellState.DIVERGED if status == CellState.DIVERGED.value else CellState.FINISHED
        if self.checkpoint.is_file() and fingerprint is not None and self.read_config().get("fingerprint") != fingerprint:
            return CellState.STALE
        if self.error_log.is_file() and (not self.metrics.is_file() or self.error_log.stat().st_mtime >= self.metrics.stat().st_mtime):
            return CellState.FAILED
        if self.config.is_file() or self.metrics.is_file() or self.checkpoint.is_file():
            return CellState.PARTIAL  # config.json is written when training starts
        return CellState.PENDING


@dataclass(frozen=True)
class ResultsFolder:
    """A sweep's results folder."""

    path: Path

    @property
    def cells_dir(self) -> Path:
        return self.path / "cells"

    @property
    def superseded_dir(self) -> Path:
        return self.path / "superseded"

    @property
    def damaged_dir(self) -> Path:
        return self.path / "damaged"

    @property
    def sweep_file(self) -> Path:
        return self.path / "sweep.yaml"

    @property
    def environment(self) -> Path:
        return self.path / "environment.json"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def report_csv(self) -> Path:
        return self.path / "report.csv"

    @property
    def figure(self) -> Path:
        return self.path / "figure6.png"

    @property
    def dynamics_figure(self) -> Path:
        return self.path / "dynamics.png"

    @property
    def verdict_figure(self) -> Path:
        return self.path / "verdict.png"

    @property
    def verdict_looks(self) -> Path:
        """One JSON line per seed set the verdict judged here: a later superset of one is a later look."""
        return self.path / "verdict_looks.jsonl"

    def cell(self, cell_id: str) -> CellFolder:
        return CellFolder(self.cells_dir / cell_id)

    def cells_on_disk(self) -> list[CellFolder]:
        """Every cell folder present, by name."""
        if not self.cells_dir.is_dir():
            return []
        return [CellFolder(p) for p in sorted(self.cells_dir.iterdir()) if p.is_dir()]

    def supersede(self, cell_id: str) -> Path:
        """Move a cell's folder aside (results are never deleted) and return where it went."""
        target = self.superseded_dir / f"{cell_id}-{_stamp()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.cell(cell_id).path), target)
        return target

    def set_aside(self, label: str, paths: Iterable[Path]) -> Path:
        """Move damaged files or folders into a new damaged/<label>-<time>/ (results are never deleted); return it."""
        stamp = _stamp()
        target = self.damaged_dir / f"{label}-{stamp}"
        for n in itertools.count(2):  # the same cell twice in one second (a repair, then a crash, then a repair)
            if not target.exists():
                break
            target = self.damaged_dir / f"{label}-{stamp}-{n}"
        target.mkdir(parents=True)
        for path in paths:
            shutil.move(str(path), target / path.name)
        return target


def _stamp() -> str:
    """The time in the names of folders moved aside, in UTC."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def latest_results(root: Path = Path("results")) -> Optional[Path]:
    """The results folder under `root` whose cells changed last, or None when there is none."""
    sweeps = [ResultsFolder(p) for p in root.glob("*/")] if root.is_dir() else []
    sweeps = [s for s in sweeps if s.cells_dir.is_dir()]
    return max(sweeps, key=lambda s: s.cells_dir.stat().st_mtime).path if sweeps else None
