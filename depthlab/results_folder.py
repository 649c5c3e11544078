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

sweep, train, plan and report all go through this module; none of them spells a file name, and all of them
read a cell folder with `read_cell`. It needs neither torch nor pandas.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Optional, TypedDict

from . import files

# the file names, each spelled once
CELLS_DIR, SUPERSEDED_DIR, DAMAGED_DIR, TENSORBOARD_DIR = "cells", "superseded", "damaged", "tensorboard"
SWEEP_FILE, ENVIRONMENT, LOCK = "sweep.yaml", "environment.json", ".lock"
REPORT_MD, REPORT_CSV, CELLS_TABLE, CURVES_TABLE = "report.md", "report.csv", "cells.csv", "curves.csv"
FIGURE, DYNAMICS_FIGURE, VERDICT_FIGURE, VERDICT_LOOKS = "figure6.png", "dynamics.png", "verdict.png", "verdict_looks.jsonl"
CONFIG, METRICS, DYNAMICS, CHECKPOINT = "config.json", "metrics.csv", "dynamics.csv", "checkpoint.pt"
ERROR_LOG, SUMMARY, WEIGHTS, DONE = "error.txt", "summary.json", "model.pt", "DONE"

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
    DAMAGED = "damaged"  # a file does not read back whole (CellRecord.damage): the sweep moves it aside and trains again

    @property
    def ended(self) -> bool:
        """Finished or diverged: the sweep will not train it again."""
        return self in (CellState.FINISHED, CellState.DIVERGED)

    @property
    def report_status(self) -> str:
        """The report's older word for it (`missing[].status`): 'not started' and 'running' for pending and partial."""
        return {CellState.PENDING: "not started", CellState.PARTIAL: "running"}.get(self, self.value)

    @property
    def plan_status(self) -> str:
        """plan's older word for it (its `status` column): finished (ended), partial (or failed), stale, damaged or pending."""
        if self.ended:
            return "finished"
        return {CellState.FAILED: "partial", CellState.PARTIAL: "partial"}.get(self, self.value)


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
    """summary.json: what `train` writes when a cell ends and `report` reads (Cell.to_record() plus these)."""

    id: str
    arch: str
    depth: int
    seed: int
    shortcut: str
    variant: str  # '' for the 2015 net (absent from summaries written before it was recorded: see cell_identity)
    net_spec: dict[str, Any]  # the NetSpec fields of the net trained (absent before it was recorded)
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
    # compiled | eager (as asked, or dynamo ran every step in Python) | eager-fallback (the compiler failed: see
    # fallback_reason) | compiled-without-cudagraphs (asked for CUDA graphs; skipped or failed, see the reasons) |
    # partly-compiled (some steps ran eagerly); derived from the counts below since they were recorded
    execution: str
    fallback_reason: Optional[str]
    compile_seconds: float  # the first compiled steps of every process that trained the cell, apart from train_seconds
    failed_compile_seconds: float  # compiles that failed, in neither compile_seconds nor train_seconds
    cudagraphs_fallback_reason: Optional[str]  # recording or replaying the CUDA graphs failed: compiled without them since
    eager_steps: int  # steps asked to compile whose forward ran eagerly
    dynamo_graphs: int  # graphs dynamo compiled for the cell (0 when it reused the graphs of an earlier seed of the net)
    dynamo_recompiles: int  # of those, compiled because a cached graph's guards failed
    recompile_reasons: list[str]
    graph_breaks: int
    cudagraph_skips: int  # graphs inductor did not capture in CUDA graphs
    cudagraph_skip_reasons: list[str]  # inductor's messages ("skipping cudagraphs due to …")
    deterministic: bool  # runtime.deterministic: deterministic kernels, no cuDNN autotuning
    cudnn_benchmark: bool  # cuDNN autotuned its convolutions (GPU only)
    conv_tf32: bool  # fp32 convolutions ran in TF32 (GPU only)
    float32_matmul_precision: str  # torch.get_float32_matmul_precision(): highest = fp32, high = TF32 on a GPU
    precision: str  # fp32 | bf16 (autocast): train.precision as it ran on this device (auto resolved)
    memory_format: str  # nchw | channels_last: runtime.channels_last as it ran (auto resolved)
    group_size: int  # nets in the grouped model that ended the cell (runtime.group_seeds), itself included; 1: trained alone


