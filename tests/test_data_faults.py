"""Damaged or wrong datasets stop with a DataError naming the file and the problem; they never train silently."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthlab import data as data_module
from depthlab.config import DataSpec
from depthlab.data import CIFAR10_CLASSES, DataError, Normalizer, load_images, pixel_sums, read_dataset

from .test_data import fake_arrays, png, write_image_folder, write_python_release

DAMAGED = "the archive is damaged: .*; re-download or re-create it"


def tar_folder(folder: Path, archive: Path, mode: str) -> Path:
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "imgs", per_class=1)
    return tmp_path / "imgs"


def flip_bytes(path: Path, at: int, count: int = 4) -> None:
    raw = bytearray(path.read_bytes())
    raw[at : at + count] = bytes(b ^ 0xFF for b in raw[at : at + count])
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- archives


@pytest.mark.parametrize("where", ["gzip trailer", "near the end", "middle", "after the gzip header"])
def test_a_tar_gz_with_flipped_bytes_is_reported_as_damaged(image_folder: Path, tmp_path: Path, where: str) -> None:
    archive = tar_folder(image_folder, tmp_path / "data.tar.gz", "w:gz")
    size = archive.stat().st_size
    flip_bytes(archive, {"gzip trailer": size - 8, "near the end": size - 30, "middle": size // 2, "after the gzip header": 40}[where])
    with pytest.raises(DataError, match=f"^{archive}: {DAMAGED}"):
        read_dataset(archive, tmp_path / "cache")


def test_a_cut_off_tar_gz_is_reported_as_damaged(image_folder: Path, tmp_path: Path) -> None:
    archive = tar_folder(image_folder, tmp_path / "data.tar.gz", "w:gz")
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{DAMAGED}"):
        read_dataset(archive, tmp_path / "cache")


def test_a_plain_tar_reads_like_the_folder(image_folder: Path, tmp_path: Path) -> None:
    archive = tar_folder(image_folder, tmp_path / "data.tar", "w")
    from_tar = read_dataset(archive, tmp_path / "cache")
    from_folder = read_dataset(image_folder, tmp_path / "cache")
    assert torch.equal(from_tar.train_x, from_folder.train_x) and torch.equal(from_tar.test_y, from_folder.test_y)


def test_a_damaged_header_inside_a_plain_tar_is_not_taken_for_its_end(image_folder: Path, tmp_path: Path) -> None:
    archive = tar_folder(image_folder, tmp_path / "data.tar", "w")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if "/test/" in m.name and m.isfile())
    flip_bytes(archive, member.offset + 148, 8)  # the header's checksum field: tarfile would stop here, as if at the end
    with pytest.raises(DataError, match=f"the archive is damaged: unreadable tar header at byte {member.offset}.*re-download"):
        read_dataset(archive, tmp_path / "cache")


def test_a_file_that_is_no_archive_says_so(tmp_path: Path) -> None:
    (tmp_path / "data.tar.gz").write_bytes(b"this is a text file\n" * 100)
    with pytest.raises(DataError, match="not a readable tar archive"):
        read_dataset(tmp_path / "data.tar.gz", tmp_path / "cache")


# ----------------------------------------------------------------------------- images


def write_tarball(archive: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return archive


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.transpose(1, 2, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("blob", [b"not an image at all", jpeg(fake_arrays(1, 0)[0][0])[:200]], ids=["garbage", "cut-off jpeg"])
def test_a_bad_image_is_named_by_its_path_inside_the_archive(tmp_path: Path, blob: bytes) -> None:
    good = png(fake_arrays(1, 0)[0][0])
    archive = write_tarball(tmp_path / "data.tar.gz", {"train/cat/0000.png": good, "train/cat/0001.jpg": blob, "test/cat/0000.png": good})
    with pytest.raises(DataError, match=f"^{archive}:train/cat/0001.jpg: cannot decode image") as caught:
        read_dataset(archive, tmp_path / "cache")
    assert "BytesIO" not in str(caught.value) and " at 0x" not in str(caught.value)


# ----------------------------------------------------------------------------- decoded cache


def damage_cache(cache: Path, how: str) -> None:
    raw = cache.read_bytes()
    damaged = {"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x93NUMPY garbage" * 50,
               "flipped bytes": raw[:300] + bytes(b ^ 0xFF for b in raw[300:310]) + raw[310:]}
    if how == "other arrays":
        np.savez(cache.with_suffix(""), something_else=np.zeros(3))  # savez adds the .npz back
    else:
        cache.write_bytes(damaged[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "flipped bytes", "other arrays"])
def test_a_damaged_decoded_cache_is_discarded_and_decoded_again(image_folder: Path, tmp_path: Path, how: str) -> None:
    first = read_dataset(image_folder, tmp_path / "cache")
    (cache,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    damage_cache(cache, how)
    again = read_dataset(image_folder, tmp_path / "cache")
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y) and again.classes == first.classes
    with np.load(cache) as z:  # and the cache is whole again
        assert np.array_equal(z["train_x"], first.train_x.numpy())


# ----------------------------------------------------------------------------- class names


def test_ten_folders_that_are_not_cifar10_classes_are_refused_as_cifar10(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imgs", per_class=1, classes=tuple(f"class{i}" for i in range(10)))
    with pytest.raises(DataError, match=f"^{tmp_path / 'imgs'}: .*airplane, automobile.*truck.*found class0.*data.source: folder"):
        load_images(DataSpec(source="cifar10", path=str(tmp_path / "imgs")), tmp_path / "cache")


def test_source_folder_accepts_any_class_names_in_alphabetical_order(tmp_path: Path) -> None:
    names = tuple(f"class{i}" for i in (3, 0, 9, 1, 2, 8, 4, 7, 5, 6))
    write_image_folder(tmp_path / "imgs", per_class=1, classes=names)
    images = load_images(DataSpec(source="folder", path=str(tmp_path / "imgs")), tmp_path / "cache")
    assert images.classes == tuple(sorted(names))


def test_cifar10_class_folders_keep_cifar10_label_order(image_folder: Path, tmp_path: Path) -> None:
    assert load_images(DataSpec(source="cifar10", path=str(image_folder)), tmp_path / "cache").classes == CIFAR10_CLASSES


# ----------------------------------------------------------------------------- python release


def good_batch(n: int = 4) -> dict:
    x, y = fake_arrays(n, 0)
    return {"data": x.reshape(n, -1), "labels": list(y)}


PICKLE_FAULTS = {
    "truncated pickle": lambda: pickle.dumps(good_batch())[:100],
    "garbage bytes": lambda: b"\x00\x01 this is not a pickle",
    "not a dict": lambda: pickle.dumps([1, 2, 3]),
    "missing labels": lambda: pickle.dumps({"data": good_batch()["data"]}),
    "wrong image shape": lambda: pickle.dumps({**good_batch(), "data": np.zeros((4, 1000), np.uint8)}),
    "float pixels": lambda: pickle.dumps({**good_batch(), "data": good_batch()["data"].astype(np.float32)}),
    "ragged labels": lambda: pickle.dumps({**good_batch(), "labels": [[1], [2, 3], [4], [5]]}),
    "fewer labels than images": lambda: pickle.dumps({**good_batch(), "labels": [1, 2, 3]}),
    "label 10": lambda: pickle.dumps({**good_batch(), "labels": [0, 1, 10, 2]}),
    "negative label": lambda: pickle.dumps({**good_batch(), "labels": [0, -1, 3, 2]}),
    "fractional labels": lambda: pickle.dumps({**good_batch(), "labels": [0.5, 1, 2, 3]}),
}


@pytest.mark.parametrize("fault", PICKLE_FAULTS)
def test_a_bad_python_release_batch_is_named_in_the_error(tmp_path: Path, fault: str) -> None:
    write_python_release(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(PICKLE_FAULTS[fault]())
    with pytest.raises(DataError, match=f"^{bad}: "):
        read_dataset(tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------- normalisation statistics


def test_chunked_pixel_sums_are_exact_whatever_the_chunk_size() -> None:
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    exact = x.long().sum(0), x.long().square().sum(0)
    for chunk in (7, 50, 1000):
        total, squares = pixel_sums(x, chunk)
        assert torch.equal(total, exact[0].double()) and torch.equal(squares, exact[1].double())


@pytest.mark.parametrize("mode", ["pixel_mean", "channel"])
def test_normalizer_statistics_match_the_straightforward_float_computation(mode: str) -> None:
    x = torch.randint(0, 256, (2500, 3, 8, 8), dtype=torch.uint8)  # more than one chunk, the last one partial
    pixels = x.double() / 255
    if mode == "pixel_mean":
        mean, scale = pixels.mean(0, keepdim=True), torch.ones(1, 3, 1, 1)
    else:
        mean, scale = pixels.mean((0, 2, 3), keepdim=True), 1 / pixels.std((0, 2, 3), keepdim=True)
    normalize = Normalizer(x, mode)
    assert normalize.mean.dtype == normalize.scale.dtype == torch.float32
    assert normalize.mean.shape == mean.shape and normalize.scale.shape == scale.shape
    assert torch.allclose(normalize.mean.double(), mean, rtol=0, atol=1e-7)
    assert torch.allclose(normalize.scale.double(), scale.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["pixel_mean", "channel"])
def test_normalizer_never_converts_more_than_a_chunk_of_images_to_float(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    x = torch.randint(0, 256, (3000, 3, 4, 4), dtype=torch.uint8)
    converted = []
    for name in ("float", "double"):
        convert = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, convert=convert: converted.append(len(t)) or convert(t))
    Normalizer(x, mode)
    assert converted and max(converted) <= data_module.STATS_CHUNK < len(x)
