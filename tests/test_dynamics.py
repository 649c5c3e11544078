"""Gradients and branch sizes recorded every epoch: known values by construction, no effect on training,
one row per epoch through resumes, and a figure beside Figure 6."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from depthlab.config import parse_config
from depthlab.data import synthetic_images
from depthlab.models import build_net
from depthlab.options import NetSpec
from depthlab.dynamics import training_dynamics
from depthlab.report import Report, build_report, dynamics_figure, report_markdown, write_report
from depthlab.sweep import run_sweep
from depthlab.train import train_cell

from .conftest import tiny_sweep
from .test_ray import Recorder

CPU = torch.device("cpu")


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))


def test_recording_changes_nothing_the_training_run_depends_on() -> None:
    torch.manual_seed(0)
    net = build_net(NetSpec("residual", 14))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = training_dynamics(net, *batch())
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN running statistics too
    assert set(stats) == {"grad_norm/stem", "grad_norm/stage1", "grad_norm/stage2", "grad_norm/stage3", "grad_norm/classifier",
                          "branch_ratio/stage1", "branch_ratio/stage2", "branch_ratio/stage3"}
    assert all(v > 0 for v in stats.values())


def test_a_zero_gamma_resnet_starts_with_every_branch_at_zero() -> None:
    torch.manual_seed(0)
    stats = training_dynamics(build_net(NetSpec("residual", 20, init="zero_gamma")), *batch())
    assert [stats[f"branch_ratio/stage{s}"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert stats["grad_norm/stage1"] == 0.0  # with γ = 0 no gradient reaches a branch's convolutions (only γ gets one)
    assert stats["grad_norm/classifier"] > 0 and stats["grad_norm/stem"] > 0  # the shortcuts carry it past them


def test_each_epoch_adds_one_row_and_a_resumed_cell_keeps_them_all(tmp_path: Path) -> None:
    config = parse_config(tiny_sweep(train={"epochs": 3, "milestones": [2], "batch_size": 64}))
    cell, images = config.cells[0], synthetic_images(256, 64)
    train_cell(cell, images, CPU, config.runtime, tmp_path / "resumed", stop_after_epochs=2)
    train_cell(cell, images, CPU, config.runtime, tmp_path / "resumed")
    train_cell(cell, images, CPU, config.runtime, tmp_path / "straight")
    resumed, straight = (pd.read_csv(tmp_path / name / "dynamics.csv") for name in ("resumed", "straight"))
    assert list(straight.epoch) == [1, 2, 3]
    pd.testing.assert_frame_equal(resumed, straight)


def test_the_report_draws_the_dynamics_beside_figure_6(tmp_path: Path) -> None:
    config = parse_config(tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8, 14], "seed": [0]}))
    run_sweep(config, tmp_path / "out", Recorder())
    report = build_report(tmp_path / "out")
    assert set(report.dynamics.depth) == {8, 14} and set(report.dynamics.arch) == {"plain", "residual"}
    written = write_report(report, tmp_path / "out")
    assert tmp_path / "out" / "dynamics.png" in written
    assert "dynamics.png" in report_markdown(report)


def test_cells_without_dynamics_still_report(tmp_path: Path) -> None:
    config = parse_config(tiny_sweep())
    run_sweep(config, tmp_path / "out", Recorder())
    for path in (tmp_path / "out" / "cells").glob("*/dynamics.csv"):
        path.unlink()  # as written before dynamics were recorded
    report = build_report(tmp_path / "out")
    assert report.dynamics.empty
    assert all(p.name != "dynamics.png" for p in write_report(report, tmp_path / "out"))


@pytest.mark.parametrize("spread, scale", [(1.5, "linear"), (1e3, "log")])
def test_the_gradient_panel_is_linear_over_a_narrow_range_and_log_over_a_wide_one(spread: float, scale: str) -> None:
    """A log axis over 0.45–1.7 showed two labelled ticks: narrow ranges read better on a linear axis."""
    rows = [{"arch": arch, "depth": depth, "variant": "", "epoch": epoch, "grad_norm/classifier": 1.0,
             "grad_norm/stage1": 0.5 * spread ** ((epoch - 1) / 3), "branch_ratio/stage1": 0.8}
            for arch in ("plain", "residual") for depth in (8, 20) for epoch in (1, 2, 3, 4)]
    report = Report(name="d", rows=pd.DataFrame(), verdict={}, missing=[], curves=pd.DataFrame(), dynamics=pd.DataFrame(rows))
    assert dynamics_figure(report).axes[0].get_yscale() == scale