@dataclass(frozen=True)
class Damage:
    """A cell file that does not read back whole, and how."""

    file: Path
    reason: str  # e.g. "metrics.csv has 1 of the 2 epochs that summary.json reports"


class _Unreadable(Exception):
    """Raised inside read_cell by the first file that fails its check."""

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


def _number(text: str) -> Any:
    """A metrics.csv value as pandas.read_csv would read it: an int, a float (NaN when empty), or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return float("nan") if text == "" else text


def _metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv whose header and rows are whole, numbered 1, 2, …"""
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
    return [{key: _number(value) for key, value in zip(header, row)} for row in rows]


def _inside(name: str, doc: Optional[str] = None) -> property:
    """A folder's file (or subfolder) `name`, as a read-only attribute."""
    return property(lambda self: self.path / name, doc=doc)


@dataclass(frozen=True)
class CellFolder:
    """The files of one cell."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    done = _inside(DONE)
    summary = _inside(SUMMARY)
    metrics = _inside(METRICS)
    checkpoint = _inside(CHECKPOINT)
    dynamics = _inside(DYNAMICS)
    config = _inside(CONFIG)
    weights = _inside(WEIGHTS)
    error_log = _inside(ERROR_LOG)

    def mark_done(self, fingerprint: str) -> None:
        """The last write of a finished cell: from here on it is never trained again."""
        files.write_text(self.done, fingerprint + "\n")

    def done_fingerprint(self) -> Optional[str]:
        return self.done.read_text().strip() if self.done.is_file() else None


@dataclass(frozen=True)
class CellRecord:
    """What one cell folder says, read once: its state, and the files behind it that read back whole."""

    id: str
    state: CellState
    summary: Optional[Summary] = None  # an ended cell's summary.json
    config: dict[str, Any] = field(default_factory=dict)  # config.json ({} before training starts)
    metrics: Optional[list[dict[str, Any]]] = None  # metrics.csv's rows, one per epoch; None when there is none
    damage: Optional[Damage] = None  # why a DAMAGED cell's files cannot be trusted


def read_cell(folder: CellFolder, fingerprint: Optional[str] = None) -> CellRecord:
    """The one reader of a cell folder; with `fingerprint`, results made under any other configuration are STALE.

    A file that does not read back whole makes the cell DAMAGED: an ended cell needs a fingerprint in DONE, a summary
    with SUMMARY_KEYS and a metrics.csv with exactly the summary's epochs (else its curve and its table row would
    disagree). Without torch a checkpoint is only checked for being empty; the sweep loads it to be sure.
    """
    try:
        config = _json_object(folder.config) if folder.config.is_file() else {}
        metrics = _metric_rows(folder.metrics) if folder.metrics.is_file() else None
        if folder.checkpoint.is_file() and folder.checkpoint.stat().st_size == 0:
            raise _Unreadable(folder.checkpoint, f"{CHECKPOINT} is empty")
        summary = _ended_summary(folder, metrics) if folder.done.is_file() else None
    except _Unreadable as err:
        return CellRecord(folder.id, CellState.DAMAGED, damage=err.damage)
    return CellRecord(folder.id, _state(folder, fingerprint, config, summary), summary, config, metrics)


def _ended_summary(folder: CellFolder, metrics: Optional[list[dict[str, Any]]]) -> Summary:
    """An ended cell's summary, once its DONE, summary and metrics agree."""
    if not folder.done_fingerprint():
        raise _Unreadable(folder.done, f"{DONE} is empty")
    if not folder.summary.is_file():
        raise _Unreadable(folder.summary, f"{SUMMARY} is missing")
    summary = _json_object(folder.summary)
    lacking = [key for key in SUMMARY_KEYS if key not in summary]
    if lacking or not isinstance(summary["final"], dict) or not isinstance(summary["epochs"], int):
        raise _Unreadable(folder.summary, f"{SUMMARY} lacks {', '.join(lacking) or 'a valid final or epochs'}")
    if metrics is None:
        raise _Unreadable(folder.metrics, f"{METRICS} is missing")
    if len(metrics) != summary["epochs"]:
        raise _Unreadable(folder.metrics, f"{METRICS} has {len(metrics)} of the {summary['epochs']} epochs that {SUMMARY} reports")
    return Summary(**summary)


