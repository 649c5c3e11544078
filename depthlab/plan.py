"""What a sweep will run: its cells, their size, and the compute they need."""

from __future__ import annotations

from pathlib import Path

from .config import Cell, DataSpec, SweepConfig
from .models import model_size
from .sweep import cell_status

CIFAR10_TRAIN_IMAGES = 50_000
SYNTHETIC_TRAIN_IMAGES = 1_000


def expected_train_images(data: DataSpec) -> int:
    """Training images the sweep will see, without loading them (folder datasets: CIFAR's size assumed)."""
    default = SYNTHETIC_TRAIN_IMAGES if data.source == "synthetic" else CIFAR10_TRAIN_IMAGES
    return (data.train_size or default) - data.val_split


def cell_iterations(cell: Cell, n_train: int) -> int:
    spec = cell.train
    return spec.iterations if spec.iterations is not None else spec.epochs * (n_train // spec.batch_size)


def plan_cells(config: SweepConfig, out_dir: Path) -> list[dict]:
    """One row per cell: model size, forward MACs per image, training compute and current status."""
    n_train = expected_train_images(config.data)
    rows = []
    for cell in config.cells:
        params, macs = model_size(cell.arch, cell.depth, cell.shortcut)
        iterations = cell_iterations(cell, n_train)
        images = iterations * cell.train.batch_size
        rows.append({"id": cell.id, "arch": cell.arch, "depth": cell.depth, "seed": cell.seed, "shortcut": cell.shortcut,
                     "params": params, "macs": macs, "iterations": iterations, "epochs": images / n_train,
                     "train_flops": 3 * 2 * macs * images,  # forward + backward ≈ 3 forwards, 2 FLOPs per MAC
                     "status": cell_status(out_dir, cell)})
    return rows
