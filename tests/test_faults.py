"""Process faults: workers that never outlive their sweep, never quit while cells are queued, never write
where they should not; a dead device context, a full disk or a read-only folder end cleanly."""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import depthlab.pool as pool_module
from depthlab import files
from depthlab.config import parse_config
from depthlab.attempt import CellOutcome, classify_error, retry_policy
from depthlab.errors import StorageError, SweepConflict
from depthlab.pool import SharedLock, serve
from depthlab.sweep import exclusive

from .conftest import write_config
from .test_sweep import (cell_dirs, done_cells, group_gone, metrics_without_seconds, partial_cells, small_sweep, start_sweep,
                         stop, tree_snapshot, wait_for)

SPAWN = torch.multiprocessing.get_context("spawn")


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(f"{files.TEMP_PREFIX}*{files.TEMP_SUFFIX}"))


# ----------------------------------------------------------------------------- 1. orphaned workers


def test_killing_the_sweep_process_ends_its_workers_at_once_and_a_rerun_ends_as_if_never_killed(
        cli, tmp_path: Path, isolated_cache: Path) -> None:
    """kill -9 of the parent of a --jobs 2 sweep, at random moments while cells train: its workers die with it,
    nothing in the results folder changes afterwards, and the reruns end with the numbers of an uninterrupted run."""
    raw = small_sweep(train_size=256, epochs=6, milestones=[4], seed=[0, 1])  # 4 cells of 6 epochs, 4 iterations each
    config, out = write_config(tmp_path / "sweep.yaml", raw), tmp_path / "out"
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    kills = 0
    for attempt in range(2):
        log = tmp_path / f"run-{attempt}.log"
        proc = start_sweep(config, out, isolated_cache, log, "--jobs", "2")
        try:
            wait_for(lambda: "start " in log.read_text(), proc, "a cell starting", log)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is not None:
                break  # the sweep finished first: nothing left to interrupt
            os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must notice by themselves
            proc.wait(timeout=30)
            at_kill = tree_snapshot(out)
            workers_gone = group_gone(proc.pid, timeout=5.0)  # generous for a loaded machine; PDEATHSIG is immediate
        finally:
            stop(proc)
        kills += 1
        assert workers_gone, f"workers outlived their killed sweep (random seed {seed})"
        assert tree_snapshot(out) == at_kill, f"a file changed after the sweep was killed (random seed {seed})"
        for name, folder in cell_dirs(out).items():
            assert not ((folder / "DONE").is_file() and (folder / "checkpoint.pt").exists()), name
    assert kills, "the sweep finished before the first kill: make its cells longer"

    rerun = cli("sweep", config, "--out", out, "--jobs", "2")
    reference = tmp_path / "reference"
    uninterrupted = cli("sweep", config, "--out", reference, "--jobs", "2")

    assert rerun.exit_code == 0 and uninterrupted.exit_code == 0, rerun.output + uninterrupted.output
    assert sorted(done_cells(out)) == sorted(cell_dirs(reference)) and len(done_cells(out)) == 4
    assert not partial_cells(out) and not temp_files(out), "killed writes left litter behind"
    for name in done_cells(reference):
        pd.testing.assert_frame_equal(metrics_without_seconds(out / "cells" / name), metrics_without_seconds(reference / "cells" / name),
                                      check_exact=True, obj=f"{name} metrics (random seed {seed})")
        resumed, straight = (files.read_json(root / "cells" / name / "summary.json") for root in (out, reference))
        assert resumed["final"] == straight["final"], name
        assert resumed["cpu_threads"] == straight["cpu_threads"] == max(1, (os.cpu_count() or 1) // 2)


def _hold_lock(lock: SharedLock) -> None:
    time.sleep(120)


def test_a_worker_keeps_the_folder_locked_after_the_sweep_process_let_go(tmp_path: Path) -> None:
    """The lock is shared with each worker: a second sweep is refused while any worker lives, and let in after."""
    with exclusive(tmp_path) as fd:
        holder = SPAWN.Process(target=_hold_lock, args=(SharedLock(fd),), daemon=True)
        holder.start()
    try:
        with pytest.raises(SweepConflict, match="another depthlab sweep is running"):
            with exclusive(tmp_path):
                pass
    finally:
        holder.kill()
        holder.join()
    with exclusive(tmp_path):  # the last holder is gone: the folder is free again
        pass


# ----------------------------------------------------------------------------- 2. temp-file litter


def test_stale_temporary_files_are_those_the_atomic_writer_leaves_and_only_those(tmp_path: Path, monkeypatch) -> None:
    files.save_torch(tmp_path / "checkpoint.pt", {"epoch": 1})
    files.write_text(tmp_path / "metrics.csv", "epoch\n1\n")
    (tmp_path / ".lock").touch()
    monkeypatch.setattr(os, "unlink", lambda path: None)  # a killed writer never gets to clean up
    for name in ("checkpoint.pt", "model.pt"):
        with pytest.raises(Exception):
            files.save_torch(tmp_path / name, lambda: "unpicklable")
    monkeypatch.undo()
    left = temp_files(tmp_path)
    assert len(left) == 2

    removed = files.remove_temp_files(tmp_path)

    assert removed == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint.pt", "metrics.csv"]
    assert torch.load(tmp_path / "checkpoint.pt") == {"epoch": 1}


def test_a_restarted_cell_removes_the_temporary_files_of_killed_writes(cli, tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "sweep.yaml", small_sweep()), tmp_path / "out"
    litter = out / "cells" / "plain-8-s0" / ".checkpoint.pt.k1ll3d.tmp"
    litter.parent.mkdir(parents=True)
    litter.touch()

    assert cli("sweep", config, "--out", out, "--jobs", "1").exit_code == 0

    assert not litter.exists() and not temp_files(out)


# ----------------------------------------------------------------------------- 3. results and --jobs


def test_each_summary_records_the_cpu_threads_that_trained_it(cli, tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "sweep.yaml", small_sweep(arch=["plain"])), tmp_path / "out"
    assert cli("sweep", config, "--out", out, "--jobs", "1").exit_code == 0
    assert files.read_json(out / "cells" / "plain-8-s0" / "summary.json")["cpu_threads"] == torch.get_num_threads()


# ----------------------------------------------------------------------------- 4. full disk, read-only folder


def fail_writes(monkeypatch: pytest.MonkeyPatch, code: int, when) -> None:
    """The atomic writer raises OSError(code) for each path where `when(path)` is true."""
    real = files._atomic

    def failing(path: Path, write) -> None:
        if when(path):
            raise OSError(code, os.strerror(code))
        real(path, write)

    monkeypatch.setattr(files, "_atomic", failing)


def test_a_full_disk_is_one_error_line_with_code_1_and_the_last_checkpoint_is_kept(cli, tmp_path: Path, monkeypatch) -> None:
    config, out = write_config(tmp_path / "sweep.yaml", small_sweep(arch=["plain"], epochs=3, milestones=[2])), tmp_path / "out"
    cell = out / "cells" / "plain-8-s0"
    second_checkpoint = lambda path: path.name == "checkpoint.pt" and len(pd.read_csv(path.parent / "metrics.csv")) == 2  # noqa: E731
    fail_writes(monkeypatch, errno.ENOSPC, second_checkpoint)  # the disk fills up during the second epoch

    full = cli("sweep", config, "--out", out, "--jobs", "1")

    assert full.exit_code == 1, full.output
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0], full.stderr
    assert "run the same command again" in lines[0] and "Traceback" not in full.output
    assert torch.load(cell / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 1
    assert not (cell / "error.txt").exists() and not temp_files(out)

    monkeypatch.undo()
    resumed = cli("sweep", config, "--out", out, "--jobs", "1")
    assert resumed.exit_code == 0, resumed.output
    assert list(pd.read_csv(cell / "metrics.csv").epoch) == [1, 2, 3]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_results_folder_that_cannot_be_written_is_one_error_line(cli, tmp_path: Path, monkeypatch, code: int) -> None:
    config, out = write_config(tmp_path / "sweep.yaml", small_sweep()), tmp_path / "out"
    fail_writes(monkeypatch, code, lambda path: True)

    result = cli("sweep", config, "--out", out)

    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and os.strerror(code) in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_results_folder_is_one_error_line(cli, tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "sweep.yaml", small_sweep()), tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = cli("sweep", config, "--out", out)
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.output


# ----------------------------------------------------------------------------- 5. workers that quit early


class FakePipe:
    """A worker's end of its pipe: what the parent sent, in order, and what the worker sent back."""

    def __init__(self, incoming: list):
        self.incoming, self.sent = list(incoming), []

    def recv(self):
        return self.incoming.pop(0)

    def send(self, message) -> None:
        self.sent.append(message)


def test_a_worker_trains_every_cell_it_is_sent_until_its_stop_sentinel() -> None:
    pipe = FakePipe([0, 1, 2, None, 3])

    serve(pipe, lambda index: CellOutcome({"id": index}))

    assert [m[1] for m in pipe.sent if m[0] == "ended"] == [0, 1, 2]
    assert pipe.incoming == [3], "nothing is read after the sentinel"


def test_a_worker_whose_device_context_died_takes_no_more_cells() -> None:
    pipe = FakePipe([0, 1, 2])
    serve(pipe, lambda index: CellOutcome(None, "CUDA error", "worker" if index == 1 else None))
    assert [m[1] for m in pipe.sent if m[0] == "ended"] == [0, 1] and pipe.incoming == [2]


# ----------------------------------------------------------------------------- 6. sticky device errors


@pytest.mark.parametrize("err, fault", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "worker"),
    (RuntimeError("CUDA error: device-side assert triggered"), "worker"),
    (torch.AcceleratorError("CUDA error: unspecified launch failure") if hasattr(torch, "AcceleratorError") else
     RuntimeError("CUDA error: unspecified launch failure"), "worker"),
    (OSError(errno.ENOSPC, "No space left on device"), "storage"),
    (PermissionError(errno.EACCES, "Permission denied"), "storage"),
    (OSError(errno.EROFS, "Read-only file system"), "storage"),
    (FileNotFoundError(errno.ENOENT, "No such file"), "cell"),
    (ValueError("bad recipe"), "cell"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "cell"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cell"),
])
def test_errors_are_classified_by_what_they_leave_unusable(err: BaseException, fault: str) -> None:
    assert classify_error(err) == fault


