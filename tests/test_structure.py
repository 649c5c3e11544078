"""The code's layering: each concept lives in one module, and the report stands without the training stack."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import depthlab.bench as bench_module
import depthlab.train as train_module
from depthlab.bench import BenchOptions, run_bench
from depthlab.config import parse_config
from depthlab.data import synthetic_images
from depthlab.train import build_training_setup, train_cell

from .conftest import tiny_sweep

PACKAGE = Path(train_module.__file__).parent
# "cells" is left out: it is also a key of the sweep file, a different thing with the same name.
RESULT_FILE_NAMES = ("DONE", "summary.json", "metrics.csv", "checkpoint.pt", "config.json", "model.pt", "error.txt", ".lock",
                     "superseded", "sweep.yaml", "environment.json", "report.md", "report.csv", "figure6.png",
                     "cells.csv", "curves.csv")


def string_constants(path: Path) -> set[str]:
    """Every string literal of a module, docstrings included (they are not file-name uses, but they are rare and harmless)."""
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_each_results_file_name_is_spelled_in_the_results_folder_module_only() -> None:
    spelled = {name: sorted(p.name for p in PACKAGE.glob("*.py") if name in string_constants(p)) for name in RESULT_FILE_NAMES}
    assert spelled == {name: ["results_folder.py"] for name in RESULT_FILE_NAMES}


@pytest.mark.parametrize("module", ["depthlab.report", "depthlab.results_folder", "depthlab.config"])
def test_reading_results_needs_neither_torch_nor_the_trainer(module: str) -> None:
    """The report runs where torch is missing: importing it with torch blocked works and loads no training module."""
    code = (f"import sys; sys.modules['torch'] = None; import {module}; "
            "loaded = [m for m in ('depthlab.train', 'depthlab.sweep', 'depthlab.models', 'depthlab.data') if m in sys.modules]; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_module_below_the_sweep_imports_it() -> None:
    below = ["options", "errors", "results_folder", "files", "config", "data", "models", "dynamics", "train"]
    for name in below:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert "sweep" not in imported and "report" not in imported, name


def test_the_code_map_lists_every_module_after_the_modules_it_imports() -> None:
    guide = (PACKAGE.parent / "docs" / "guide.md").read_text().split("## Code map", 1)[1]
    listed = [name for line in guide.splitlines() if line.startswith("| `")
              for name in (cell.strip(" `").removesuffix(".py") for cell in line.split("|")[1].split(","))]
    assert sorted(listed) == sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    for position, name in enumerate(listed):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
        imported = {module for node in relative for module in ([node.module] if node.module else [a.name for a in node.names])}
        imported &= set(listed)  # `from . import __version__` names the package, not a module
        assert imported <= set(listed[:position]), (name, sorted(imported - set(listed[:position])))


def test_bench_times_the_step_that_the_sweep_trains(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both go through build_training_setup, and for the same cell it builds the same model, optimizer and memory format."""
    built = []
    real = train_module.build_training_setup

    def spy(cell, device, runtime, *backend):
        setup = real(cell, device, runtime, *backend)
        built.append((cell, setup))
        return setup

    monkeypatch.setattr(train_module, "build_training_setup", spy)
    monkeypatch.setattr(bench_module, "build_training_setup", spy)
    options = BenchOptions(arch="plain", depth=8, batch_size=32, steps=1, warmup=0, jobs=1, device="cpu", baseline=False)
    run_bench(options)
    config = parse_config(tiny_sweep(train={"epochs": 1, "batch_size": 32}, grid={"arch": "plain", "depth": 8, "seed": 0}))
    train_cell(config.cells[0], synthetic_images(64, 32), torch.device("cpu"), config.runtime, tmp_path)

    (bench_cell, bench_setup), (sweep_cell, sweep_setup) = built
    assert (bench_cell.arch, bench_cell.depth, bench_cell.shortcut) == (sweep_cell.arch, sweep_cell.depth, sweep_cell.shortcut)
    assert dataclasses.asdict(bench_cell.train) == {**dataclasses.asdict(sweep_cell.train), "epochs": None, "iterations": 64000,
                                                      "milestones": None}
    fresh_bench = build_training_setup(bench_cell, torch.device("cpu"), options.runtime())
    fresh_sweep = build_training_setup(sweep_cell, torch.device("cpu"), config.runtime)
    assert type(fresh_bench.optimizer) is type(fresh_sweep.optimizer)
    assert fresh_bench.optimizer.defaults == fresh_sweep.optimizer.defaults
    assert fresh_bench.memory_format == fresh_sweep.memory_format
    bench_weights, sweep_weights = fresh_bench.model.state_dict(), fresh_sweep.model.state_dict()
    assert bench_weights.keys() == sweep_weights.keys()
    assert all(torch.equal(bench_weights[k], sweep_weights[k]) for k in bench_weights)  # same seed, same initial weights


def test_the_sweep_file_as_run_spells_out_every_cell_and_reads_back_to_the_same_cells() -> None:
    raw = tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8, 14], "seed": [0, 1], "lr": [0.1, 0.05]},
                     cells=[{"arch": "residual", "depth": 20, "seed": 0, "warmup_lr": 0.01, "iterations": 10}])
    config = parse_config(raw)
    again = parse_config(yaml.safe_load(yaml.safe_dump(config.to_document(), sort_keys=False)))
    assert again.cells == config.cells
    assert [c.id for c in again.cells] == [c.id for c in config.cells]
    assert [c.fingerprint() for c in again.cells] == [c.fingerprint() for c in config.cells]


def test_a_cell_knows_its_length_from_its_recipe_alone() -> None:
    by_epochs = parse_config(tiny_sweep(train={"epochs": 3, "batch_size": 64})).cells[0].train.run_length(1000)
    assert (by_epochs.iterations_per_epoch, by_epochs.iterations, by_epochs.epochs) == (15, 45, 3)
    by_iterations = parse_config(tiny_sweep(train={"iterations": 40, "batch_size": 64})).cells[0].train.run_length(1000)
    assert (by_iterations.iterations, by_iterations.epochs) == (40, 3)  # 15 + 15 + a partial epoch of 10
