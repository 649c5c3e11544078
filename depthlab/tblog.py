"""TensorBoard logs of a sweep, one run per cell, from the events the sweep already reports to its display.

Optional: it needs the `tensorboard` package (`pip install -e '.[tensorboard]'`). The training loop
knows nothing of it: `TensorBoardEvents` wraps the display, passes every event on, and writes each
finished epoch's numbers (losses, errors, lr, and any other number the epoch's row carries) to
`<results>/tensorboard/<cell id>/`, with the iteration as the step (Figure 6's x-axis). When a cell
ends, its clean training error and the training dynamics of its epochs (dynamics.csv: gradient norms,
branch ratios) follow. A cell resumed after an interruption logs the epochs trained in this run;
earlier ones were logged by the run that trained them, into the same folder.
"""

from __future__ import annotations

import csv
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Optional

from . import install_command
from .config import ConfigError, SweepConfig
from .results_folder import ResultsFolder

TENSORBOARD_INSTALL = install_command("tensorboard")
STEP_KEYS = ("epoch", "iteration")  # the row's position, not a number to plot


def summary_writer_class() -> type:
    """torch's SummaryWriter; a ConfigError with the install command when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("runtime.tensorboard", "", f"needs the tensorboard package, which is not installed: {TENSORBOARD_INSTALL}") from None
    return SummaryWriter


class TensorBoardEvents:
    """A sweep's events passed on to `display`, with every epoch also written to its cell's TensorBoard run."""

    def __init__(self, display: Any, out_dir: Path):
        self.display = display
        self.results = ResultsFolder(Path(out_dir))
        self.folder = self.results.tensorboard_dir
        self.writer_class = summary_writer_class()
        self.writers: dict[str, Any] = {}
        self.iterations: dict[str, dict[int, int]] = {}  # per cell: the iteration at the end of each epoch logged in this run

    def __getattr__(self, name: str) -> Any:  # sweep_started, repaired, epoch_progress, … go to the display unchanged
        return getattr(self.display, name)

    def __enter__(self) -> "TensorBoardEvents":
        return self

    def __exit__(self, *exc: Any) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()

    def _writer(self, cell_id: str) -> Any:
        if cell_id not in self.writers:
            self.writers[cell_id] = self.writer_class(log_dir=str(self.folder / cell_id))
        return self.writers[cell_id]

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.display.epoch_done(cell_id, row)
        writer = self._writer(cell_id)
        self.iterations.setdefault(cell_id, {})[row["epoch"]] = row["iteration"]
        for key, value in row.items():
            if key not in STEP_KEYS and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key, value, global_step=row["iteration"])
        writer.flush()

    def _log_dynamics(self, cell_id: str) -> None:
        """The cell's dynamics.csv columns (grad_norm/…, branch_ratio/…) for the epochs this run trained."""
        steps = self.iterations.get(cell_id, {})
        for record in _dynamics_rows(self.results.cell(cell_id).dynamics):
            try:
                step = steps[int(record.pop("epoch"))]
            except (KeyError, TypeError, ValueError):  # an epoch an earlier run trained, or an unreadable one
                continue
            for key, text in record.items():
                try:
                    value = float(text)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    self._writer(cell_id).add_scalar(key, value, global_step=step)

    def cell_ended(self, cell_id: str, summary: Optional[dict], error: Optional[str]) -> None:
        self.display.cell_ended(cell_id, summary, error)
        clean = (summary or {}).get("final", {}).get("clean_train_err")
        if clean is not None:  # what the verdict decides on, known only once the cell has ended
            self._writer(cell_id).add_scalar("clean_train_err", clean, global_step=summary["iterations"])
        if summary is not None:
            self._log_dynamics(cell_id)
        self.iterations.pop(cell_id, None)
        writer = self.writers.pop(cell_id, None)
        if writer is not None:
            writer.close()


def events_for(display: Any, config: SweepConfig, out_dir: Path) -> ContextManager[Any]:
    """The display itself, or with runtime.tensorboard the display with TensorBoard logging added."""
    return TensorBoardEvents(display, out_dir) if config.runtime.tensorboard else nullcontext(display)


def _dynamics_rows(path: Path) -> list[dict[str, Any]]:
    """dynamics.csv's rows, or none when it is absent or does not read back (it is optional)."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
