"""The sweep end to end: its results folder, resume after a crash or Ctrl-C, conflicts, parallel cells,
the plan, the error messages and the benchmark. Every sweep here is tiny and synthetic, on the CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import depthlab.attempt as attempt_module
from depthlab import files
from depthlab.config import parse_config

from .conftest import tiny_sweep, write_config

CELL_FILES = ("config.json", "metrics.csv", "summary.json", "DONE", "model.pt")
REPORT_FILES = ("report.md", "report.csv", "figure6.png")
ROW_KEYS = {"arch", "depth", "n_seeds", "train_err", "train_err_std", "test_err", "clean_train_err"}
POLL_SECONDS = 0.02
WINDOW_TIMEOUT = 90.0  # generous: a loaded 2-core machine may be slow to start torch


# ----------------------------------------------------------------------------- helpers


def small_sweep(train_size: int = 128, epochs: int = 2, milestones: list[int] | None = None, **grid) -> dict:
    """tiny_sweep with a smaller training set (2 iterations per epoch) and the given grid."""
    return tiny_sweep(data={"source": "synthetic", "train_size": train_size, "test_size": 128},
                      train={"epochs": epochs, "milestones": milestones or [1], "batch_size": 64},
                      grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0], **grid})


def cell_dirs(out: Path) -> dict[str, Path]:
    cells = out / "cells"
    return {p.name: p for p in sorted(cells.iterdir()) if p.is_dir()} if cells.is_dir() else {}


def tree_snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every result file under `root`: its bytes and modification time (ns). Hidden files (the sweep's
    lock, an atomic write's temporary file) are bookkeeping, not results, and are left out."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def metrics_without_seconds(cell_dir: Path) -> pd.DataFrame:
    return pd.read_csv(cell_dir / "metrics.csv").drop(columns=["seconds"])


def depthlab_command() -> list[str]:
    """The installed console script of this virtualenv (or the module, where there is none)."""
    script = Path(sys.executable).with_name("depthlab")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "depthlab.cli"]


def subprocess_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "DEPTHLAB_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def start_sweep(config: Path, out: Path, cache: Path, log: Path, *options: str) -> subprocess.Popen:
    """`depthlab sweep CONFIG --out OUT` in its own process group (as a shell job would be), output to `log`
    (a pipe could fill and block it). SIGINT is reset to its default so that Python turns it into
    KeyboardInterrupt even where these tests were started with SIGINT ignored (a background job)."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*depthlab_command(), "sweep", str(config), "--out", str(out), *options], cwd=out.parent,
                                env=subprocess_env(cache), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ctrl_c(proc: subprocess.Popen) -> None:
    """What Ctrl-C in a terminal does: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


def group_gone(pgid: int, timeout: float = 15.0) -> bool:
    """Whether every process of the group (workers included) has exited within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen) -> None:
    """Kill the sweep and anything it started (idempotent)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftover workers, if any
    except ProcessLookupError:
        pass


def wait_for(condition, proc: subprocess.Popen, what: str, log: Path, timeout: float = WINDOW_TIMEOUT):
    """Poll `condition()` until it returns something truthy. A sweep that finishes first means the timing
    window was missed (skip); one that fails, or never gets there, fails the test with its output."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            if proc.returncode == 0:
                pytest.skip(f"timing window missed: the sweep finished before {what} was seen")
            pytest.fail(f"the sweep exited (code {proc.returncode}) before {what}; its output:\n{log.read_text()}")
        if time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"no {what} within {timeout:.0f}s; the sweep's output:\n{log.read_text()}")
        time.sleep(POLL_SECONDS)


def partial_cells(out: Path) -> list[str]:
    return [name for name, d in cell_dirs(out).items() if (d / "checkpoint.pt").is_file() and not (d / "DONE").is_file()]


def done_cells(out: Path) -> list[str]:
    return [name for name, d in cell_dirs(out).items() if (d / "DONE").is_file()]


# ----------------------------------------------------------------------------- 1. the results folder