def _state(folder: CellFolder, fingerprint: Optional[str], config: dict[str, Any], summary: Optional[Summary]) -> CellState:
    """The state of a cell whose files read back whole."""
    if summary is not None:
        if fingerprint is not None and folder.done_fingerprint() != fingerprint:
            return CellState.STALE
        return CellState.DIVERGED if summary.get("status") == CellState.DIVERGED.value else CellState.FINISHED
    if folder.checkpoint.is_file() and fingerprint is not None and config.get("fingerprint") != fingerprint:
        return CellState.STALE
    if folder.error_log.is_file() and (not folder.metrics.is_file() or folder.error_log.stat().st_mtime >= folder.metrics.stat().st_mtime):
        return CellState.FAILED
    if folder.config.is_file() or folder.metrics.is_file() or folder.checkpoint.is_file():
        return CellState.PARTIAL  # config.json is written when training starts
    return CellState.PENDING


_BASE_ID = re.compile(r"^(?P<arch>[a-z]+)-(?P<depth>\d+)-s(?P<seed>\d+)$")  # an id without a variant


def cell_identity(cell_id: str, described: dict[str, Any]) -> dict[str, Any]:
    """id, arch, depth, seed, shortcut and variant of a cell, from the fields that describe it (its summary.json,
    config.json or sweep.yaml cell). The id is read only for folders written before the variant was recorded: the
    variant is then the id less arch, depth and seed; a folder with no fields at all is read as arch-depth-sSEED."""
    if not described and (match := _BASE_ID.match(cell_id)):
        described = {"arch": match["arch"], "depth": int(match["depth"]), "seed": int(match["seed"])}
    keys = {k: described.get(k) for k in ("arch", "depth", "seed", "shortcut")}
    variant = described.get("variant")
    if variant is None:
        head, tail = f"{keys['arch']}-{keys['depth']}", f"s{keys['seed']}"
        variant = cell_id[len(head):-len(tail)].strip("-") if cell_id.startswith(head) and cell_id.endswith(tail) else ""
    return {"id": cell_id, **keys, "variant": variant}


@dataclass(frozen=True)
class ResultsFolder:
    """A sweep's results folder."""

    path: Path

    cells_dir = _inside(CELLS_DIR)
    superseded_dir = _inside(SUPERSEDED_DIR)
    damaged_dir = _inside(DAMAGED_DIR)
    sweep_file = _inside(SWEEP_FILE)
    environment = _inside(ENVIRONMENT)
    lock = _inside(LOCK)
    report_md = _inside(REPORT_MD)
    report_csv = _inside(REPORT_CSV)
    figure = _inside(FIGURE)
    dynamics_figure = _inside(DYNAMICS_FIGURE)
    verdict_figure = _inside(VERDICT_FIGURE)
    verdict_looks = _inside(VERDICT_LOOKS, 'One JSON line per seed set the verdict judged here: a later superset of one is a later look.')
    cells_table = _inside(CELLS_TABLE, 'One row per cell (results.load_results).')
    curves_table = _inside(CURVES_TABLE, 'One row per epoch of every cell (results.load_results).')
    tensorboard_dir = _inside(TENSORBOARD_DIR, 'One TensorBoard run per cell, in <cell id>/ (runtime.tensorboard).')
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
