"""Conventions users bring from Hydra, Lightning and Typer CLIs: --set overrides, --print-config, choices as
enums, shell completion, help texts that keep their brackets, readable compute units, progress while estimating."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from depthlab import bench as bench_module
from depthlab import plan as plan_module
from depthlab.config import ConfigError, load_config, parse_config
from depthlab.plan import compute_text
from depthlab.ray_executor import RAY_INSTALL

from .conftest import tiny_sweep, write_config


def one_cell_sweep(tmp_path: Path) -> Path:
    """plain-8, one seed, 2 epochs of 4 batches: about a second of training on the CPU."""
    return write_config(tmp_path / "sweep.yaml", tiny_sweep(grid={"arch": "plain", "depth": 8, "seed": 0}))


# ----------------------------------------------------------------------------- --set


def test_set_overrides_a_key_and_reads_its_value_as_yaml(tmp_path: Path) -> None:
    config = load_config(one_cell_sweep(tmp_path), ["train.lr=0.05", "train.weight_decay=5e-4", "grid.seed=[0, 1, 2]"])

    assert [c.seed for c in config.cells] == [0, 1, 2]
    assert {c.train.lr for c in config.cells} == {0.05} and {c.train.weight_decay for c in config.cells} == {5e-4}
    assert config.overrides == ("train.lr=0.05", "train.weight_decay=5e-4", "grid.seed=[0, 1, 2]")


def test_set_creates_a_missing_section_and_the_last_of_two_overrides_wins(tmp_path: Path) -> None:
    path = write_config(tmp_path / "sweep.yaml", {k: v for k, v in tiny_sweep().items() if k != "runtime"})

    config = load_config(path, ["runtime.device=cpu", "runtime.jobs=2", "runtime.jobs=3"])

    assert config.runtime.device == "cpu" and config.runtime.jobs == 3


def test_set_epochs_on_a_file_in_iterations_means_epochs(tmp_path: Path) -> None:
    path = write_config(tmp_path / "sweep.yaml", tiny_sweep(train={"iterations": 8, "batch_size": 64}))

    cell = load_config(path, ["train.epochs=3", "train.milestones=[2]"]).cells[0]

    assert cell.train.epochs == 3 and cell.train.iterations is None


@pytest.mark.parametrize("override, named, says", [
    ("train.lr=20", "--set train.lr", "must be in (0, 10.0]"),
    ("train.lrr=0.1", "--set train.lrr", "did you mean 'lr'"),
    ("grid.seed=[0, -1]", "--set grid.seed", "must be in [0, "),
    ("train.batch_size=fast", "--set train.batch_size", "expected an integer"),
    ("name.x=1", "--set name.x", "name is 'tiny', not a mapping"),
])
def test_a_bad_override_is_refused_as_in_the_file_naming_the_override(tmp_path: Path, override, named, says) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(one_cell_sweep(tmp_path), [override])

    assert named in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["train.lr", "=0.1", "train..lr=1"])
def test_an_override_without_key_and_value_says_the_form(tmp_path: Path, override) -> None:
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(one_cell_sweep(tmp_path), [override])


def test_a_bad_override_on_the_command_line_is_one_line_and_exit_2(cli, tmp_path: Path) -> None:
    result = cli("sweep", one_cell_sweep(tmp_path), "--out", tmp_path / "out", "--set", "train.lr=-1")

    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "--set train.lr" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_print_config_prints_the_resolved_yaml_with_its_overrides_and_trains_nothing(cli, tmp_path: Path) -> None:
    result = cli("sweep", one_cell_sweep(tmp_path), "--out", tmp_path / "out", "--set", "grid.depth=[8, 14]", "--print-config")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# --set grid.depth=[8, 14]\n")
    printed = parse_config(yaml.safe_load(result.stdout))
    assert [c.id for c in printed.cells] == ["plain-8-s0", "plain-14-s0"]
    assert not (tmp_path / "out").exists()


def test_plan_takes_overrides(cli, tmp_path: Path) -> None:
    result = cli("plan", one_cell_sweep(tmp_path), "--out", tmp_path / "out", "--json", "--set", "grid.arch=[plain, residual]")

    assert result.exit_code == 0, result.output
    assert [row["id"] for row in yaml.safe_load(result.stdout)] == ["plain-8-s0", "residual-8-s0"]


def test_overrides_are_recorded_in_sweep_yaml_and_refused_when_they_change_a_finished_cell(cli, tmp_path: Path) -> None:
    config, out = one_cell_sweep(tmp_path), tmp_path / "out"

    first = cli("sweep", config, "--out", out, "--set", "train.lr=0.05")
    again = cli("sweep", config, "--out", out, "--set", "train.lr=0.02")

    assert first.exit_code == 0, first.output
    recorded = (out / "sweep.yaml").read_text()
    assert recorded.startswith("# --set train.lr=0.05\n") and yaml.safe_load(recorded)["cells"][0]["lr"] == 0.05
    assert again.exit_code == 2 and "different configuration" in again.stderr and "plain-8-s0" in again.stderr
    assert (out / "sweep.yaml").read_text() == recorded


# ----------------------------------------------------------------------------- help, choices, completion


def test_shell_completion_is_offered(cli) -> None:
    result = cli("--help")

    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


@pytest.mark.parametrize("command, option, bad", [
    ("sweep", "--executor", "slurm"), ("bench", "--precision", "fp16"), ("bench", "--compile", "fast"),
    ("bench", "--arch", "dense"), ("report", "--format", "yaml"),
])
def test_options_with_fixed_choices_refuse_others_naming_the_choices(cli, tmp_path: Path, command, option, bad) -> None:
    args = [one_cell_sweep(tmp_path)] if command == "sweep" else []

    result = cli(command, *args, option, bad)

    assert result.exit_code == 2 and f"'{bad}' is not one of" in result.stderr


def test_help_lists_the_choices_and_keeps_brackets_and_defaults(cli, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option

    sweep_help, bench_help = cli("sweep", "--help").stdout, cli("bench", "--help").stdout

    assert "local|ray" in sweep_help and "fp32|bf16|auto" in bench_help
    assert "pip install -e '.[ray]'" in sweep_help and "pip install -e '.[tensorboard]'" in sweep_help
    assert "[default: a Ray instance on this machine]" in sweep_help and "[default: detected]" in sweep_help


def test_install_hints_work_from_a_source_tree() -> None:
    assert RAY_INSTALL == "pip install -e '.[ray]'"


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("flops, text", [(3.5e12, "3.5 TFLOP"), (9e16, "90 PFLOP"), (1.23e9, "1.23 GFLOP"), (2e18, "2 EFLOP"), (5.0, "5 FLOP")])
def test_compute_is_shown_in_the_unit_that_fits(flops, text) -> None:
    assert compute_text(flops) == text


def test_plan_shows_a_small_sweeps_compute_without_zeros(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")

    result = cli("plan", one_cell_sweep(tmp_path), "--out", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "0.00" not in result.stdout and "total training compute: " in result.stdout and "FLOP" in result.stdout


def test_plan_estimate_says_what_it_times_and_that_it_is_still_timing(cli, tmp_path: Path, monkeypatch) -> None:
    def slow_estimate(cells, device, runtime, n_train, jobs):
        time.sleep(0.5)
        return {"cells": {}, "serial_seconds": 60.0, "serial_seconds_spread": 1.0, "wall_seconds": 60.0,
                "wall_seconds_spread": 1.0, "jobs": jobs, "repeats": 3}

    monkeypatch.setattr(bench_module, "estimate_seconds", slow_estimate)
    monkeypatch.setattr(plan_module, "HEARTBEAT_SECONDS", 0.1)

    result = cli("plan", one_cell_sweep(tmp_path), "--out", tmp_path / "out", "--estimate", "--json")

    assert result.exit_code == 0, result.output
    assert "timing 1 distinct model(s)" in result.stderr and "still timing" in result.stderr and "timed in" in result.stderr
    assert yaml.safe_load(result.stdout)[0]["id"] == "plain-8-s0"  # stdout stays the JSON alone