def test_a_smoke_sweep_writes_the_results_folder_and_a_json_report(cli, tmp_path: Path) -> None:
    """sweep.yaml, environment.json, every cell's files and the report; `report --format json` reads them back."""
    raw = small_sweep()
    config, out = write_config(tmp_path / "tiny.yaml", raw), tmp_path / "out"

    result = cli("sweep", config, "--out", out)

    assert result.exit_code == 0, result.output
    as_run = parse_config(yaml.safe_load((out / "sweep.yaml").read_text()))
    assert as_run.cells == parse_config(raw).cells  # every cell spelled out: the same cells, ids and fingerprints
    env = files.read_json(out / "environment.json")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    cells = cell_dirs(out)
    assert sorted(cells) == ["plain-8-s0", "residual-8-s0"]
    for name, folder in cells.items():
        missing = [f for f in CELL_FILES if not (folder / f).is_file()]
        assert not missing, f"{name} lacks {missing}"
        assert not (folder / "checkpoint.pt").exists(), "a finished cell keeps no checkpoint"
        summary = files.read_json(folder / "summary.json")
        assert summary["status"] == "finished" and summary["id"] == name and summary["epochs"] == 2
        assert (folder / "DONE").read_text().strip() == summary["fingerprint"] == files.read_json(folder / "config.json")["fingerprint"]
        assert list(pd.read_csv(folder / "metrics.csv").epoch) == [1, 2]
    for report_file in REPORT_FILES:
        assert (out / report_file).stat().st_size > 0, report_file
    assert (out / "figure6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = cli("report", out, "--format", "json")

    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    assert {(r["arch"], r["depth"]) for r in data["rows"]} == {("plain", 8), ("residual", 8)}
    for row in data["rows"]:
        assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
        assert row["n_seeds"] == 1
        assert row["train_err_std"] is None  # one seed has no spread (NaN becomes null)
        final = files.read_json(cells[f"{row['arch']}-8-s0"] / "summary.json")["final"]
        assert row["train_err"] == pytest.approx(final["train_err"])
        assert row["test_err"] == pytest.approx(final["test_err"])
        assert row["clean_train_err"] == pytest.approx(final["clean_train_err"])
    assert {"plain_degrades", "residual_degrades"} <= data["verdict"].keys()
    # A single depth cannot show a trend: the verdict stays undecided rather than guessing.
    assert data["verdict"]["plain_degrades"] is None and data["verdict"]["residual_degrades"] is None


# ----------------------------------------------------------------------------- 2. re-running


def test_rerunning_a_finished_sweep_skips_every_cell(cli, tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "tiny.yaml", small_sweep()), tmp_path / "out"
    assert cli("sweep", config, "--out", out).exit_code == 0
    before = tree_snapshot(out / "cells")

    again = cli("sweep", config, "--out", out)

    assert again.exit_code == 0, again.output
    assert "all 2 cells already finished" in again.stdout
    assert "to train" not in again.stdout
    assert tree_snapshot(out / "cells") == before  # DONE, metrics, weights: same bytes, same mtimes


# ----------------------------------------------------------------------------- 3. interruptions


def test_a_killed_sweep_resumes_where_it_stopped_and_ends_as_if_never_interrupted(
        cli, tmp_path: Path, isolated_cache: Path) -> None:
    """SIGKILL with one cell finished and one mid-training: the rerun keeps the finished cell untouched and
    continues the other from its checkpoint to the very numbers an uninterrupted run of it gives."""
    raw = small_sweep(train_size=256, epochs=6, milestones=[4])
    raw["cells"] = [{"arch": "residual", "depth": 8, "seed": 1}]  # 3 cells of 6 epochs, trained one by one
    config, out = write_config(tmp_path / "sweep.yaml", raw), tmp_path / "out"
    log = tmp_path / "first-run.log"

    proc = start_sweep(config, out, isolated_cache, log)
    try:
        wait_for(lambda: done_cells(out) and partial_cells(out), proc, "a finished cell next to a partial one", log)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL

    finished, partial = done_cells(out), partial_cells(out)
    if not partial:  # the partial cell finished between the last look and the kill
        pytest.skip(f"timing window missed: by the time of the kill no cell was partial (finished: {finished})")
    assert len(partial) == 1, partial
    partial_id = partial[0]
    epochs_before = len(pd.read_csv(out / "cells" / partial_id / "metrics.csv"))
    assert 1 <= epochs_before < 6
    kept = {name: tree_snapshot(out / "cells" / name) for name in finished}
    plan = {r["id"]: r["status"] for r in json.loads(cli("plan", config, "--out", out, "--json").stdout)}
    assert plan[partial_id] == "partial" and all(plan[name] == "finished" for name in finished)

    resumed = cli("sweep", config, "--out", out)

    assert resumed.exit_code == 0, resumed.output
    assert f"{len(finished)} already finished" in resumed.stdout
    assert f"start {partial_id}: 6 epochs (resuming after epoch " in resumed.stdout
    for name in finished:
        assert f"start {name}:" not in resumed.stdout
        assert tree_snapshot(out / "cells" / name) == kept[name], f"{name} was retrained"
    assert sorted(done_cells(out)) == sorted(cell_dirs(out)) and len(cell_dirs(out)) == 3
    metrics = pd.read_csv(out / "cells" / partial_id / "metrics.csv")
    assert list(metrics.epoch) == [1, 2, 3, 4, 5, 6]
    assert list(metrics.iteration) == [4 * e for e in range(1, 7)]

    # The same cell, trained in one go in another folder.
    arch, _, seed = partial_id.split("-")
    alone = small_sweep(train_size=256, epochs=6, milestones=[4], arch=[arch], seed=[int(seed[1:])])
    reference = tmp_path / "reference"
    assert cli("sweep", write_config(tmp_path / "alone.yaml", alone), "--out", reference).exit_code == 0
    pd.testing.assert_frame_equal(metrics_without_seconds(out / "cells" / partial_id),
                                  metrics_without_seconds(reference / "cells" / partial_id), check_exact=True)
    resumed_summary = files.read_json(out / "cells" / partial_id / "summary.json")
    reference_summary = files.read_json(reference / "cells" / partial_id / "summary.json")
    assert resumed_summary["final"] == reference_summary["final"]
    assert resumed_summary["fingerprint"] == reference_summary["fingerprint"]


def test_ctrl_c_stops_the_sweep_with_code_130_and_says_how_to_resume(cli, tmp_path: Path, isolated_cache: Path) -> None:
    raw = small_sweep(train_size=256, epochs=6, milestones=[4])
    config, out = write_config(tmp_path / "sweep.yaml", raw), tmp_path / "out"
    log = tmp_path / "run.log"

    proc = start_sweep(config, out, isolated_cache, log)
    try:
        wait_for(lambda: partial_cells(out), proc, "a checkpoint", log)
        ctrl_c(proc)
        code = proc.wait(timeout=60)
    finally:
        stop(proc)
    output = log.read_text()

    assert code == 130, output
    assert "run the same command again" in output
    assert "Traceback" not in output
    plan = json.loads(cli("plan", config, "--out", out, "--json").stdout)
    statuses = [row["status"] for row in plan]
    assert "partial" in statuses and "finished" not in statuses, statuses  # the checkpoint is kept for the rerun


def test_ctrl_c_with_two_jobs_stops_the_workers_too(tmp_path: Path, isolated_cache: Path) -> None:
    """Ctrl-C reaches the workers as well (one process group): they leave it to the sweep, which ends
    them, exits 130 with its message and no traceback, and leaves no worker behind."""
    raw = small_sweep(train_size=256, epochs=6, milestones=[4])
    config, out = write_config(tmp_path / "sweep.yaml", raw), tmp_path / "out"
    log = tmp_path / "run.log"

    proc = start_sweep(config, out, isolated_cache, log, "--jobs", "2")
    try:
        wait_for(lambda: partial_cells(out), proc, "a checkpoint", log)
        ctrl_c(proc)
        code = proc.wait(timeout=60)
        workers_gone = group_gone(proc.pid)
    finally:
        stop(proc)
    output = log.read_text()

    assert code == 130, output
    assert "run the same command again" in output
    assert workers_gone, "worker processes outlived the interrupted sweep"
    assert not done_cells(out)
    assert "Traceback" not in output


# ----------------------------------------------------------------------------- 4. changed recipes


def test_a_changed_recipe_is_refused_unless_forced_and_forcing_keeps_the_old_results(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "sweep.yaml", small_sweep(epochs=2))
    assert cli("sweep", config, "--out", out).exit_code == 0
    old = tree_snapshot(out)
    old_fingerprints = {name: (d / "DONE").read_text() for name, d in cell_dirs(out).items()}

    write_config(config, small_sweep(epochs=3))  # same name, same folder, one more epoch
    refused = cli("sweep", config, "--out", out)

    assert refused.exit_code == 2, refused.output
    assert "--force" in refused.stderr
    assert tree_snapshot(out) == old, "a refused sweep must not touch the old results"

    no_gpu = cli("sweep", config, "--out", out, "--force", "--device", "cuda")
    assert no_gpu.exit_code == 2
    assert tree_snapshot(out) == old, "a forced sweep that cannot start must not move the old results"

    forced = cli("sweep", config, "--out", out, "--force")

    assert forced.exit_code == 0, forced.output
    assert "moved stale results to" in forced.stdout
    moved = sorted((out / "superseded").iterdir())
    assert sorted(p.name.rsplit("-", 1)[0] for p in moved) == sorted(old_fingerprints)
    for folder in moved:
        name = folder.name.rsplit("-", 1)[0]
        assert (folder / "DONE").read_text() == old_fingerprints[name]
        assert (folder / "metrics.csv").read_bytes() == old[f"cells/{name}/metrics.csv"][0]
    for name, folder in cell_dirs(out).items():
        assert list(pd.read_csv(folder / "metrics.csv").epoch) == [1, 2, 3]
        assert (folder / "DONE").read_text() != old_fingerprints[name]
        assert files.read_json(folder / "summary.json")["train"]["epochs"] == 3


def test_adding_a_seed_is_not_a_conflict_and_trains_only_the_new_cells(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "sweep.yaml", small_sweep())
    assert cli("sweep", config, "--out", out).exit_code == 0
    before = {name: tree_snapshot(d) for name, d in cell_dirs(out).items()}

    write_config(config, small_sweep(seed=[0, 1]))
    grown = cli("sweep", config, "--out", out)

    assert grown.exit_code == 0, grown.output
    assert "2 cell(s) to train" in grown.stdout and "2 already finished" in grown.stdout
    assert sorted(done_cells(out)) == ["plain-8-s0", "plain-8-s1", "residual-8-s0", "residual-8-s1"]
    for name, snapshot in before.items():
        assert tree_snapshot(out / "cells" / name) == snapshot, f"{name} was retrained"
    assert not (out / "superseded").exists()


# ----------------------------------------------------------------------------- 5. cells in parallel


def test_two_jobs_train_every_cell_in_worker_processes_with_the_same_results(cli, tmp_path: Path) -> None:
    """Workers run with fewer CPU threads each, which may change float rounding. Measured here: identical
    numbers at this size (128 images, 2 epochs); at 256 images and 3 epochs losses moved by up to 1e-3
    and errors by one image. So: losses within 1e-3 and errors within one image, epoch by epoch."""
    config = write_config(tmp_path / "sweep.yaml", small_sweep(seed=[0, 1]))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"

    one = cli("sweep", config, "--out", serial, "--jobs", "1")
    two = cli("sweep", config, "--out", parallel, "--jobs", "2")

    assert one.exit_code == 0, one.output
    assert two.exit_code == 0, two.output
    assert "4 cell(s) to train" in two.stdout and "2 at a time" in two.stdout
    assert "1 at a time" in one.stdout
    assert sorted(done_cells(parallel)) == sorted(done_cells(serial)) and len(done_cells(parallel)) == 4
    one_image = 100.0 / 128  # in % of the 128 training (or test) images
    for name in done_cells(serial):
        a = files.read_json(serial / "cells" / name / "summary.json")
        b = files.read_json(parallel / "cells" / name / "summary.json")
        assert a["fingerprint"] == b["fingerprint"] and a["iterations"] == b["iterations"] == 4
        for key in ("train_loss", "test_loss", "clean_train_loss"):
            assert b["final"][key] == pytest.approx(a["final"][key], abs=1e-3), (name, key)
        for key in ("train_err", "test_err", "clean_train_err"):
            assert abs(b["final"][key] - a["final"][key]) <= one_image + 1e-9, (name, key)
        ma, mb = metrics_without_seconds(serial / "cells" / name), metrics_without_seconds(parallel / "cells" / name)
        assert list(mb.epoch) == list(ma.epoch) == [1, 2] and list(mb.lr) == list(ma.lr)
        assert (mb[["train_loss", "test_loss"]] - ma[["train_loss", "test_loss"]]).abs().max().max() <= 1e-3, name
        assert (mb[["train_err", "test_err"]] - ma[["train_err", "test_err"]]).abs().max().max() <= one_image + 1e-9, name


# ----------------------------------------------------------------------------- 6. the plan


def test_plan_lists_cells_with_their_size_and_status(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", small_sweep())
    out = tmp_path / "out"

    before = cli("plan", config, "--out", out, "--json")

    assert before.exit_code == 0, before.output
    rows = json.loads(before.stdout)
    assert [(r["arch"], r["depth"], r["seed"]) for r in rows] == [("plain", 8, 0), ("residual", 8, 0)]
    for row in rows:
        assert row["params"] == 75290 and row["macs"] == 12239488 and row["status"] == "pending"
    assert not out.exists(), "planning writes nothing"

    assert cli("sweep", config, "--out", out).exit_code == 0
    after = json.loads(cli("plan", config, "--out", out, "--json").stdout)
    assert [r["status"] for r in after] == ["finished", "finished"]


def test_plan_counts_the_papers_resnet_20_parameters(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", small_sweep(depth=[20]))
    rows = {r["id"]: r for r in json.loads(cli("plan", config, "--out", tmp_path / "out", "--json").stdout)}
    assert rows["residual-20-s0"]["params"] == 269722  # 0.27M in He et al. 2015, Table 6
    assert rows["plain-20-s0"]["params"] == 269722  # option-A shortcuts add no parameters
    assert rows["residual-20-s0"]["macs"] == rows["plain-20-s0"]["macs"] > 40e6


def test_plan_estimate_times_each_model_and_projects_the_sweep(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", small_sweep(depth=[8, 14]))
    result = cli("plan", config, "--out", tmp_path / "out", "--estimate", "--json")
    assert result.exit_code == 0, result.output
    seconds = {r["id"]: r["estimated_seconds"] for r in json.loads(result.stdout)}
    assert sorted(seconds) == ["plain-14-s0", "plain-8-s0", "residual-14-s0", "residual-8-s0"]
    assert all(s > 0 for s in seconds.values())
    text = cli("plan", config, "--out", tmp_path / "out", "--estimate")
    assert "estimated wall time" in text.stdout


# ----------------------------------------------------------------------------- 7. errors


def test_data_override_on_a_synthetic_sweep_is_a_user_error(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", small_sweep())
    result = cli("sweep", config, "--out", tmp_path / "out", "--data", tmp_path / "cifar")
    assert result.exit_code == 2
    assert "--data does not apply" in result.stderr and "synthetic" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_cuda_without_a_gpu_is_a_user_error_not_a_traceback(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", small_sweep())
    result = cli("sweep", config, "--out", tmp_path / "out", "--device", "cuda")  # an exception would escape here
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "cells").exists() and not (tmp_path / "out" / "sweep.yaml").exists()


def test_a_cell_that_crashes_is_recorded_and_the_others_still_finish(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "sweep.yaml", small_sweep(seed=[0, 1]))
    out = tmp_path / "out"
    real_train_cell = attempt_module.train_cell

    def flaky(cell, *args, **kwargs):
        if cell.id == "plain-8-s1":
            raise ValueError("injected failure for the test")
        return real_train_cell(cell, *args, **kwargs)

    monkeypatch.setattr(attempt_module, "train_cell", flaky)
    result = cli("sweep", config, "--out", out, "--jobs", "1")

    assert result.exit_code == 1, result.output
    assert "1 cell(s) failed" in result.stderr and "plain-8-s1" in result.stderr
    log = (out / "cells" / "plain-8-s1" / "error.txt").read_text()
    assert "ValueError: injected failure for the test" in log and "Traceback" in log
    assert sorted(done_cells(out)) == ["plain-8-s0", "residual-8-s0", "residual-8-s1"]
    report = json.loads(cli("report", out, "--format", "json").stdout)
    assert {"id": "plain-8-s1", "status": "failed", "state": "failed", "epochs_done": 0, "epochs_total": 2} in report["missing"]

    monkeypatch.setattr(attempt_module, "train_cell", real_train_cell)
    retry = cli("sweep", config, "--out", out)
    assert retry.exit_code == 0, retry.output
    assert "1 cell(s) to train" in retry.stdout and "3 already finished" in retry.stdout
    assert (out / "cells" / "plain-8-s1" / "DONE").is_file()


# ----------------------------------------------------------------------------- 8. the benchmark


def test_bench_reports_positive_throughputs_and_speedups_as_json(cli) -> None:
    result = cli("bench", "--depth", "8", "--steps", "3", "--warmup", "1", "--jobs", "2", "--batch-size", "32",
                 "--loader-workers", "0", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("common_way", "single_cell", "concurrent", "single_cell_speedup", "concurrent_speedup"):
        value = data[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert data["jobs"] == 2 and data["device"] == "cpu" and data["model"] == "residual-8"
    assert data["single_cell_speedup"] == pytest.approx(data["single_cell"] / data["common_way"])


# ----------------------------------------------------------------------------- 9. reports without results


def test_report_on_a_folder_without_results_says_to_run_a_sweep_first(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("report", empty)
    assert result.exit_code == 2
    assert "run `depthlab sweep" in result.stderr
    assert not (empty / "report.md").exists()

    (empty / "cells").mkdir()
    assert cli("report", empty).exit_code == 2

    monkeypatch.chdir(tmp_path)  # no results/ here: the default folder is missing too
    default = cli("report")
    assert default.exit_code == 2 and "run `depthlab sweep" in default.stderr
