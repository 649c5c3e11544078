"""What the user sees while a sweep runs: live bars on a terminal, one plain line per event in a log.

The sweep engine only emits events (`sweep.SweepEvents`); the CLI picks one of these displays.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .sweep import Repair, SweepStart

LOG_PROGRESS_SECONDS = 60.0  # a choice: a log line per cell per minute inside long epochs, not one per step


def start_line(start: SweepStart) -> str:
    """'cifar: 9 cell(s) to train on … (cuda), 4 at a time; 0 already finished; results in …'."""
    return (f"[bold]{escape(start.name)}[/bold]: {start.to_train} cell(s) to train on {escape(start.device_name)} ({start.device}), "
            f"{start.jobs} at a time; {start.finished} already finished; results in {escape(str(start.out_dir))}")


def resumed_text(done_epochs: int) -> str:
    """' (resuming after epoch 3)', or nothing for a cell that starts from scratch."""
    return f" (resuming after epoch {done_epochs})" if done_epochs else ""


def repaired_line(repair: Repair) -> str:
    """'! plain-8-s0: metrics.csv is truncated (…); moved to …/damaged/plain-8-s0-…, training it again from scratch'."""
    return (f"[yellow]! {escape(repair.item)}: {escape(repair.damage)}; moved to {escape(str(repair.moved_to))}, "
            f"{escape(repair.action)}[/yellow]")


def ended_line(cell_id: str, summary: Optional[dict], error: Optional[str]) -> str:
    """One line for a cell that ended: its errors, its divergence, or its failure."""
    if error:
        return f"[red]✗ {cell_id} failed: {escape(error)}[/red]"
    assert summary is not None
    final = summary["final"]
    if summary["status"] == "diverged":
        return f"[yellow]! {cell_id} diverged after {summary['epochs']} epochs (recorded; the sweep goes on)[/yellow]"
    return (f"[green]✓[/green] {cell_id}: train err {final['train_err']:.2f}% (clean {final['clean_train_err']:.2f}%), "
            f"test err {final['test_err']:.2f}% in {summary['train_seconds']:.0f}s")


class RichDisplay:
    """A bar for the whole sweep and one per running cell, with live loss and error."""

    def __init__(self, console: Console):
        self.console = console
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.overall: Optional[int] = None
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def sweep_started(self, start: SweepStart) -> None:
        self.console.print(start_line(start))
        self.overall = self.bars.add_task("[bold]cells", total=start.total, completed=start.finished)
        self.bars.start()

    def repaired(self, repair: Repair) -> None:
        self.bars.console.print(repaired_line(repair))

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.tasks[cell_id] = self.bars.add_task(f"  {cell_id}{resumed_text(done_epochs)}", total=total_epochs, completed=done_epochs)

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        self.bars.update(self.tasks[cell_id], completed=epoch - 1 + min(1.0, iterations / per_epoch))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        text = f"  {cell_id}  loss {row['train_loss']:.3f}  train {row['train_err']:.2f}%  test {row['test_err']:.2f}%"
        self.bars.update(self.tasks[cell_id], completed=row["epoch"], description=text)

    def cell_ended(self, cell_id: str, summary: Optional[dict], error: Optional[str]) -> None:
        if cell_id in self.tasks:
            self.bars.remove_task(self.tasks.pop(cell_id))
        self.bars.console.print(ended_line(cell_id, summary, error))
        if self.overall is not None:
            self.bars.advance(self.overall)


class LogDisplay:
    """Plain log lines, for logs and pipes where a live display would be noise."""

    def __init__(self, console: Console):
        self.console = console
        self.total = self.done = 0
        self.epochs: dict[str, int] = {}
        self.last_progress: dict[str, float] = {}  # when each cell's last progress line was printed

    def __enter__(self) -> "LogDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def sweep_started(self, start: SweepStart) -> None:
        self.total, self.done = start.total, start.finished
        self.console.print(start_line(start))

    def repaired(self, repair: Repair) -> None:
        self.console.print(repaired_line(repair))

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.epochs[cell_id] = total_epochs
        self.last_progress[cell_id] = time.monotonic()
        self.console.print(f"start {cell_id}: {total_epochs} epoch{'s' if total_epochs != 1 else ''}{resumed_text(done_epochs)}")

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        now = time.monotonic()
        if now - self.last_progress.get(cell_id, now) >= LOG_PROGRESS_SECONDS:
            self.last_progress[cell_id] = now
            self.console.print(f"{cell_id} epoch {epoch}/{self.epochs.get(cell_id, '?')}: {iterations}/{per_epoch} iterations")

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.last_progress[cell_id] = time.monotonic()
        self.console.print(f"{cell_id} epoch {row['epoch']}/{self.epochs.get(cell_id, '?')} loss {row['train_loss']:.4f} "
                           f"train_err {row['train_err']:.2f}% test_err {row['test_err']:.2f}% ({row['seconds']:.1f}s)")

    def cell_ended(self, cell_id: str, summary: Optional[dict], error: Optional[str]) -> None:
        self.done += 1
        self.console.print(f"[{self.done}/{self.total}] {ended_line(cell_id, summary, error)}")


def display_for(console: Console) -> RichDisplay | LogDisplay:
    """Live bars on a terminal, log lines elsewhere."""
    return RichDisplay(console) if console.is_terminal else LogDisplay(console)
