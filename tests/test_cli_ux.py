"""What the user sees: help texts, the version, tables in logs, live progress, the time estimate, the figure,
and a report that prints even where it cannot write."""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
from rich.console import Console

import depthlab.bench as bench_module
import depthlab.display as display_module
import depthlab.files as files_module
import depthlab.train as train_module
from depthlab import __version__
from depthlab.cli import app
from depthlab.config import parse_config
from depthlab.data import synthetic_images
from depthlab.display import LogDisplay, RichDisplay
from depthlab.report import Report, build_report, depth_colour, figure6
from depthlab.events import ForwardedEvents, deliver
from depthlab.sweep import Repair
from depthlab.train import train_cell

from .conftest import tiny_sweep, write_config
from .test_report import finish, write_sweep

# ----------------------------------------------------------------------------- help and version


@pytest.mark.parametrize("command, defaults", [
    ("sweep", ["[default: results/<name>]", "[default: the config's runtime.device]", "[default: chosen from the device]"]),
    ("plan", ["[default: results/<name>]", "[default: the config's runtime.jobs]"]),
    ("report", ["[default: the latest under results/]", "[default: text]"]),
    ("bench", ["[default: min(4, CPU cores)]", "[default: 56]"]),
])
def test_help_prints_every_default_literally(cli, monkeypatch, command, defaults) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option, so that no default is broken across lines

    result = cli(command, "--help")

    assert result.exit_code == 0, result.output
    for default in defaults:
        assert default in result.stdout, default
    assert "folder ." not in result.stdout and "cuda:N ." not in result.stdout


def test_every_option_and_argument_has_a_help_text() -> None:
    group = typer.main.get_command(app)
    commands = {"(app)": group, **group.commands}
    params = [(name, param) for name, command in commands.items() for param in command.params]
    assert len(params) > 20 and ("(app)", "version") in [(name, p.name) for name, p in params]
    assert [f"{name} {param.name}" for name, param in params if not getattr(param, "help", None)] == []


def test_version_prints_the_version_and_exits_0(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"depthlab {__version__}"


# ----------------------------------------------------------------------------- tables in logs


def test_a_piped_report_prints_each_table_row_on_one_line(cli, tmp_path: Path) -> None:
    expected = write_sweep(tmp_path, {"name": "a-rather-long-sweep-name-for-a-wide-title", "data": {"source": "synthetic"},
                                      "train": {"epochs": 4}, "grid": {"arch": ["plain", "residual"], "depth": [20, 56], "seed": [0, 1]}})
    for c in expected.values():
        finish(tmp_path, c, 6.125 + c.depth / 10 + c.seed, 9.5 + c.seed)
    report = build_report(tmp_path)

    result = cli("report", tmp_path)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for depth in (20, 56):
        plain = report.rows[(report.rows.arch == "plain") & (report.rows.depth == depth)].iloc[0]
        resnet = report.rows[(report.rows.arch == "residual") & (report.rows.depth == depth)].iloc[0]
        cells = [f"{plain.train_err:.2f} ± {plain.train_err_std:.2f} (n=2)", f"{plain.test_err:.2f} ± {plain.test_err_std:.2f}",
                 f"{resnet.train_err:.2f} ± {resnet.train_err_std:.2f} (n=2)"]
        assert any(all(c in line for c in cells) for line in lines), f"depth {depth} is spread over several lines"


def test_a_piped_plan_prints_each_cell_on_one_line(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8, 110], "seed": [0]}))

    result = cli("plan", config, "--out", tmp_path / "out")

    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "residual-110-s0" in line)
    assert "1,727,962" in line and "pending" in line


# ----------------------------------------------------------------------------- progress while training


