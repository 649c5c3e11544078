"""The last edges: a dataset that tries to run code, an empty class folder, a probe folder that cannot be written,
integers written as floats, a report without curves to label, and worker processes that end during a sweep."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import depthlab.pool as pool_module
from depthlab.config import ConfigError, DataSpec, load_config, parse_config
from depthlab.data import CIFAR10_CLASSES, DataError, load_images, read_dataset
from depthlab.results_folder import ResultsFolder
from depthlab.report import build_report, write_report
from depthlab.attempt import CellOutcome
from depthlab.pool import serve
from depthlab.sweep import exclusive

from .conftest import tiny_sweep, write_config
from .test_data import fake_arrays, write_image_folder, write_python_release
from .test_report import finish, write_sweep

# ----------------------------------------------------------------------------- a python-release batch that runs code


class RunsCommand:
    """Unpickles by calling `function(*args)`: what a hostile data_batch_1 does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def hostile_payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """Each payload that would create `marker`, and the global its pickle names."""
    shell = f"touch {marker}"
    return {
        "os.system": (RunsCommand(os.system, shell), f"{os.system.__module__}.system"),
        "subprocess.call": (RunsCommand(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "builtins.exec": (RunsCommand(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "pathlib.Path.touch": (RunsCommand(Path.touch, marker), "pathlib.Path.touch"),
    }


@pytest.mark.parametrize("payload", ["os.system", "subprocess.call", "builtins.exec", "pathlib.Path.touch"])
@pytest.mark.parametrize("where", ["the whole batch", "inside the labels"])
def test_a_batch_whose_pickle_would_run_code_is_refused_before_anything_runs(tmp_path: Path, payload: str, where: str) -> None:
    write_python_release(tmp_path)
    marker = tmp_path / "ran"
    hostile, named = hostile_payloads(marker)[payload]
    x, _ = fake_arrays(4, 0)
    batch = hostile if where == "the whole batch" else {"data": x.reshape(4, -1), "labels": [0, 1, hostile, 3]}
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    bad.write_bytes(pickle.dumps(batch))

    with pytest.raises(DataError) as err:
        read_dataset(tmp_path, tmp_path / "cache")

    assert not marker.exists(), "the pickle's command ran"
    message = str(err.value)
    assert message.startswith(f"{bad}: ") and f"the global {named}," in message and "\n" not in message


def test_the_sweep_command_refuses_a_hostile_batch_in_one_line_and_writes_nothing(cli, tmp_path: Path) -> None:
    write_python_release(tmp_path / "data", per_batch=20)
    marker = tmp_path / "ran"
    hostile, named = hostile_payloads(marker)["os.system"]
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(hostile))
    config = write_config(tmp_path / "sweep.yaml", tiny_sweep(data={"source": "cifar10", "train_size": 64}))

    result = cli("sweep", config, "--data", tmp_path / "data", "--out", tmp_path / "out")

    assert result.exit_code != 0 and not marker.exists()
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and named in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def numpy1_pickle(value: object) -> bytes:
    """`value` pickled as numpy 1.x wrote it (the published batches): its array globals live in numpy.core."""
    return pickle.dumps(value, protocol=2).replace(b"numpy._core.", b"numpy.core.")


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5, "numpy 1.x"])
def test_a_batch_as_numpy_and_python_write_it_still_loads(tmp_path: Path, protocol) -> None:
    """Every pickle protocol, numpy arrays or lists of numpy or Python ints as labels, and the release's other keys."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    dump = numpy1_pickle if protocol == "numpy 1.x" else lambda value: pickle.dumps(value, protocol=protocol)
    label_forms = [np.asarray, list, lambda y: [int(v) for v in y]]  # an array, numpy scalars, Python ints
    written = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = fake_arrays(10, i)
        written.append((x, y))
        batch = {"batch_label": f"batch {i}", "labels": label_forms[i % 3](y), "data": x.reshape(10, -1),
                 "filenames": [f"{k}.png".encode() for k in range(10)]}
        (folder / name).write_bytes(dump(batch))

    images = read_dataset(tmp_path, tmp_path / "cache")

    assert np.array_equal(images.train_x.numpy(), np.concatenate([x for x, _ in written[:5]]))
    assert np.array_equal(images.train_y.numpy(), np.concatenate([y for _, y in written[:5]]))
    assert np.array_equal(images.test_x.numpy(), written[5][0]) and images.classes == CIFAR10_CLASSES


# ----------------------------------------------------------------------------- an empty class folder


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_class_folder_is_refused_as_cifar10(tmp_path: Path, split: str) -> None:
    root = tmp_path / "imgs"
    write_image_folder(root, per_class=1)
    for image in (root / split / "cat").iterdir():
        image.unlink()

    with pytest.raises(DataError) as err:
        load_images(DataSpec(source="cifar10", path=str(root)), tmp_path / "cache")

    message = str(err.value)
    assert message.startswith(f"{root}: no images in {split}/cat/;") and "train/<class>/ and test/<class>/" in message


def test_every_class_folder_with_images_loads_as_cifar10(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imgs", per_class=1)
    images = load_images(DataSpec(source="cifar10", path=str(tmp_path / "imgs")), tmp_path / "cache")
    assert torch.bincount(images.train_y).tolist() == [1] * 10 and torch.bincount(images.test_y).tolist() == [1] * 10


# ----------------------------------------------------------------------------- probe --out that cannot be written


PROBE = ("probe", "--arch", "plain", "--depth", "8", "--batch-size", "4")


def test_probe_into_a_read_only_folder_is_one_error_line_with_code_1(cli, monkeypatch, tmp_path: Path) -> None:
    def read_only(frame, path, **_) -> None:  # the probe's first write, as a read-only file system answers it, even to root
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", read_only)
    result = cli(*PROBE, "--out", tmp_path / "probe")

    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]  # probe warns of synthetic data
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert f"{tmp_path / 'probe' / 'probe.csv'}: " in result.stderr and os.strerror(errno.EROFS) in result.stderr
    assert "another --out" in result.stderr and "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_probe_into_a_folder_without_write_permission_is_one_error_line(cli, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = cli(*PROBE, "--out", out)
    finally:
        out.chmod(0o755)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]  # probe warns of synthetic data
    assert result.exit_code == 1 and len(errors) == 1 and errors[0].startswith("error: "), result.output


# ----------------------------------------------------------------------------- integers written as floats


def test_integers_written_as_whole_floats_mean_the_same_cells(tmp_path: Path) -> None:
    """Accepted on purpose: YAML 1.2 reads 64e3 as a float, so `iterations: 64e3` must work, and 32.0 is the same number."""
    as_floats = load_config(write_config(tmp_path / "f.yaml", tiny_sweep(
        train={"epochs": 2.0, "milestones": [1.0], "batch_size": 32.0}, grid={"arch": "plain", "depth": 8.0, "seed": 1.0})))
    as_ints = load_config(write_config(tmp_path / "i.yaml", tiny_sweep(
        train={"epochs": 2, "milestones": [1], "batch_size": 32}, grid={"arch": "plain", "depth": 8, "seed": 1})))

    cell = as_floats.cells[0]
    assert (cell.depth, cell.seed, cell.train.batch_size, cell.train.epochs) == (8, 1, 32, 2)
    assert all(type(v) is int for v in (cell.depth, cell.seed, cell.train.batch_size, cell.train.epochs, *cell.train.milestones))
    assert [c.fingerprint() for c in as_floats.cells] == [c.fingerprint() for c in as_ints.cells]
    assert [c.id for c in as_floats.cells] == ["plain-8-s1"]


@pytest.mark.parametrize(("section", "key", "value"), [("train", "batch_size", 32.5), ("grid", "depth", 8.5),
                                                        ("grid", "seed", 0.5), ("train", "epochs", float("inf"))])
def test_a_fractional_float_for_an_integer_is_a_type_error_naming_file_and_key(tmp_path: Path, section: str, key: str,
                                                                               value: float) -> None:
    config = tiny_sweep()
    config[section] = {**config[section], key: value}
    path = write_config(tmp_path / "mine.yaml", config)

    with pytest.raises(ConfigError) as err:
        load_config(path)

    assert (err.value.source, err.value.key) == (str(path), f"{section}.{key}")
    assert err.value.message.startswith("expected an integer"), err.value.message


# ----------------------------------------------------------------------------- a report with nothing to label


def write_dynamics(results: Path, cell_id: str, with_branches: bool) -> None:
    columns = {"epoch": [1, 2], "grad_norm/stem": [0.1, 0.1], "grad_norm/stage1": [0.2, 0.1], "grad_norm/classifier": [0.4, 0.3]}
    if with_branches:
        columns["branch_ratio/stage1"] = [1.2, 1.1]
    pd.DataFrame(columns).to_csv(ResultsFolder(results).cell(cell_id).dynamics, index=False)


@pytest.mark.parametrize("ran", ["plain only", "residual only", "no branch sizes"])
def test_a_small_report_draws_no_empty_legend_and_writes_nothing_to_stderr(cli, tmp_path: Path, ran: str) -> None:
    archs = {"plain only": ["plain"], "residual only": ["residual"], "no branch sizes": ["plain", "residual"]}[ran]
    cells = write_sweep(tmp_path, {"name": "small", "data": {"source": "synthetic"}, "train": {"epochs": 4},
                                   "grid": {"arch": archs, "depth": [8], "seed": [0]}})
    for cell in cells.values():
        finish(tmp_path, cell, 30.0)
        write_dynamics(tmp_path, cell.id, with_branches=ran != "no branch sizes")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_report(build_report(tmp_path), tmp_path)
    assert ResultsFolder(tmp_path).dynamics_figure in written

    result = cli("report", tmp_path)
    assert result.exit_code == 0 and result.stderr == "", result.stderr


# ----------------------------------------------------------------------------- worker processes that end


def zombie_children() -> list[int]:
    """This process's children that have ended but were not waited for (Linux /proc)."""
    zombies = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(stat.parent.name))
    return zombies


