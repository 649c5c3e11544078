"""The report, specified on fake result folders whose numbers each test chooses."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

from depthlab import files
from depthlab.config import Cell, parse_config
from depthlab.results_folder import METRIC_COLUMNS, CellFolder, ResultsFolder, Summary
from depthlab.report import ReportError, build_report, print_report, report_json, write_report

EPOCHS, ITERS_PER_EPOCH = 4, 100


# ----------------------------------------------------------------------------- fixture helpers


def sweep(source: str = "cifar10", **grid) -> dict:
    """A small sweep document on `source` images; `grid` overrides the grid's options."""
    return {"name": "fake", "data": {"source": source}, "train": {"epochs": EPOCHS},
            "grid": {"arch": ["plain", "residual"], "depth": [20, 56], "seed": [0], **grid}}


def cells_of(raw: dict) -> dict[str, Cell]:
    return {c.id: c for c in parse_config(raw).cells}


def cell(arch: str, depth: int, seed: int = 0, source: str = "cifar10", **options) -> Cell:
    """One cell as the sweep would make it from sweep(source)."""
    raw = {**sweep(source), "grid": None, "cells": [{"arch": arch, "depth": depth, "seed": seed, **options}]}
    return parse_config(raw).cells[0]


def write_sweep(results: Path, raw: dict) -> dict[str, Cell]:
    folder = ResultsFolder(results)
    files.write_text(folder.sweep_file, yaml.safe_dump(raw))
    folder.cells_dir.mkdir(parents=True, exist_ok=True)
    return cells_of(raw)


def metrics_rows(epochs: int, train_err: float, test_err: float) -> list[dict]:
    """Errors falling linearly from 80% to the chosen final values."""
    rows = []
    for e in range(1, epochs + 1):
        f = e / epochs
        rows.append({"epoch": e, "iteration": e * ITERS_PER_EPOCH, "lr": 0.1, "train_loss": 1.0,
                     "train_err": 80 + f * (train_err - 80), "test_loss": 1.0, "test_err": 80 + f * (test_err - 80),
                     "seconds": 1.0})
    return rows


def write_metrics(folder: CellFolder, rows: list[dict]) -> None:
    files.write_text(folder.metrics, pd.DataFrame(rows, columns=list(METRIC_COLUMNS)).to_csv(index=False))


def write_cell_config(folder: CellFolder, c: Cell) -> None:
    """config.json as train_cell writes it, for a training set of ITERS_PER_EPOCH batches."""
    length = c.train.run_length(ITERS_PER_EPOCH * c.train.batch_size)
    files.write_json(folder.config, {**c.to_record(), "fingerprint": c.fingerprint(), "run_length": dataclasses.asdict(length)})


def finish(results: Path, c: Cell, train_err: float, test_err: float | None = None, clean_err: float | None = None,
           status: str = "finished", fingerprint: str | None = None) -> Path:
    """A completed cell folder: config, metrics, summary and DONE."""
    folder = ResultsFolder(results).cell(c.id)
    test_err = train_err + 2 if test_err is None else test_err
    clean_err = train_err - 1 if clean_err is None else clean_err
    write_cell_config(folder, c)
    write_metrics(folder, metrics_rows(EPOCHS, train_err, test_err))
    final = {"train_loss": 0.5, "train_err": train_err, "test_loss": 0.6, "test_err": test_err}
    if status == "finished":
        final.update(clean_train_loss=0.4, clean_train_err=clean_err)
    summary = Summary(**c.to_record(), fingerprint=c.fingerprint(), status=status, params=1000 * c.depth, macs=1, epochs=EPOCHS,
                      iterations=EPOCHS * ITERS_PER_EPOCH, train_seconds=1.0, device_name="cpu", final=final)
    files.write_json(folder.summary, summary)
    folder.mark_done(fingerprint or c.fingerprint())
    return folder.path


def start(results: Path, c: Cell, epochs_done: int) -> Path:
    """An unfinished cell folder: config and some epochs of metrics, no DONE."""
    folder = ResultsFolder(results).cell(c.id)
    write_cell_config(folder, c)
    if epochs_done:
        write_metrics(folder, metrics_rows(epochs_done, 50.0, 50.0))
    return folder.path


