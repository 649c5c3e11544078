"""Damaged results: every kind of unreadable file is set aside by `sweep` (never deleted) and the cell resumed or
trained again, and `report` leaves the cell out of the table and the figure alike, saying why.

A real tiny sweep is trained once per module; each test damages its own copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
import yaml

from depthlab import files
from depthlab.config import parse_config
from depthlab.results_folder import CellState, ResultsFolder, read_cell
from depthlab.report import build_report, report_json
from depthlab.train import train_cell

from .conftest import tiny_sweep

DAMAGED, HEALTHY = "plain-8-s0", "residual-8-s0"
EPOCHS = 2


def small_sweep() -> dict:
    """Two cells of 2 epochs of 2 iterations: about a second each on the CPU."""
    return tiny_sweep(data={"source": "synthetic", "train_size": 128, "test_size": 128},
                      train={"epochs": EPOCHS, "milestones": [1], "batch_size": 64})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'finished': a whole sweep's results folder; 'partial': the same with DAMAGED stopped after one epoch."""
    from typer.testing import CliRunner

    from depthlab.cli import app

    root = tmp_path_factory.mktemp("trained")
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump(small_sweep(), sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEPTHLAB_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, ["sweep", str(config), "--out", str(root / "finished")], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        partial = root / "partial"
        shutil.copytree(root / "finished", partial)
        cell_dir = ResultsFolder(partial).cell(DAMAGED).path
        shutil.rmtree(cell_dir)
        sweep = parse_config(small_sweep())
        from depthlab.data import load_images

        cell = next(c for c in sweep.cells if c.id == DAMAGED)
        train_cell(cell, load_images(sweep.data), torch.device("cpu"), sweep.runtime, cell_dir, stop_after_epochs=1)
    return {"finished": root / "finished", "partial": partial, "config": config}


def copy_of(trained: dict[str, Path], which: str, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained[which], out)
    return out


def truncate_last_row(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


def cut_mid_row(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) - 20])


def empty(path: Path) -> None:
    path.write_text("")


def garble(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def cell_file(name: str) -> Callable[[Path], Path]:
    return lambda out: ResultsFolder(out).cell(DAMAGED).path / name


# What is damaged in a finished cell, how, and a word the reason names.
FINISHED_DAMAGE = {
    "metrics.csv one epoch short": (cell_file("metrics.csv"), truncate_last_row, "1 of the 2 epochs"),
    "metrics.csv cut mid-row": (cell_file("metrics.csv"), cut_mid_row, "truncated"),
    "metrics.csv empty": (cell_file("metrics.csv"), empty, "metrics.csv is empty"),
    "summary.json empty": (cell_file("summary.json"), empty, "summary.json"),
    "summary.json invalid": (cell_file("summary.json"), garble, "summary.json"),
    "config.json invalid": (cell_file("config.json"), garble, "config.json"),
}


def damage(out: Path, kind: str) -> tuple[Path, bytes, str]:
    """Apply one FINISHED_DAMAGE kind; return the damaged file, its damaged bytes and the expected reason fragment."""
    locate, spoil, reason = FINISHED_DAMAGE[kind]
    path = locate(out)
    spoil(path)
    return path, path.read_bytes(), reason


def moved_folders(out: Path) -> list[Path]:
    damaged = ResultsFolder(out).damaged_dir
    return sorted(damaged.iterdir()) if damaged.is_dir() else []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the report


@pytest.mark.parametrize("kind", FINISHED_DAMAGE)
def test_report_leaves_a_damaged_finished_cell_out_of_table_and_figure_and_says_why(trained, tmp_path, kind) -> None:
    out = copy_of(trained, "finished", tmp_path)
    _, _, reason = damage(out, kind)

    report = build_report(out)

    assert list(report.rows.arch) == ["residual"]
    assert set(report.curves.arch) == {"residual"}, "a curve for a cell the table does not count"
    (entry,) = report_json(report)["missing"]
    assert entry["id"] == DAMAGED and entry["status"] == entry["state"] == "damaged"
    assert reason in entry["reason"]


@pytest.mark.parametrize("kind", ["metrics.csv one epoch short", "summary.json invalid"])
def test_the_report_command_lists_a_damaged_cell_instead_of_a_traceback(cli, trained, tmp_path, kind) -> None:
    out = copy_of(trained, "finished", tmp_path)
    damage(out, kind)

    result = cli("report", out)

    assert result.exit_code == 0, result.output
    assert f"{DAMAGED}: damaged" in result.stdout and "depthlab sweep" in result.stdout


def test_report_calls_a_cell_with_an_empty_checkpoint_damaged(trained, tmp_path) -> None:
    out = copy_of(trained, "partial", tmp_path)
    empty(cell_file("checkpoint.pt")(out))

    (entry,) = report_json(build_report(out))["missing"]

    assert entry["state"] == "damaged" and "checkpoint.pt is empty" in entry["reason"]


def test_report_with_an_unreadable_sweep_yaml_notes_it_and_reports_the_cells_found(cli, trained, tmp_path) -> None:
    out = copy_of(trained, "finished", tmp_path)
    ResultsFolder(out).sweep_file.write_text("name: [unclosed\n  : :")

    result = cli("report", out, "--format", "json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {(r["arch"], r["n_seeds"]) for r in data["rows"]} == {("plain", 1), ("residual", 1)}
    (note,) = data["notes"]
    assert "sweep.yaml does not read back" in note and "\n" not in note
    assert "note:" in cli("report", out).stdout


# ----------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("kind", FINISHED_DAMAGE)
def test_sweep_moves_a_damaged_finished_cell_aside_and_trains_it_again(cli, trained, tmp_path, kind) -> None:
    out = copy_of(trained, "finished", tmp_path)
    path, damaged_bytes, reason = damage(out, kind)
    healthy = snapshot(ResultsFolder(out).cell(HEALTHY).path)

    result = cli("sweep", trained["config"], "--out", out)

    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"! {DAMAGED}:"))
    assert reason in line and "training it again from scratch" in line
    (moved,) = moved_folders(out)
    assert moved.name.startswith(f"{DAMAGED}-") and str(moved) in line
    assert (moved / path.name).read_bytes() == damaged_bytes, "the damaged file is kept, as it was"
    assert (moved / "DONE").is_file(), "the whole cell was set aside"
    folder = ResultsFolder(out).cell(DAMAGED)
    assert read_cell(folder).state is CellState.FINISHED
    assert list(pd.read_csv(folder.metrics).epoch) == [1, 2]
    assert snapshot(ResultsFolder(out).cell(HEALTHY).path) == healthy
    assert build_report(out).missing == []