def worker_that_breaks_once(rank, parent_pid, lock, config, cells, out_dir, device, jobs, conn) -> None:
    """A worker without torch work: the sweep's first attempt breaks its worker (as a dead GPU context does), the others train."""
    broke = out_dir / "broke"

    def attempt(index: int) -> CellOutcome:
        if broke.exists():
            return CellOutcome({"id": cells[index].id})
        broke.touch()
        return CellOutcome(None, "CUDA error: an illegal memory access was encountered", "worker")

    serve(conn, attempt)


class ZombieCounter:
    """Counts this process's unreaped children each time a cell ends."""

    def __init__(self):
        self.zombies: list[list[int]] = []

    def cell_started(self, *args) -> None: ...
    def epoch_done(self, *args) -> None: ...
    def epoch_progress(self, *args) -> None: ...

    def cell_ended(self, cell_id, summary, error) -> None:
        time.sleep(0.2)  # a retired worker on its way out has ended before the sweep takes its next step
        self.zombies.append(zombie_children())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_replaced_worker_is_waited_for_while_the_sweep_runs(tmp_path: Path) -> None:
    """A worker retired after a broken GPU context must not stay a zombie until the sweep ends (hours, on a GPU)."""
    config = parse_config(tiny_sweep(grid={"arch": "plain", "depth": 8, "seed": [0, 1, 2, 3]}))
    counter = ZombieCounter()
    with exclusive(tmp_path) as fd:
        pool_module.run_pool(config, config.cells, tmp_path, torch.device("cpu"), 1, counter, fd,
                                   target=worker_that_breaks_once)

    assert (tmp_path / "broke").exists() and len(counter.zombies) == 4
    assert counter.zombies[-1] == [], f"unreaped workers while the sweep still ran: {counter.zombies}"