def finish_all(results: Path, errors: dict[tuple[str, int], list[float]], source: str = "cifar10") -> None:
    """Finished cells (no sweep.yaml): one per seed, with the chosen final training errors (clean = running − 1)."""
    for (arch, depth), errs in errors.items():
        for seed, err in enumerate(errs):
            finish(results, cell(arch, depth, seed, source), err)


def row(report, arch: str, depth: int, variant: str = "") -> pd.Series:
    r = report.rows
    match = r[(r.arch == arch) & (r.depth == depth) & (r.variant == variant)]
    assert len(match) == 1
    return match.iloc[0]


# ----------------------------------------------------------------------------- rows


def test_rows_are_mean_and_sample_std_over_seeds(tmp_path):
    for seed, (tr, te, cl) in enumerate([(4, 8, 1), (5, 9, 2), (6, 13, 6)]):
        finish(tmp_path, cell("plain", 20, seed), tr, te, cl)
    finish(tmp_path, cell("residual", 20), 3.0)
    report = build_report(tmp_path)

    plain = row(report, "plain", 20)
    assert plain.n_seeds == 3 and plain.n_diverged == 0
    assert plain.train_err == pytest.approx(5) and plain.train_err_std == pytest.approx(1)
    assert plain.test_err == pytest.approx(10) and plain.test_err_std == pytest.approx(pd.Series([8, 9, 13]).std())
    assert plain.clean_train_err == pytest.approx(3) and plain.clean_train_err_std == pytest.approx(pd.Series([1, 2, 6]).std())
    assert plain.params == 20_000 and plain.epochs == EPOCHS and plain.iterations == EPOCHS * ITERS_PER_EPOCH
    single = row(report, "residual", 20)
    assert single.n_seeds == 1 and math.isnan(single.train_err_std)
    assert list(report.rows.columns[:3]) == ["arch", "depth", "variant"]
    assert "val_err" not in report.rows.columns  # no validation split was used


def test_variant_is_the_id_without_arch_depth_and_seed(tmp_path):
    raw = {**sweep(), "grid": None, "cells": [{"arch": "residual", "depth": 20, "seed": 3, "lr": [0.1, 0.05]},
                                              {"arch": "residual", "depth": 20, "seed": 3, "shortcut": "B"}]}
    for c, err in zip(cells_of(raw).values(), (5.0, 6.0, 7.0)):
        finish(tmp_path, c, err)
    report = build_report(tmp_path)
    assert sorted(report.rows.variant) == ["B", "lr=0.05", "lr=0.1"]
    assert row(report, "residual", 20, "lr=0.05").train_err == 6.0
    assert row(report, "residual", 20, "B").train_err == 7.0


def test_curves_average_the_seeds_per_epoch(tmp_path):
    finish(tmp_path, cell("plain", 20, 0), 4.0, 10.0)
    finish(tmp_path, cell("plain", 20, 1), 6.0, 12.0)
    curves = build_report(tmp_path).curves
    last = curves[(curves.arch == "plain") & (curves.depth == 20) & (curves.epoch == EPOCHS)].iloc[0]
    assert last.train_err == pytest.approx(5.0) and last.test_err == pytest.approx(11.0)
    assert last.iteration == EPOCHS * ITERS_PER_EPOCH
    assert len(curves) == EPOCHS


# ----------------------------------------------------------------------------- verdict


FIGURE6 = {("plain", 20): [5.0, 5.2], ("plain", 32): [6.0, 6.1], ("plain", 56): [9.0, 9.3],
           ("residual", 20): [6.0, 6.2], ("residual", 32): [5.0, 5.1], ("residual", 56): [4.0, 4.1]}


