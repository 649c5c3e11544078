"""Reading CIFAR-10 in its three formats, caching it, and augmenting whole batches on the device."""

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
from depthlab.data import (CIFAR10_CLASSES, DataError, Normalizer, augment, epoch_batches, load_images, random_crop,
                           random_flip, read_dataset, synthetic_images)

from .conftest import SHARED_TARBALL


def fake_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % 10


def write_python_release(root: Path, per_batch: int = 4) -> tuple[np.ndarray, ...]:
    """The format torchvision downloads: cifar-10-batches-py/data_batch_1..5, test_batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = fake_arrays(per_batch, i)
        xs.append(x), ys.append(y)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({"data": x.reshape(per_batch, -1), "labels": list(y)}))
    tx, ty = fake_arrays(per_batch, 9)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": tx.reshape(per_batch, -1), "labels": list(ty)}))
    return np.concatenate(xs), np.concatenate(ys), tx, ty


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: int = 2, classes=CIFAR10_CLASSES) -> dict:
    """train/<class>/NNNN.png and test/<class>/NNNN.png with known (lossless) pixels."""
    truth = {}
    for split, seed in (("train", 1), ("test", 2)):
        x, _ = fake_arrays(per_class * len(classes), seed)
        for i, image in enumerate(x):
            name = classes[i % len(classes)]
            path = root / split / name / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(image))
            truth[(split, name, path.name)] = image
    return truth


def test_reads_the_torchvision_python_release(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = write_python_release(tmp_path)
    images = read_dataset(tmp_path, tmp_path / "cache")
    assert torch.equal(images.train_x, torch.from_numpy(train_x)) and torch.equal(images.test_y, torch.from_numpy(test_y))
    assert images.classes == CIFAR10_CLASSES and images.train_x.dtype == torch.uint8


def test_reads_an_image_folder_in_cifar_label_order(tmp_path: Path) -> None:
    truth = write_image_folder(tmp_path / "imgs")
    images = read_dataset(tmp_path / "imgs", tmp_path / "cache")
    assert images.classes == CIFAR10_CLASSES
    assert len(images.train_y) == len(images.test_y) == 20
    # every decoded image is the one written for its class, pixel for pixel
    first_cat = images.train_x[images.train_y == CIFAR10_CLASSES.index("cat")][0].numpy()
    assert any(np.array_equal(first_cat, v) for (s, c, _), v in truth.items() if s == "train" and c == "cat")


def test_reads_a_tarball_of_the_folder_with_a_top_level_directory(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "cifar10-images")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar10-images", arcname="cifar10-images")
    from_tar = read_dataset(archive, tmp_path / "cache")
    from_folder = read_dataset(tmp_path / "cifar10-images", tmp_path / "cache")
    assert torch.equal(from_tar.train_x, from_folder.train_x) and torch.equal(from_tar.test_y, from_folder.test_y)


def test_decoding_happens_once_then_the_cache_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image_folder(tmp_path / "imgs")
    first = read_dataset(tmp_path / "imgs", tmp_path / "cache")
    monkeypatch.setattr(data_module, "_decode", lambda *a: pytest.fail("decoded again instead of using the cache"))
    second = read_dataset(tmp_path / "imgs", tmp_path / "cache")
    assert torch.equal(first.train_x, second.train_x)


def test_a_folder_of_other_classes_is_read_in_alphabetical_order(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imgs", classes=("zebra", "ant"))
    assert read_dataset(tmp_path / "imgs", tmp_path / "cache").classes == ("ant", "zebra")
    with pytest.raises(DataError, match="must be CIFAR-10's"):
        load_images(DataSpec(source="cifar10", path=str(tmp_path / "imgs")), tmp_path / "cache")


@pytest.mark.parametrize("problem", ["missing", "empty", "no test split", "wrong size", "not an image"])
def test_a_malformed_dataset_says_what_was_expected_where(tmp_path: Path, problem: str) -> None:
    root = tmp_path / "imgs"
    if problem != "missing":
        write_image_folder(root)
    if problem == "empty":
        for p in root.rglob("*.png"):
            p.unlink()
    if problem == "no test split":
        for p in (root / "test").rglob("*.png"):
            p.unlink()
    if problem == "wrong size":
        (root / "train" / "cat" / "big.png").write_bytes(png(np.zeros((3, 64, 64), np.uint8)))
    if problem == "not an image":
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    expected = {"missing": "no such file", "empty": "train/<class>/", "no test split": "test/<class>/",
                "wrong size": "32×32", "not an image": "cannot decode"}[problem]
    with pytest.raises(DataError, match=expected):
        load_images(DataSpec(source="folder", path=str(root)), tmp_path / "cache")


def test_an_unrecognised_folder_lists_the_formats_depthlab_reads(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="data_batch_1..5.*train/<class>/.*tar.gz"):
        load_images(DataSpec(source="cifar10", path=str(tmp_path / "stuff")), tmp_path / "cache")


def test_no_internet_and_no_copy_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root, train, download):
        raise OSError("network is unreachable")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10.*--data PATH"):
        load_images(DataSpec(source="cifar10"), tmp_path / "cache")


def test_subsets_and_validation_split_are_disjoint_and_repeatable(tmp_path: Path) -> None:
    write_python_release(tmp_path, per_batch=20)  # 100 training images
    spec = DataSpec(source="cifar10", path=str(tmp_path), train_size=60, val_split=10)
    a, b = load_images(spec, tmp_path / "cache"), load_images(spec, tmp_path / "cache")
    assert len(a.train_y) == 50 and len(a.val_y) == 10
    assert torch.equal(a.val_x, b.val_x)
    train_rows = {bytes(x.numpy()) for x in a.train_x}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val_x)


def test_synthetic_images_are_cifar_shaped_balanced_and_repeatable() -> None:
    a, b = synthetic_images(200, 100), synthetic_images(200, 100)
    assert a.train_x.shape == (200, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert torch.equal(a.train_x, b.train_x)
    assert torch.bincount(a.train_y).tolist() == [20] * 10


# ----------------------------------------------------------------------------- augmentation


def test_random_crop_cuts_a_shifted_window_of_the_zero_padded_image() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) + 1
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        windows = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i])]
        assert len(windows) == 1


def test_crops_and_flips_differ_per_image_and_follow_the_generator() -> None:
    x = torch.randn(256, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    unchanged = sum(torch.equal(a[i], x[i]) for i in range(len(x)))
    assert unchanged < 20  # about 1/81 × 1/2 of the images keep their place unflipped
    flipped = random_flip(x, torch.Generator().manual_seed(2))
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(2)) for i in range(len(x)))
    assert 90 < n_flipped < 166


def test_normalizer_subtracts_the_mean_training_image() -> None:
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    pixel = Normalizer(x, "pixel_mean")(x)
    assert pixel.mean(0).abs().max() < 1e-5
    channel = Normalizer(x, "channel")(x)
    assert torch.allclose(channel.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(channel.std((0, 2, 3)), torch.ones(3), atol=1e-3)


def test_an_epoch_visits_each_image_at_most_once_in_full_batches() -> None:
    batches = list(epoch_batches(1000, 128, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert len(batches) == 7 and all(len(b) == 128 for b in batches)
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == len(seen)


@pytest.mark.skipif(not SHARED_TARBALL.is_file(), reason="the shared CIFAR-10 JPEG tarball is not on this machine")
def test_the_shared_cifar10_jpeg_tarball_loads_as_cifar10(tmp_path: Path) -> None:
    images = load_images(DataSpec(source="cifar10", path=str(SHARED_TARBALL)), tmp_path / "cache")
    assert images.train_x.shape == (50_000, 3, 32, 32) and images.test_x.shape == (10_000, 3, 32, 32)
    assert images.classes == CIFAR10_CLASSES
    assert torch.bincount(images.train_y).tolist() == [5000] * 10
    assert torch.bincount(images.test_y).tolist() == [1000] * 10