def test_a_cell_that_kills_its_worker_is_retried_twice_then_recorded() -> None:
    dead = CellOutcome(None, "AcceleratorError: CUDA error", "worker")
    assert [retry_policy(dead, attempts) for attempts in (1, 2, 3)] == ["retry", "retry", "record"]
    assert retry_policy(CellOutcome(None, "ValueError: x", "cell"), 1) == "record"
    assert retry_policy(CellOutcome({"id": "a"}), 1) == "record"
    assert retry_policy(CellOutcome(None, "disk full", "storage"), 1) == "stop"


CELLS = [cell.id for cell in parse_config(small_sweep(arch=["plain"], seed=list(range(12)))).cells]
FATE = {CELLS[0]: ["worker", None], CELLS[1]: ["worker"] * 3, CELLS[2]: ["exit", None]}  # each attempt's fate; other cells train
FILLS_THE_DISK = {CELLS[0]: ["storage"]}


def fake_worker(rank, parent_pid, lock, config, cells, out_dir, device, jobs, conn) -> None:
    """A worker without torch work: attempt k at a cell does what its fate list (FATE, or FILLS_THE_DISK when
    the folder is named so) says at k, counted in a file per cell: fail with a fault, crash, or train."""
    fates = FILLS_THE_DISK if out_dir.name == "full" else FATE

    def attempt(index: int) -> CellOutcome:
        name = cells[index].id
        tally = out_dir / f"{name}.attempts"
        done = len(tally.read_text()) if tally.exists() else 0
        tally.write_text("x" * (done + 1))
        fate = fates.get(name, [None])[done]
        if fate == "exit":
            os._exit(3)  # as a segfault or the OOM killer would end it: no word to the parent
        if fate is None:
            return CellOutcome({"id": name})
        return CellOutcome(None, f"{fate} fault in {name}", fate)

    serve(conn, attempt)


