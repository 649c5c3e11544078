"""`depthlab probe`: the measurements per depth, a finished cell's lesions, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from depthlab.config import parse_config
from depthlab.data import load_images
from depthlab.train import train_cell

from .conftest import tiny_sweep


def test_probe_prints_one_row_per_net_and_writes_its_table_and_figure(cli, tmp_path: Path) -> None:
    result = cli("probe", "--depth", "8", "--depth", "14", "--batch-size", "16", "--out", tmp_path, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted((r["arch"], r["depth"]) for r in rows) == [("plain", 8), ("plain", 14), ("residual", 8), ("residual", 14)]
    assert all(r["grad_first"] > 0 and r["grad_last"] > 0 for r in rows)
    assert all(len(r["nearby_by_lag"]) == 15 and 0 < r["nearby_gradient_correlation"] <= 1 for r in rows)
    assert (tmp_path / "probe.csv").is_file() and (tmp_path / "probe.png").stat().st_size > 0
    assert (tmp_path / "shattering.csv").read_text().startswith("arch,variant,depth,lag,distance,correlation")


def test_every_probe_output_names_its_data_batch_seed_and_batchnorm_mode(cli, tmp_path: Path) -> None:
    json_rows = json.loads(cli("probe", "--depth", "8", "--arch", "plain", "--batch-size", "8", "--seed", "3", "--out", tmp_path,
                               "--format", "json").stdout)
    assert all(r["data"].startswith("SYNTHETIC") and r["batch_size"] == 8 and r["seed"] == 3 and "train-mode" in r["bn_mode"]
               for r in json_rows)
    text = cli("probe", "--depth", "8", "--arch", "plain", "--batch-size", "8", "--out", tmp_path)
    assert "SYNTHETIC" in text.stdout and "batch 8, seed 0" in text.stdout and "train-mode BatchNorm" in text.stdout
    assert text.stderr.startswith("warning: SYNTHETIC")  # said loudly, where a redirected table would not hide it
    markdown = cli("probe", "--depth", "8", "--arch", "plain", "--batch-size", "8", "--out", tmp_path, "--format", "markdown")
    assert markdown.stdout.startswith("At initialisation, on SYNTHETIC images")
    assert "SYNTHETIC" in (tmp_path / "probe.csv").read_text().splitlines()[1]


def test_probe_takes_ablation_variants_and_refuses_impossible_ones(cli, tmp_path: Path) -> None:
    result = cli("probe", "--depth", "8", "--batch-size", "8", "--variant", "norm=none,init=skipinit", "--out", tmp_path, "--format", "json")
    assert result.exit_code == 0, result.output
    assert [(r["arch"], r["variant"]) for r in json.loads(result.stdout)] == [("plain", ""), ("residual", ""),
                                                                               ("residual", "init=skipinit-norm=none")]
    for bad in ("norm=layer", "width=3", "init=zero_gamma,norm=none"):
        refused = cli("probe", "--variant", bad, "--out", tmp_path)
        assert refused.exit_code == 2 and refused.stderr.startswith("error: --variant") and len(refused.stderr.strip().splitlines()) == 1


def test_probe_refuses_an_unknown_arch_or_depth_with_a_one_line_error(cli, tmp_path: Path) -> None:
    for option, value in (("--arch", "dense"), ("--depth", "21")):
        result = cli("probe", option, value, "--out", tmp_path)
        assert result.exit_code == 2
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_probe_of_a_finished_cell_removes_each_block_in_turn(cli, tmp_path: Path) -> None:
    config = parse_config(tiny_sweep(train={"epochs": 1, "batch_size": 64}, grid={"arch": "residual", "depth": 8, "seed": 0}))
    cell_dir = tmp_path / "cell"
    train_cell(config.cells[0], load_images(config.data), torch.device("cpu"), config.runtime, cell_dir)
    result = cli("probe", "--cell", cell_dir, "--batch-size", "32", "--format", "json")
    assert result.exit_code == 0, result.output
    lesions = json.loads(result.stdout)["lesion"]
    assert lesions[0]["removed"] is None and len(lesions) == 1 + 3  # intact, then each of ResNet-8's three blocks
    assert cli("probe", "--cell", tmp_path / "nothing").exit_code == 2
