"""Data people can load: cells.csv and curves.csv beside the report, `load_results` returning them as DataFrames,
and the report's provenance (commit, versions, device, times)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console

from depthlab import files
from depthlab.results_folder import ResultsFolder
from depthlab.report import build_report, print_report, report_json, report_markdown, write_report
from depthlab.results import CELL_COLUMNS, load_results, provenance

from .test_report import EPOCHS, finish, start, sweep, write_sweep


def mixed_folder(results: Path) -> dict:
    """plain-20 and residual-20 finished, plain-56 two epochs in, residual-56 not started; one shortcut-B variant finished."""
    cells = write_sweep(results, sweep(shortcut=["A", "B"]))
    finish(results, cells["plain-20-s0"], 30.0)
    finish(results, cells["residual-20-s0"], 20.0)
    finish(results, cells["residual-20-B-s0"], 19.0)
    start(results, cells["plain-56-s0"], epochs_done=2)
    return cells


def test_cells_has_one_row_per_cell_of_the_sweep_with_its_state_and_final_numbers(tmp_path: Path) -> None:
    cells = mixed_folder(tmp_path)

    table, _ = load_results(tmp_path)

    assert list(table.columns) == CELL_COLUMNS
    assert sorted(table.id) == sorted(cells)
    by_id = table.set_index("id")
    assert by_id.loc["plain-20-s0", "state"] == "finished" and by_id.loc["plain-20-s0", "train_err"] == 30.0
    assert by_id.loc["plain-20-s0", "clean_train_err"] == 29.0 and by_id.loc["plain-20-s0", "train_seconds"] == 1.0
    assert by_id.loc["residual-20-B-s0", "variant"] == "B" and by_id.loc["residual-20-B-s0", "shortcut"] == "B"
    assert by_id.loc["plain-56-s0", "state"] == "partial" and pd.isna(by_id.loc["plain-56-s0", "train_err"])
    assert by_id.loc["residual-56-s0", "state"] == "pending" and by_id.loc["residual-56-s0", "depth"] == 56


def test_curves_hold_every_recorded_epoch_of_every_cell_with_its_identity(tmp_path: Path) -> None:
    mixed_folder(tmp_path)
    folder = ResultsFolder(tmp_path).cell("plain-20-s0")
    files.write_text(folder.dynamics, "epoch,grad_stage1\n" + "".join(f"{e},{e / 10}\n" for e in range(1, EPOCHS + 1)))

    _, curves = load_results(tmp_path)

    assert curves.groupby("id").epoch.count().to_dict() == {"plain-20-s0": EPOCHS, "residual-20-s0": EPOCHS,
                                                            "residual-20-B-s0": EPOCHS, "plain-56-s0": 2}
    assert list(curves.columns[:7]) == ["id", "arch", "depth", "seed", "variant", "shortcut", "state"]
    plain = curves[curves.id == "plain-20-s0"]
    assert plain.grad_stage1.tolist() == [e / 10 for e in range(1, EPOCHS + 1)]
    assert curves[curves.id == "residual-20-s0"].grad_stage1.isna().all()


def test_the_report_writes_cells_and_curves_csv_that_read_back_as_load_results(tmp_path: Path) -> None:
    mixed_folder(tmp_path)

    written = write_report(build_report(tmp_path), tmp_path)

    assert tmp_path / "cells.csv" in written and tmp_path / "curves.csv" in written
    table, curves = load_results(tmp_path)
    assert pd.read_csv(tmp_path / "cells.csv", keep_default_na=False, na_values=[""]).id.tolist() == table.id.tolist()
    assert len(pd.read_csv(tmp_path / "curves.csv")) == len(curves)


def test_provenance_comes_from_environment_json_and_the_summaries(tmp_path: Path) -> None:
    mixed_folder(tmp_path)
    results = ResultsFolder(tmp_path)
    files.write_json(results.environment, {"depthlab": "0.1.0", "torch": "2.9.0", "python": "3.12.1", "device": "cpu",
                                           "device_name": "Test CPU", "cuda": None, "git_commit": "0123456789abcdef",
                                           "started_at": "2026-01-01T10:00:00+00:00"})
    for cell_id, ended in (("plain-20-s0", "2026-01-01T10:05:00+00:00"), ("residual-20-s0", "2026-01-01T10:10:00+00:00")):
        summary = files.read_json(results.cell(cell_id).summary)
        files.write_json(results.cell(cell_id).summary, {**summary, "finished_at": ended, "compile_seconds": 2.0})

    record = provenance(tmp_path)
    report = build_report(tmp_path)

    assert record["git_commit"] == "0123456789abcdef" and record["torch"] == "2.9.0" and record["device_name"] == "Test CPU"
    assert record["finished_at"] == "2026-01-01T10:10:00+00:00" and record["wall_seconds"] == 600.0
    assert record["cells_ended"] == 3 and record["cell_train_seconds"] == 3 * 1.0 + 2 * 2.0
    assert report_json(report)["provenance"] == json.loads(json.dumps(record))
    markdown = report_markdown(report)
    assert "## Provenance" in markdown and "commit 0123456789ab" in markdown and "torch 2.9.0" in markdown
    console = Console(record=True, width=400)
    print_report(report, console)
    assert "wall time 10.0 min" in console.export_text()


def test_a_folder_without_environment_json_reports_no_provenance_line(tmp_path: Path) -> None:
    mixed_folder(tmp_path)

    report = build_report(tmp_path)

    assert report_json(report)["provenance"]["git_commit"] is None
    assert "## Provenance" not in report_markdown(report)


def test_report_json_says_on_stderr_which_files_it_wrote_and_keeps_stdout_pure_json(cli, tmp_path: Path) -> None:
    mixed_folder(tmp_path)

    result = cli("report", tmp_path, "--format", "json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "fake"
    for name in ("report.md", "report.csv", "cells.csv", "curves.csv"):
        assert str(tmp_path / name) in result.stderr