def test_reproduced_when_plain_rises_beyond_its_interval_and_residual_stays_within_the_margin(tmp_path):
    finish_all(tmp_path, FIGURE6)
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "reproduced" and verdict["reproduced"] is True
    assert verdict["plain_degrades"] is True and verdict["residual_degrades"] is False
    plain = verdict["details"]["plain"]
    assert plain["depths"] == [20, 32, 56] and plain["n_seeds"] == [2, 2, 2]
    assert plain["train_err"] == pytest.approx([5.1, 6.05, 9.15])  # the running error, kept for the tables
    assert plain["err"] == pytest.approx([4.1, 5.05, 8.15])  # the clean error decides
    assert plain["gap"] == pytest.approx(4.05) and 0 < plain["low"] < plain["gap"] < plain["high"]
    assert plain["spearman"] == pytest.approx(1.0)
    assert verdict["details"]["residual"]["high"] < verdict["margin"]
    assert verdict["cross"]["depth"] == 56 and verdict["cross"]["gap"] == pytest.approx(5.1)
    assert verdict["reason"].startswith("plain nets degrade") and isinstance(verdict["rule"], str)


def test_flat_plain_nets_are_not_reproduced(tmp_path):
    finish_all(tmp_path, {**FIGURE6, ("plain", 32): [5.0, 5.2], ("plain", 56): [5.0, 5.2]})
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "not_reproduced" and verdict["reproduced"] is False
    assert verdict["plain_degrades"] is False
    assert "plain nets do not degrade" in verdict["reason"]


def test_a_gap_within_seed_noise_is_undecided(tmp_path):
    noisy = tmp_path / "noisy"
    finish_all(noisy, {**FIGURE6, ("plain", 20): [3.0, 5.0, 7.0], ("plain", 56): [5.0, 7.0, 9.0]})
    verdict = build_report(noisy).verdict
    assert verdict["details"]["plain"]["gap"] == pytest.approx(2.0)
    assert verdict["plain_degrades"] is None and verdict["outcome"] == "undecided"
    assert "cannot separate" in verdict["reason"] and "plain-20→56" in verdict["reason"]

    tight = tmp_path / "tight"  # the same means with little spread between seeds
    finish_all(tight, {**FIGURE6, ("plain", 20): [4.9, 5.0, 5.1], ("plain", 56): [6.9, 7.0, 7.1]})
    assert build_report(tight).verdict["plain_degrades"] is True


def test_a_single_depth_gives_no_verdict(tmp_path):
    finish_all(tmp_path, {("plain", 20): [5.0, 5.1], ("plain", 56): [9.0, 9.1], ("residual", 20): [5.0, 5.1]})
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "undecided" and verdict["reproduced"] is None
    assert verdict["residual_degrades"] is None and "ResNet need at least two depths" in verdict["reason"]
    assert verdict["details"]["residual"]["depths"] == [20]


def test_variants_stay_out_of_the_verdict(tmp_path):
    finish_all(tmp_path, FIGURE6)
    for seed in (0, 1):
        finish(tmp_path, cell("residual", 56, seed, shortcut="B"), 30.0)
    start(tmp_path, cell("residual", 110, shortcut="B"), epochs_done=1)
    assert build_report(tmp_path).verdict["outcome"] == "reproduced"


# ----------------------------------------------------------------------------- missing cells


def test_unfinished_cells_are_listed_and_left_out_of_the_means(tmp_path):
    expected = write_sweep(tmp_path, sweep(arch=["plain"], seed=[0, 1]))
    assert sorted(expected) == ["plain-20-s0", "plain-20-s1", "plain-56-s0", "plain-56-s1"]
    finish(tmp_path, expected["plain-20-s0"], 5.0)
    start(tmp_path, expected["plain-20-s1"], epochs_done=2)  # its 50% errors must not count
    finish(tmp_path, expected["plain-56-s0"], float("nan"), float("nan"), status="diverged")
    report = build_report(tmp_path)

    assert report.name == "fake"
    by_id = {m["id"]: m for m in report.missing}
    assert by_id == {"plain-20-s1": {"id": "plain-20-s1", "status": "running", "state": "partial", "epochs_done": 2,
                                     "epochs_total": EPOCHS},
                     "plain-56-s0": {"id": "plain-56-s0", "status": "diverged", "state": "diverged", "epochs_done": EPOCHS},
                     "plain-56-s1": {"id": "plain-56-s1", "status": "not started", "state": "pending"}}
    p20 = row(report, "plain", 20)
    assert p20.n_seeds == 1 and p20.train_err == 5.0
    p56 = row(report, "plain", 56)
    assert p56.n_seeds == 0 and p56.n_diverged == 1 and math.isnan(p56.train_err)
    assert set(report.curves.depth) == {20}
    assert report.verdict["plain_degrades"] is None  # only one depth has a finished seed


