"""Cells as Ray tasks: the same results folder as the local executor, retries after a killed worker, and no shared filesystem.

Needs Ray (`pip install -e '.[ray]'`); without it these tests skip, except the CLI's messages.
One Ray instance with 2 CPUs serves the whole module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from depthlab import files
from depthlab.config import parse_config
from depthlab.ray_executor import SHARED_FS_MARKER, RayExecutor
from depthlab.attempt import run_cell
from depthlab.sweep import run_sweep

from .conftest import tiny_sweep, write_config

SMALL = {"data": {"source": "synthetic", "train_size": 128, "test_size": 128},
         "train": {"epochs": 2, "milestones": [1], "batch_size": 64}}


class Recorder:
    """SweepEvents that keeps what it was told."""

    def __init__(self) -> None:
        self.started: list[tuple] = []
        self.epochs: list[tuple] = []
        self.ended: list[tuple] = []
        self.progress: list[tuple] = []
        self.repairs: list = []

    def sweep_started(self, start) -> None:
        self.start = start

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.started.append((cell_id, total_epochs, done_epochs))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.epochs.append((cell_id, row["epoch"]))

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        self.progress.append((cell_id, epoch))

    def repaired(self, repair) -> None:
        self.repairs.append(repair)

    def cell_ended(self, cell_id: str, summary, error) -> None:
        self.ended.append((cell_id, error))


def config_for(**grid):
    return parse_config(tiny_sweep(**SMALL, grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0], **grid}))


def assert_same_results(out: Path, reference: Path) -> None:
    """Every cell finished in both, with the same metrics (but wall time) and the same final numbers."""
    cells = sorted(p.name for p in (reference / "cells").iterdir())
    assert sorted(p.name for p in (out / "cells").iterdir()) == cells
    for name in cells:
        a, b = reference / "cells" / name, out / "cells" / name
        assert (b / "DONE").read_text() == (a / "DONE").read_text()
        assert not (b / "checkpoint.pt").exists()
        pd.testing.assert_frame_equal(pd.read_csv(b / "metrics.csv").drop(columns=["seconds"]),
                                      pd.read_csv(a / "metrics.csv").drop(columns=["seconds"]), check_exact=True)
        assert files.read_json(b / "summary.json")["final"] == files.read_json(a / "summary.json")["final"]


def dies_after_first_epoch(marker: Path):
    """A runner whose first attempt kills its worker process right after the first epoch's checkpoint."""

    def runner(cell, images, device, config, out_dir, events):
        class Dying:
            def cell_started(self, *args) -> None:
                events.cell_started(*args)

            def epoch_progress(self, *args) -> None:  # sent when an epoch outlasts PROGRESS_SECONDS, as on a loaded machine
                events.epoch_progress(*args)

            def epoch_done(self, cell_id: str, row: dict) -> None:
                events.epoch_done(cell_id, row)
                if not marker.exists():
                    marker.touch()
                    os._exit(1)

        return run_cell(cell, images, device, config, out_dir, Dying())

    return runner


# ----------------------------------------------------------------------------- the CLI, with or without Ray


def test_an_unknown_executor_is_a_one_line_error(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep())
    result = cli("sweep", config, "--out", tmp_path / "out", "--executor", "slurm")
    assert result.exit_code == 2
    assert all(word in result.stderr for word in ("'--executor'", "'slurm' is not one of", "'local'", "'ray'"))
    assert not (tmp_path / "out").exists()


def test_executor_ray_without_ray_installed_says_how_to_install_it(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra sees: import ray fails
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep())
    result = cli("sweep", config, "--out", tmp_path / "out", "--executor", "ray")
    assert result.exit_code == 2
    assert "pip install -e '.[ray]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- on a local Ray instance

try:
    import ray