class Recorder:
    def __init__(self):
        self.ended: list[tuple[str, bool]] = []

    def sweep_started(self, start) -> None: ...
    def cell_started(self, cell_id, total_epochs, done_epochs) -> None: ...
    def epoch_done(self, cell_id, row) -> None: ...

    def cell_ended(self, cell_id, summary, error) -> None:
        self.ended.append((cell_id, error is None))


def run_fake_sweep(jobs: int, out: Path) -> Recorder:
    recorder = Recorder()
    config = parse_config(small_sweep(arch=["plain"], seed=list(range(12))))
    with exclusive(out) as fd:
        pool_module.run_pool(config, config.cells, out, torch.device("cpu"), jobs, recorder, fd, target=fake_worker)
    return recorder


def attempts(out: Path) -> dict[str, int]:
    return {p.name.removesuffix(".attempts"): len(p.read_text()) for p in out.glob("*.attempts")}


def test_cells_that_kill_or_crash_their_worker_are_retried_on_fresh_workers_and_every_cell_ends_once(tmp_path: Path) -> None:
    """Cell 0 kills its worker once, cell 1 every time, cell 2 crashes its worker once; nine others just train."""
    recorder = run_fake_sweep(jobs=3, out=tmp_path / "out")

    assert sorted(recorder.ended) == sorted((c, c != CELLS[1]) for c in CELLS)
    assert attempts(tmp_path / "out") == {**{c: 1 for c in CELLS}, CELLS[0]: 2, CELLS[2]: 2, CELLS[1]: 3}


def test_a_storage_fault_in_a_worker_stops_the_sweep(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=f"storage fault in {CELLS[0]}"):
        run_fake_sweep(jobs=2, out=tmp_path / "full")