def test_a_running_cell_set_in_iterations_knows_its_length_in_epochs_from_its_config(tmp_path):
    c = cell("plain", 20, iterations=1000)
    start(tmp_path, c, epochs_done=3)
    assert build_report(tmp_path).missing == [{"id": c.id, "status": "running", "state": "partial", "epochs_done": 3,
                                                "epochs_total": 10}]


def test_a_started_cell_without_metrics_is_running(tmp_path):
    c = cell("plain", 20)
    start(tmp_path, c, epochs_done=0)
    assert build_report(tmp_path).missing == [{"id": c.id, "status": "running", "state": "partial", "epochs_done": 0,
                                                "epochs_total": EPOCHS}]


def test_a_result_of_another_configuration_is_stale(tmp_path):
    expected = write_sweep(tmp_path, sweep(arch=["plain"], depth=[20]))
    finish(tmp_path, expected["plain-20-s0"], 5.0, fingerprint="0123456789abcdef")
    report = build_report(tmp_path)
    assert report.missing == [{"id": "plain-20-s0", "status": "stale", "state": "stale"}]
    assert report.rows.empty


def test_a_cell_whose_last_attempt_crashed_is_failed(tmp_path):
    c = cell("plain", 20)
    folder = start(tmp_path, c, epochs_done=2)
    cell_folder = CellFolder(folder)
    files.write_text(cell_folder.error_log, "Traceback ...\n")
    assert build_report(tmp_path).missing == [{"id": c.id, "status": "failed", "state": "failed", "epochs_done": 2,
                                                "epochs_total": EPOCHS}]
    write_metrics(cell_folder, metrics_rows(3, 40.0, 40.0))  # retried: a newer epoch than the error
    os.utime(cell_folder.error_log, (0, 0))
    assert build_report(tmp_path).missing[0]["status"] == "running"


def test_without_sweep_yaml_only_the_folder_counts(tmp_path):
    finish_all(tmp_path, {("plain", 20): [5.0]})
    report = build_report(tmp_path)
    assert report.name == tmp_path.name
    assert report.missing == []
    assert len(report.rows) == 1


# ----------------------------------------------------------------------------- outputs


@pytest.fixture
def full(tmp_path) -> Path:
    """A sweep of four depths, three seeds, plain degrading and ResNet improving, one cell still running."""
    expected = write_sweep(tmp_path, sweep(depth=[20, 32, 44, 56], seed=[0, 1, 2]))
    for c in expected.values():
        if c.id == "residual-56-s2":
            start(tmp_path, c, epochs_done=1)
            continue
        finish(tmp_path, c, full_error(c), full_error(c) + 3)
    return tmp_path


def full_error(c: Cell) -> float:
    """The `full` sweep's training error of a cell: plain rising 0.08 pp per layer, ResNet falling 0.04."""
    slope = 0.08 if c.arch == "plain" else -0.04
    return 6 + slope * (c.depth - 20) + 0.2 * c.seed


@pytest.fixture
def complete(full) -> Path:
    """The `full` sweep with its running cell finished."""
    c = cell("residual", 56, 2)
    finish(full, c, full_error(c))
    return full