def test_a_corrupt_checkpoint_is_set_aside_and_the_cell_trained_from_scratch(cli, trained, tmp_path) -> None:
    out = copy_of(trained, "partial", tmp_path)
    checkpoint = cell_file("checkpoint.pt")(out)
    garble(checkpoint)
    garbled = checkpoint.read_bytes()

    result = cli("sweep", trained["config"], "--out", out)

    assert result.exit_code == 0, result.output
    assert f"! {DAMAGED}: checkpoint.pt does not load" in result.stdout
    assert f"start {DAMAGED}: 2 epochs\n" in result.stdout, "trained from scratch, not resumed"
    (moved,) = moved_folders(out)
    assert (moved / "checkpoint.pt").read_bytes() == garbled
    assert len(pd.read_csv(moved / "metrics.csv")) == 1, "the good metrics went aside with it"
    assert read_cell(ResultsFolder(out).cell(DAMAGED)).state is CellState.FINISHED


def test_a_corrupt_checkpoint_does_not_fail_its_cell_forever(cli, trained, tmp_path) -> None:
    """A crash on the corrupt checkpoint leaves the cell failed; the next sweep repairs it rather than crashing again."""
    out = copy_of(trained, "partial", tmp_path)
    garble(cell_file("checkpoint.pt")(out))
    files.write_text(cell_file("error.txt")(out), "Traceback …\nRuntimeError: PytorchStreamReader failed\n")
    assert read_cell(ResultsFolder(out).cell(DAMAGED)).state is CellState.FAILED

    result = cli("sweep", trained["config"], "--out", out)

    assert result.exit_code == 0, result.output
    assert read_cell(ResultsFolder(out).cell(DAMAGED)).state is CellState.FINISHED


def test_a_partial_cell_with_truncated_metrics_resumes_from_its_sound_checkpoint(cli, trained, tmp_path) -> None:
    out = copy_of(trained, "partial", tmp_path)
    metrics = cell_file("metrics.csv")(out)
    cut_mid_row(metrics)
    cut = metrics.read_bytes()

    result = cli("sweep", trained["config"], "--out", out)

    assert result.exit_code == 0, result.output
    assert "resuming from its checkpoint" in result.stdout
    assert f"start {DAMAGED}: 2 epochs (resuming after epoch 1)" in result.stdout
    (moved,) = moved_folders(out)
    assert [p.name for p in moved.iterdir()] == ["metrics.csv"] and (moved / "metrics.csv").read_bytes() == cut
    assert list(pd.read_csv(metrics).epoch) == [1, 2], "the metrics are whole again, from the checkpoint's own"


def test_sweep_keeps_an_unreadable_sweep_yaml_aside_and_writes_it_again(cli, trained, tmp_path) -> None:
    out = copy_of(trained, "finished", tmp_path)
    sweep_file = ResultsFolder(out).sweep_file
    sweep_file.write_bytes(b"\xff\xfe not yaml")

    result = cli("sweep", trained["config"], "--out", out)

    assert result.exit_code == 0, result.output
    assert "! sweep.yaml: does not read back as a sweep" in result.stdout
    (moved,) = moved_folders(out)
    assert (moved / "sweep.yaml").read_bytes() == b"\xff\xfe not yaml"
    assert parse_config(yaml.safe_load(sweep_file.read_text())).cells == parse_config(small_sweep()).cells
    assert "all 2 cells already finished" in result.stdout


def test_plan_shows_a_damaged_cell_as_damaged(cli, trained, tmp_path) -> None:
    out = copy_of(trained, "finished", tmp_path)
    damage(out, "metrics.csv one epoch short")

    rows = json.loads(cli("plan", trained["config"], "--out", out, "--json").stdout)

    assert {r["id"]: r["status"] for r in rows} == {DAMAGED: "damaged", HEALTHY: "finished"}
