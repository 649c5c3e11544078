"""The published cifar-10-python.tar.gz read as it is downloaded: no unpacking, its MD5 checked against the published one."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import torch

from depthlab import data as data_module
from depthlab.data import CIFAR10_CLASSES, DataError, read_dataset

from .test_data import write_python_release


def release_tarball(tmp_path: Path) -> tuple[Path, tuple]:
    """A tiny stand-in for cifar-10-python.tar.gz: cifar-10-batches-py/ with data_batch_1..5 and test_batch, gzipped."""
    arrays = write_python_release(tmp_path / "unpacked")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "unpacked" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tarball, arrays


def published_as(monkeypatch: pytest.MonkeyPatch, tarball: Path) -> None:
    """Make the fake tarball's checksum the 'published' one (the real file is 170 MB and not in the tests)."""
    monkeypatch.setattr(data_module, "CIFAR10_PYTHON_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())


def test_the_published_checksum_is_torchvisions() -> None:
    assert data_module.CIFAR10_PYTHON_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_the_python_release_tarball_is_read_without_unpacking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball, (train_x, train_y, test_x, test_y) = release_tarball(tmp_path)
    published_as(monkeypatch, tarball)

    images = read_dataset(tarball, tmp_path / "cache")

    assert torch.equal(images.train_x, torch.from_numpy(train_x)) and torch.equal(images.train_y, torch.from_numpy(train_y))
    assert torch.equal(images.test_x, torch.from_numpy(test_x)) and torch.equal(images.test_y, torch.from_numpy(test_y))
    assert images.classes == CIFAR10_CLASSES


def test_a_tarball_whose_md5_is_not_the_published_one_is_refused_naming_both(tmp_path: Path) -> None:
    tarball, _ = release_tarball(tmp_path)  # its MD5 is its own, not the published release's

    with pytest.raises(DataError) as err:
        read_dataset(tarball, tmp_path / "cache")

    message = str(err.value)
    assert str(tarball) in message and hashlib.md5(tarball.read_bytes()).hexdigest() in message
    assert "c58f30108f718f92721af3b95e74349a" in message and "re-download" in message and "\n" not in message
    assert not (tmp_path / "cache" / "decoded").exists() or not any((tmp_path / "cache" / "decoded").iterdir())


def test_a_release_tarball_missing_a_batch_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_python_release(tmp_path / "unpacked")
    (tmp_path / "unpacked" / "cifar-10-batches-py" / "data_batch_3").unlink()
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "unpacked" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    published_as(monkeypatch, tarball)

    with pytest.raises(DataError, match=r"missing cifar-10-batches-py/data_batch_3"):
        read_dataset(tarball, tmp_path / "cache")


def test_a_batch_in_the_tarball_that_names_a_foreign_global_is_refused_unrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allow-listed unpickler reads the archive's members too: a pickle that calls os.system is never run."""
    write_python_release(tmp_path / "unpacked")
    marker = tmp_path / "ran"
    evil = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    (tmp_path / "unpacked" / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "unpacked" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    published_as(monkeypatch, tarball)

    with pytest.raises(DataError, match=r"names the global os\.system"):
        read_dataset(tarball, tmp_path / "cache")
    assert not marker.exists()