REPORT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # what an environment without torch sees: every import of torch fails
from depthlab.cli import app
app(["report", sys.argv[1], "--format", "json"])
"""


def test_the_report_command_runs_with_torch_unimportable(complete):
    done = subprocess.run([sys.executable, "-c", REPORT_WITHOUT_TORCH, str(complete)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verdict"]["outcome"] == "reproduced"


def test_report_json_is_json_with_the_documented_keys(full):
    data = report_json(build_report(full))
    text = json.dumps(data, allow_nan=False)
    assert set(data) == {"name", "rows", "verdict", "missing", "notes", "ran", "ablations", "provenance"}
    assert {"arch", "depth", "variant", "n_seeds", "train_err", "train_err_std", "clean_train_err",
            "clean_train_err_std", "test_err", "test_err_std", "epochs", "paper_test_err"} <= set(data["rows"][0])
    assert {"plain_degrades", "residual_degrades", "reproduced", "details", "rule"} <= set(data["verdict"])
    assert {"outcome", "reason", "cross", "measure", "seeds_required", "margin", "notes"} <= set(data["verdict"])
    assert data["verdict"]["outcome"] == "undecided" and data["verdict"]["reproduced"] is None
    assert "running: residual-56-s2" in data["verdict"]["reason"]
    assert data["missing"] == [{"id": "residual-56-s2", "status": "running", "state": "partial", "epochs_done": 1,
                                "epochs_total": EPOCHS}]
    assert json.loads(text) == data


def test_report_json_turns_nan_into_null(tmp_path):
    finish_all(tmp_path, {("plain", 20): [5.0]})
    data = report_json(build_report(tmp_path))
    assert data["rows"][0]["train_err_std"] is None
    json.dumps(data, allow_nan=False)


def test_write_report_writes_markdown_csv_and_a_png(full):
    report = build_report(full)
    paths = write_report(report, full)
    assert [p.name for p in paths] == ["report.md", "report.csv", "figure6.png", "verdict.png", "cells.csv", "curves.csv"]
    png = (full / "figure6.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (full / "report.md").read_text()
    assert "| depth |" in md and "**Undecided: " in md and "residual-56-s2" in md and "(figure6.png)" in md
    assert pd.read_csv(full / "report.csv").shape[0] == len(report.rows)


@pytest.mark.parametrize("fmt, magic", [("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_figures_are_also_written_in_the_format_asked_for(full, fmt, magic):
    names = [p.name for p in write_report(build_report(full), full, figure_format=fmt)]
    assert {"figure6.png", f"figure6.{fmt}", "verdict.png", f"verdict.{fmt}"} <= set(names)
    assert (full / f"figure6.{fmt}").read_bytes().startswith(magic)


def test_an_unknown_figure_format_is_refused(full):
    with pytest.raises(ValueError, match="png, svg, pdf"):
        write_report(build_report(full), full, figure_format="gif")


def test_a_complete_sweep_reads_reproduced_with_its_numbers_and_budget(complete):
    write_report(build_report(complete), complete)
    md = (complete / "report.md").read_text()
    assert "**Reproduced: plain nets degrade" in md
    assert "plain-56 − ResNet-56: +4.32 pp" in md  # 8.08 − 3.76 in the clean error (running − 1)
    assert "budget: 400 iterations × 128 = 0.6% of the paper's" in md


def test_write_report_with_one_architecture_missing(tmp_path):
    finish_all(tmp_path, {("plain", 20): [5.0, 5.5], ("plain", 56): [8.0, 8.5]})
    paths = write_report(build_report(tmp_path), tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)
    assert "Undecided" in (tmp_path / "report.md").read_text()


def test_print_report_shows_the_table_verdict_and_missing(full):
    console = Console(record=True, width=240)
    print_report(build_report(full), console)
    text = console.export_text()
    assert "Undecided" in text and "plain train err" in text and "residual-56-s2" in text


def test_print_report_shows_reproduced_once_complete(complete):
    console = Console(record=True, width=240)
    print_report(build_report(complete), console)
    assert "Reproduced: plain nets degrade" in console.export_text()


# ----------------------------------------------------------------------------- errors


def test_no_results_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="depthlab sweep CONFIG") as err:
        build_report(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "cells").mkdir()
    with pytest.raises(ReportError, match="depthlab sweep CONFIG"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="no such folder"):
        build_report(tmp_path / "absent")
