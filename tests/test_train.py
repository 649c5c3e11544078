"""Training one cell: it learns, it follows the schedule, it resumes exactly, and it survives divergence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from depthlab.config import parse_config
from depthlab.data import load_images
from depthlab.results_folder import CellFolder
from depthlab.options import NetSpec
from depthlab.train import Schedule, train_cell
from depthlab import files
from depthlab import train as train_module

from .conftest import tiny_sweep

CPU = torch.device("cpu")


def one_cell(**train):
    config = parse_config(tiny_sweep(train={"epochs": 3, "milestones": [2], "batch_size": 64, **train},
                                     grid={"arch": "residual", "depth": 8, "seed": 0}))
    return config, config.cells[0], load_images(config.data)


def test_a_cell_learns_and_writes_its_metrics_summary_and_marker(tmp_path: Path) -> None:
    config, cell, images = one_cell(epochs=4, milestones=[3])
    summary = train_cell(cell, images, CPU, config.runtime, tmp_path)
    metrics = pd.read_csv(CellFolder(tmp_path).metrics)
    assert list(metrics.epoch) == [1, 2, 3, 4]
    assert list(metrics.iteration) == [4, 8, 12, 16]  # 256 images // 64 per batch
    assert metrics.train_err.iloc[-1] < 70 < 90  # chance is 90 % error on ten classes
    assert summary["status"] == "finished" and summary["params"] > 0
    assert 0 <= summary["final"]["clean_train_err"] <= 100
    assert files.read_json(CellFolder(tmp_path).summary)["fingerprint"] == cell.fingerprint()
    for written in (files.read_json(CellFolder(tmp_path).summary), files.read_json(CellFolder(tmp_path).config)):
        assert written["variant"] == "" and NetSpec(**written["net_spec"]) == cell.net_spec()  # the identity as data
    assert (CellFolder(tmp_path).done).read_text().strip() == cell.fingerprint()
    assert not (CellFolder(tmp_path).checkpoint).exists()


def test_the_lr_drops_tenfold_at_each_milestone() -> None:
    _, cell, _ = one_cell(epochs=4, milestones=[2, 3])
    schedule = Schedule.for_cell(cell.train, cell.train.run_length(10 * cell.train.batch_size))
    assert schedule.milestones == [20, 30] and schedule.total == 40
    lrs = [schedule.lr_at(i, warming_up=False) for i in (0, 19, 20, 29, 30, 39)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert schedule.lr_at(0, warming_up=True) == 0.1  # no warm-up configured


def test_an_iteration_budget_ends_inside_an_epoch(tmp_path: Path) -> None:
    config, cell, images = one_cell(epochs=None, iterations=10, milestones=[6])
    train_cell(cell, images, CPU, config.runtime, tmp_path)
    metrics = pd.read_csv(CellFolder(tmp_path).metrics)
    assert list(metrics.iteration) == [4, 8, 10]
    assert list(metrics.lr) == pytest.approx([0.1, 0.01, 0.01])


def test_warm_up_trains_at_the_low_rate_until_the_error_falls_below_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "WARMUP_CHECK_EVERY", 2)
    config, cell, images = one_cell(epochs=3, milestones=[2], batch_size=32, warmup_lr=0.01, warmup_until_err=0.0)
    train_cell(cell, images, CPU, config.runtime, tmp_path / "never")
    assert pd.read_csv(CellFolder(tmp_path / "never").metrics).lr.tolist() == pytest.approx([0.01] * 3)  # 0 % is never reached

    config, cell, images = one_cell(epochs=3, milestones=[2], batch_size=32, warmup_lr=0.01, warmup_until_err=100.0)
    train_cell(cell, images, CPU, config.runtime, tmp_path / "at-once")
    assert pd.read_csv(CellFolder(tmp_path / "at-once").metrics).lr.tolist() == pytest.approx([0.1, 0.1, 0.01])


@pytest.mark.parametrize("recipe", [{}, {"warmup_lr": 0.05, "warmup_until_err": 85.0}], ids=["plain-schedule", "warm-up-ends-after-the-resume"])
def test_an_interrupted_cell_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          recipe: dict) -> None:
    monkeypatch.setattr(train_module, "WARMUP_CHECK_EVERY", 2)
    config, cell, images = one_cell(**recipe)
    train_cell(cell, images, CPU, config.runtime, tmp_path / "straight")

    partial = train_cell(cell, images, CPU, config.runtime, tmp_path / "resumed", stop_after_epochs=1)
    assert partial["status"] == "interrupted"
    assert (CellFolder(tmp_path / "resumed").checkpoint).is_file() and not (CellFolder(tmp_path / "resumed").done).exists()
    train_cell(cell, images, CPU, config.runtime, tmp_path / "resumed")

    straight = pd.read_csv(CellFolder(tmp_path / "straight").metrics).drop(columns="seconds")
    resumed = pd.read_csv(CellFolder(tmp_path / "resumed").metrics).drop(columns="seconds")
    pd.testing.assert_frame_equal(straight, resumed)
    a = torch.load(tmp_path / "straight" / "model.pt")
    b = torch.load(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seed_gives_the_same_run_and_another_seed_another(tmp_path: Path) -> None:
    config, cell, images = one_cell(epochs=1, milestones=None)
    runs = [train_cell(cell, images, CPU, config.runtime, tmp_path / str(i))["final"] for i in range(2)]
    assert runs[0] == runs[1]
    import dataclasses

    other = dataclasses.replace(cell, seed=1)
    assert train_cell(other, images, CPU, config.runtime, tmp_path / "other")["final"] != runs[0]


def test_a_diverging_cell_is_recorded_as_diverged_and_stops(tmp_path: Path) -> None:
    config, cell, images = one_cell(epochs=3)
    cell = dataclasses.replace(cell, train=dataclasses.replace(cell.train, lr=1e12))  # beyond what a config may ask for
    summary = train_cell(cell, images, CPU, config.runtime, tmp_path)
    assert summary["status"] == "diverged"
    assert summary["epochs"] < 3 or not torch.isfinite(torch.tensor(summary["final"]["train_loss"]))
    assert (CellFolder(tmp_path).done).is_file()


def test_a_dataset_smaller_than_one_batch_is_refused(tmp_path: Path) -> None:
    config, cell, images = one_cell()
    cell = dataclasses.replace(cell, train=dataclasses.replace(cell.train, batch_size=512))  # a config refuses this before training
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_cell(cell, images, CPU, config.runtime, tmp_path)


def test_a_warm_up_that_never_reaches_its_threshold_ends_at_the_first_milestone(tmp_path: Path) -> None:
    config, cell, images = one_cell(epochs=3, milestones=[2], batch_size=32, warmup_lr=0.01, warmup_until_err=0.0)
    summary = train_cell(cell, images, CPU, config.runtime, tmp_path)
    assert summary["warmup_ended_at"] == 16  # 2 epochs of 256 // 32 iterations: the milestone, not never


def test_epochs_shorter_than_the_warm_up_window_still_end_the_warm_up(tmp_path: Path) -> None:
    config, cell, images = one_cell(epochs=4, milestones=[3], batch_size=64, warmup_lr=0.01, warmup_until_err=100.0)
    summary = train_cell(cell, images, CPU, config.runtime, tmp_path)  # 4 iterations per epoch, window of 20
    assert summary["warmup_ended_at"] == 4
    assert pd.read_csv(CellFolder(tmp_path).metrics).lr.tolist() == pytest.approx([0.01, 0.1, 0.1, 0.01])
