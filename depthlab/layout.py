"""The results folder: its file names, a cell's state, and the summary's schema — the one place they live.

    results/<name>/
        sweep.yaml          the config as run (every cell spelled out)
        environment.json    versions, device and git commit of the latest run
        .lock               held while a sweep, or any of its workers, runs in this folder
        report.md, report.csv, figure6.png
        cells/<id>/
            config.json     what defines the cell, its fingerprint and its run length
            metrics.csv     one row per epoch (METRIC_COLUMNS)
            checkpoint.pt   while unfinished: weights, optimizer and loop state after the last epoch
            error.txt       the traceback of the last attempt that crashed
            summary.json    the final numbers (Summary)
            model.pt        the trained weights
            DONE            the fingerprint, written last: the cell is finished
        superseded/<id>-<time>/   cells moved aside by `sweep --force`

sweep, train, plan and report all go through this module; none of them spells a file name.
It needs neither torch nor pandas.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Optional, TypedDict

from . import files

METRIC_COLUMNS = ("epoch", "iteration", "lr", "train_loss", "train_err", "test_loss", "test_err", "val_loss", "val_err", "seconds")


class CellState(str, Enum):
    """Where a cell stands, in the words every command uses."""

    PENDING = "pending"  # nothing trained yet
    PARTIAL = "partial"  # some epochs trained (running now, or interrupted): the sweep resumes it
    FAILED = "failed"  # the last attempt crashed (error.txt is newer than the last epoch): the sweep retries it
    FINISHED = "finished"
    DIVERGED = "diverged"  # finished early with a non-finite loss: a result, recorded as such
    STALE = "stale"  # results (or a checkpoint) under another configuration: the sweep refuses or supersedes

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

    def state(self, fingerprint: Optional[str] = None) -> CellState:
        """This cell's state; with `fingerprint`, results made under any other configuration are STALE."""
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

    def cell(self, cell_id: str) -> CellFolder:
        return CellFolder(self.cells_dir / cell_id)

    def cells_on_disk(self) -> list[CellFolder]:
        """Every cell folder present, by name."""
        if not self.cells_dir.is_dir():
            return []
        return [CellFolder(p) for p in sorted(self.cells_dir.iterdir()) if p.is_dir()]

    def supersede(self, cell_id: str) -> Path:
        """Move a cell's folder aside (results are never deleted) and return where it went."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.superseded_dir / f"{cell_id}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.cell(cell_id).path), target)
        return target


def latest_results(root: Path = Path("results")) -> Optional[Path]:
    """The results folder under `root` whose cells changed last, or None when there is none."""
    sweeps = [ResultsFolder(p) for p in root.glob("*/")] if root.is_dir() else []
    sweeps = [s for s in sweeps if s.cells_dir.is_dir()]
    return max(sweeps, key=lambda s: s.cells_dir.stat().st_mtime).path if sweeps else None