class Recorder:
    """Records the events of one cell."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.events.append(("started", total_epochs, done_epochs))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.events.append(("epoch", row["epoch"]))

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        self.events.append(("progress", epoch, iterations, per_epoch))


def train_tiny(tmp_path: Path, events: Recorder) -> None:
    """2 epochs of 4 iterations."""
    config = parse_config(tiny_sweep(train={"epochs": 2, "batch_size": 32}, grid={"arch": "plain", "depth": 8, "seed": 0}))
    train_cell(config.cells[0], synthetic_images(128, 32), torch.device("cpu"), config.runtime, tmp_path, events)


def test_training_reports_progress_within_each_epoch_by_iteration_count(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)  # every step
    events = Recorder()

    train_tiny(tmp_path, events)

    progress = [ev[1:] for ev in events.events if ev[0] == "progress"]
    assert progress == [(epoch, done, 4) for epoch in (1, 2) for done in (1, 2, 3, 4)]  # (epoch, iterations, per epoch)
    assert events.events.index(("epoch", 1)) == events.events.index(("progress", 1, 4, 4)) + 1


def test_progress_is_throttled_by_wall_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 3600.0)
    events = Recorder()

    train_tiny(tmp_path, events)

    assert [ev for ev in events.events if ev[0] == "progress"] == []


def test_worker_processes_forward_every_cell_event_to_the_sweep() -> None:
    parent, child = multiprocessing.Pipe()
    forwarded = ForwardedEvents(child.send)
    forwarded.cell_started("plain-8-s0", 16, 3)
    forwarded.epoch_progress("plain-8-s0", 3, 120, 390)
    forwarded.epoch_done("plain-8-s0", {"epoch": 3})
    received = Recorder()
    for _ in range(3):
        deliver(parent.recv(), received)
    assert received.events == [("started", 16, 3), ("progress", 3, 120, 390), ("epoch", 3)]


def test_the_live_display_moves_within_an_epoch_and_says_when_it_resumes() -> None:
    display = RichDisplay(Console(file=io.StringIO(), force_terminal=True))
    display.cell_started("plain-8-s0", total_epochs=16, done_epochs=3)
    task = display.bars.tasks[0]
    assert "resuming after epoch 3" in task.description and task.completed == 3

    display.epoch_progress("plain-8-s0", epoch=4, iterations=39, per_epoch=78)
    assert task.completed == pytest.approx(3.5)

    display.epoch_done("plain-8-s0", {"epoch": 4, "train_loss": 1.0, "train_err": 30.0, "test_err": 35.0})
    assert task.completed == 4


def test_the_log_prints_progress_lines_and_repairs(monkeypatch) -> None:
    monkeypatch.setattr(display_module, "LOG_PROGRESS_SECONDS", 0.0)
    out = io.StringIO()
    log = LogDisplay(Console(file=out, width=300))
    log.repaired(Repair("plain-8-s0", "metrics.csv is truncated (a row is cut short)", Path("r/damaged/plain-8-s0-1"),
                        "resuming from its checkpoint"))
    log.cell_started("plain-8-s0", total_epochs=16, done_epochs=3)
    log.epoch_progress("plain-8-s0", epoch=4, iterations=39, per_epoch=78)

    lines = out.getvalue().splitlines()
    assert lines == ["! plain-8-s0: metrics.csv is truncated (a row is cut short); moved to r/damaged/plain-8-s0-1, "
                     "resuming from its checkpoint",
                     "start plain-8-s0: 16 epochs (resuming after epoch 3)",
                     "plain-8-s0 epoch 4/16: 39/78 iterations"]


# ----------------------------------------------------------------------------- plan --estimate


def fake_rates(monkeypatch, rates: list[float]) -> list[str]:
    """depthlab_rate returns `rates` in turn; returns the log of models timed."""
    timed, supply = [], iter(rates)

    def rate(cell, steps, **_):
        timed.append(f"{cell.arch}-{cell.depth}")
        return next(supply)

    monkeypatch.setattr(bench_module, "depthlab_rate", rate)
    return timed


def test_the_estimate_warms_up_untimed_before_timing_each_model_several_times(monkeypatch) -> None:
    config = parse_config(tiny_sweep())  # plain-8 and residual-8: the same compute
    repeats = bench_module.ESTIMATE_REPEATS
    timed = fake_rates(monkeypatch, [1.0] + [1000.0] * (2 * repeats))  # the first timing carries one-time costs

    projection = bench_module.estimate_seconds(config.cells, torch.device("cpu"), config.runtime, 256, jobs=1)

    assert len(timed) == 1 + 2 * repeats
    assert projection["cells"]["plain-8-s0"] == projection["cells"]["residual-8-s0"], "the one-time cost landed on one model"
    assert projection["serial_seconds_spread"] == 0.0 and projection["repeats"] == repeats


def test_the_estimate_reports_the_spread_of_its_repeats(monkeypatch) -> None:
    config = parse_config(tiny_sweep(grid={"arch": "plain", "depth": 8, "seed": 0}))
    fake_rates(monkeypatch, [1.0, 100.0, 200.0, 400.0])  # 2 epochs × 256 images = 512 images: 5.12, 2.56, 1.28 s

    projection = bench_module.estimate_seconds(config.cells, torch.device("cpu"), config.runtime, 256, jobs=1, repeats=3)

    assert projection["serial_seconds"] == pytest.approx((5.12 + 2.56 + 1.28) / 3)
    assert projection["serial_seconds_spread"] == pytest.approx(pd.Series([5.12, 2.56, 1.28]).std())


def test_plan_estimate_prints_an_uncertainty_and_assumes_an_idle_machine(cli, monkeypatch, tmp_path: Path) -> None:
    fake_rates(monkeypatch, [1.0] + [100.0, 300.0] * 3)
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep())

    result = cli("plan", config, "--out", tmp_path / "out", "--estimate")

    assert result.exit_code == 0, result.output
    assert " ± " in result.stdout and "min one cell at a time" in result.stdout
    assert "idle machine" in result.stdout


# ----------------------------------------------------------------------------- the figure


def curves_report(iterations_per_epoch: int, epochs: int = 4, first_err: float = 90.0) -> Report:
    rows = [{"arch": arch, "depth": depth, "variant": "", "epoch": e, "iteration": e * iterations_per_epoch,
             "train_err": first_err - 10 * e - depth / 10, "test_err": first_err - 8 * e}
            for arch in ("plain", "residual") for depth in (8, 14, 20) for e in range(1, epochs + 1)]
    return Report(name="fig", rows=pd.DataFrame(), verdict={}, missing=[], curves=pd.DataFrame(rows))


@pytest.mark.parametrize("per_epoch, label, top_tick", [(2, "iterations", 8), (1250, "iter. (1e3)", 5), (16000, "iter. (1e4)", 6.4)])
def test_the_x_axis_unit_follows_the_run_length(per_epoch, label, top_tick) -> None:
    fig = figure6(curves_report(per_epoch))
    ax = fig.axes[0]
    assert ax.get_xlabel() == label
    assert max(line.get_xdata().max() for line in ax.get_lines()) == pytest.approx(top_tick)


def test_every_curve_point_is_inside_the_y_range_up_to_100() -> None:
    report = curves_report(100, first_err=95.0)
    fig = figure6(report)
    bottom, top = fig.axes[0].get_ylim()
    values = report.curves[["train_err", "test_err"]].to_numpy()
    assert bottom <= values.min() and values.max() <= top <= 100


def test_the_legend_covers_no_curve() -> None:
    fig = figure6(curves_report(100))
    fig.draw_without_rendering()
    [legend] = fig.legends
    for ax in fig.axes:
        assert not legend.get_window_extent().overlaps(ax.get_window_extent()), "the legend lies over a plotting area"


def test_one_legend_explains_the_line_styles_and_names_each_depth_with_its_seeds() -> None:
    report = curves_report(100)
    report.curves["n"] = 3
    [legend] = figure6(report).legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert {"8 layers (n=3)", "14 layers (n=3)", "20 layers (n=3)"} <= set(labels)
    assert any("training error" in l for l in labels) and any("test error" in l for l in labels) and any("seed" in l for l in labels)


def test_a_depth_has_the_same_colour_whatever_else_the_sweep_trained() -> None:
    def colours(depths: set[int]) -> dict[int, str]:
        report = curves_report(100)
        report.curves = report.curves[report.curves.depth.isin(depths)]
        [legend] = figure6(report).legends
        return {int(t.get_text().split()[0]): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)
                if t.get_text().endswith("layers")}
    assert colours({8, 14, 20})[20] == colours({20})[20] == depth_colour(20)
    assert len({depth_colour(d) for d in (8, 14, 20, 32, 44, 56, 110)}) == 7


def test_the_y_axis_fits_the_data_rather_than_starting_at_zero() -> None:
    report = curves_report(100, first_err=80.0)  # errors between 38 and 72
    bottom, top = figure6(report).axes[0].get_ylim()
    values = report.curves[["train_err", "test_err"]].to_numpy()
    assert 20 < bottom <= values.min() and values.max() <= top < 90


def test_the_seeds_spread_is_drawn_as_a_band() -> None:
    report = curves_report(100)
    report.curves = report.curves.assign(train_err_min=report.curves.train_err - 1, train_err_max=report.curves.train_err + 1,
                                         test_err_min=report.curves.test_err - 2, test_err_max=report.curves.test_err + 2, n=3)
    bands = [c for ax in figure6(report).axes for c in ax.collections]
    assert len(bands) == 2 * 2 * 3  # per panel, depth and measure


# ----------------------------------------------------------------------------- a report that cannot be written


def test_report_prints_to_stdout_when_it_cannot_write_its_files(cli, monkeypatch, tmp_path: Path) -> None:
    cells = write_sweep(tmp_path, {"name": "ro", "data": {"source": "synthetic"}, "train": {"epochs": 4},
                                   "grid": {"arch": ["plain"], "depth": [20], "seed": [0]}})
    finish(tmp_path, cells["plain-20-s0"], 7.0)

    def read_only(path: Path, _write) -> None:  # what a read-only folder does, even to root
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(files_module, "_atomic", read_only)
    for fmt in ("json", "markdown", "text"):
        result = cli("report", tmp_path, "--format", fmt)

        assert result.exit_code == 0, result.output
        assert "not written" in result.stderr and "Permission denied" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "wrote " not in result.stdout
        if fmt == "json":
            assert json.loads(result.stdout)["rows"][0]["arch"] == "plain"
        else:
            assert "7.00" in result.stdout
    assert not (tmp_path / "report.md").exists()
