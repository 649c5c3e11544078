"""TensorBoard as an optional extra: one run per cell, written from the sweep's epoch events; without the
package, switching it on is one error line and exit 2. The logging tests skip where tensorboard is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from depthlab.config import load_config, parse_config
from depthlab.results_folder import ResultsFolder
from depthlab.tblog import TensorBoardEvents, events_for

from .conftest import tiny_sweep, write_config


def installed() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: F401
    except ImportError:
        return False
    return True


needs_tensorboard = pytest.mark.skipif(not installed(), reason="tensorboard is not installed (pip install -e '.[tensorboard]')")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of one TensorBoard run, as {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class Recorder:
    """A display that keeps what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.calls.append(("epoch_done", cell_id, row["epoch"]))

    def cell_ended(self, cell_id: str, summary, error) -> None:
        self.calls.append(("cell_ended", cell_id, error))

    def sweep_started(self, start) -> None:
        self.calls.append(("sweep_started",))


def row(epoch: int, train_err: float, **extra) -> dict:
    return {"epoch": epoch, "iteration": 10 * epoch, "lr": 0.1, "train_loss": 2.0 / epoch, "train_err": train_err,
            "test_loss": 2.5 / epoch, "test_err": train_err + 5, "seconds": 1.5, **extra}


@needs_tensorboard
def test_each_cell_gets_a_run_with_every_number_of_each_epoch_by_iteration(tmp_path: Path) -> None:
    display = Recorder()
    dynamics = ResultsFolder(tmp_path).cell("plain-8-s0").dynamics
    dynamics.parent.mkdir(parents=True)
    dynamics.write_text("epoch,grad_norm/stage1,branch_ratio/stage1\n0,9,9\n1,0.5,1.4\n2,0.25,1.3\n")  # epoch 0: not this run's
    with TensorBoardEvents(display, tmp_path) as events:
        events.sweep_started("start")
        for epoch, err in ((1, 80.0), (2, 60.0)):
            events.epoch_done("plain-8-s0", row(epoch, err, grad_stage1=0.5 * epoch))
            events.epoch_done("residual-8-s0", row(epoch, err - 10))
        events.cell_ended("plain-8-s0", {"iterations": 20, "final": {"clean_train_err": 55.0}}, None)
        events.cell_ended("residual-8-s0", None, "boom")

    plain, residual = scalars(tmp_path / "tensorboard" / "plain-8-s0"), scalars(tmp_path / "tensorboard" / "residual-8-s0")
    assert plain["train_err"] == [(10, 80.0), (20, 60.0)] and residual["train_err"] == [(10, 70.0), (20, 50.0)]
    assert {"lr", "train_loss", "test_loss", "test_err", "seconds", "grad_stage1"} <= plain.keys()
    assert "epoch" not in plain and "iteration" not in plain
    assert plain["clean_train_err"] == [(20, 55.0)] and "clean_train_err" not in residual
    assert plain["grad_norm/stage1"] == [(10, 0.5), (20, 0.25)] and plain["branch_ratio/stage1"][1] == (20, pytest.approx(1.3))
    assert not any(tag.startswith("grad_norm/") for tag in residual)  # it failed: no dynamics to log
    assert display.calls == [("sweep_started",), ("epoch_done", "plain-8-s0", 1), ("epoch_done", "residual-8-s0", 1),
                             ("epoch_done", "plain-8-s0", 2), ("epoch_done", "residual-8-s0", 2),
                             ("cell_ended", "plain-8-s0", None), ("cell_ended", "residual-8-s0", "boom")]


@needs_tensorboard
def test_a_sweep_with_tensorboard_writes_one_run_per_trained_cell(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep(grid={"arch": "plain", "depth": 8, "seed": 0}))

    result = cli("sweep", config, "--out", tmp_path / "out", "--tensorboard")

    assert result.exit_code == 0, result.output
    run = scalars(tmp_path / "out" / "tensorboard" / "plain-8-s0")
    assert [step for step, _ in run["train_err"]] == [4, 8]  # 256 images / batch 64: 4 iterations per epoch, 2 epochs
    assert len(run["clean_train_err"]) == 1
    assert [step for step, _ in run["grad_norm/stage1"]] == [4, 8]


def test_the_switch_is_a_runtime_key_and_a_flag_and_off_by_default(tmp_path: Path) -> None:
    plain = write_config(tmp_path / "plain.yaml", tiny_sweep())
    switched = write_config(tmp_path / "on.yaml", tiny_sweep(runtime={"device": "cpu", "tensorboard": True}))

    assert load_config(plain).runtime.tensorboard is False and load_config(switched).runtime.tensorboard is True
    assert load_config(plain, ["runtime.tensorboard=true"]).runtime.tensorboard is True
    display = Recorder()
    with events_for(display, load_config(plain), tmp_path) as events:
        assert events is display  # off: the display itself, nothing imported or written
    assert not (tmp_path / "tensorboard").exists()


def test_a_fingerprint_does_not_change_with_the_switch(tmp_path: Path) -> None:
    off, on = parse_config(tiny_sweep()), parse_config(tiny_sweep(runtime={"tensorboard": True}))
    assert [c.fingerprint() for c in off.cells] == [c.fingerprint() for c in on.cells]


def test_without_the_package_switching_it_on_is_one_error_line_and_exit_2(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an environment without the extra sees
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep())

    result = cli("sweep", config, "--out", tmp_path / "out", "--tensorboard")

    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "pip install -e '.[tensorboard]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