except ImportError:
    ray = None


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """One Ray instance for the module (starting one takes seconds); the tests that use it skip without Ray."""
    if ray is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]'): the Ray executor's tests skip")
    cache = tmp_path_factory.mktemp("ray-cache")  # Ray's workers keep the environment of ray.init: never the user's cache
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"DEPTHLAB_CACHE": str(cache)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local executor's results for the same cells, in one CPU thread: Ray gives each 1-CPU task one thread,
    and another thread count rounds the last bits of a loss differently (seen here: train_loss equal to 6 places only)."""
    out = tmp_path_factory.mktemp("local") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(config_for(seed=[0, 1]), out, Recorder())
    finally:
        torch.set_num_threads(threads)
    return out


def test_ray_tasks_fill_the_results_folder_like_the_local_executor(local_ray, reference: Path, tmp_path: Path) -> None:
    events = Recorder()
    outcome = run_sweep(config_for(seed=[0, 1]), tmp_path / "out", events, executor=RayExecutor())
    assert outcome.failed == [] and len(outcome.ran) == 4
    assert_same_results(tmp_path / "out", reference)
    assert events.start.jobs == 2
    assert sorted(events.epochs) == sorted((cell, epoch) for cell in outcome.ran for epoch in (1, 2))
    assert sorted(cell for cell, _ in events.ended) == sorted(outcome.ran)
    assert not (tmp_path / "out" / SHARED_FS_MARKER).exists()

    again = run_sweep(config_for(seed=[0, 1]), tmp_path / "out", Recorder(), executor=RayExecutor())
    assert again.ran == [] and sorted(again.skipped) == sorted(outcome.ran)


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(local_ray, reference: Path, tmp_path: Path) -> None:
    events = Recorder()
    executor = RayExecutor(runner=dies_after_first_epoch(tmp_path / "died"))
    outcome = run_sweep(config_for(arch=["plain"]), tmp_path / "out", events, executor=executor)
    assert (tmp_path / "died").exists()
    assert outcome.failed == [] and outcome.ran == ["plain-8-s0"]
    assert events.started[-1] == ("plain-8-s0", 2, 1)  # the retry began at epoch 2 (the dead task's own events may be lost)
    assert_same_results(tmp_path / "out", _only(reference, "plain-8-s0", tmp_path))


def test_without_a_shared_filesystem_workers_return_the_files_and_the_folder_is_the_same(local_ray, reference: Path,
                                                                                         tmp_path: Path) -> None:
    outcome = run_sweep(config_for(seed=[0, 1]), tmp_path / "out", Recorder(), executor=RayExecutor(filesystem="none"))
    assert outcome.failed == []
    assert_same_results(tmp_path / "out", reference)


def test_without_a_shared_filesystem_a_killed_worker_restarts_its_cell(local_ray, reference: Path, tmp_path: Path) -> None:
    """The checkpoint stayed on the dead worker: the retry trains the cell from its first epoch, to the same numbers."""
    events = Recorder()
    executor = RayExecutor(filesystem="none", runner=dies_after_first_epoch(tmp_path / "died"))
    outcome = run_sweep(config_for(arch=["plain"]), tmp_path / "out", events, executor=executor)
    assert (tmp_path / "died").exists() and outcome.failed == []
    assert events.started[-1] == ("plain-8-s0", 2, 0)
    assert_same_results(tmp_path / "out", _only(reference, "plain-8-s0", tmp_path))


def test_a_cell_that_raises_is_recorded_as_failed_with_its_error_log(local_ray, tmp_path: Path) -> None:
    class Raising:
        def cell_started(self, *args) -> None:
            raise ZeroDivisionError("division by zero")

    def raises(cell, images, device, config, out_dir, events):
        return run_cell(cell, images, device, config, out_dir, Raising())

    outcome = run_sweep(config_for(arch=["plain"]), tmp_path / "out", Recorder(), executor=RayExecutor(runner=raises))
    assert outcome.failed == ["plain-8-s0"]
    assert "ZeroDivisionError" in (tmp_path / "out" / "cells" / "plain-8-s0" / "error.txt").read_text()


def _only(reference: Path, cell_id: str, tmp_path: Path) -> Path:
    """A copy of `reference` that holds only `cell_id`, to compare a one-cell sweep against."""
    only = tmp_path / "reference"
    (only / "cells").mkdir(parents=True)
    (only / "cells" / cell_id).symlink_to(reference / "cells" / cell_id)
    return only
