"""CIFAR-10 images: finding them, decoding them once, and feeding them from the training device.

Four formats are read: torchvision's `cifar-10-batches-py` (downloaded where there is
internet), the published `cifar-10-python.tar.gz` holding it (read without unpacking, its MD5
checked), an image folder `train/<class>/*`, `test/<class>/*`, and a `.tar.gz` of such a folder. Whatever the format, the images are decoded once into uint8 arrays and cached, so
later runs load in seconds. A small synthetic CIFAR-shaped set with learnable labels serves
smoke tests and CI, where no download is possible.

During training the whole set lives on the device as uint8; batches are drawn by index and
normalised, padded, cropped and flipped as batched tensor ops — no per-image Python work.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from contextlib import nullcontext
from typing import BinaryIO, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import SYNTHETIC_TEST_IMAGES, SYNTHETIC_TRAIN_IMAGES, DataSpec
from .errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
TORCHVISION_FOLDER = "cifar-10-batches-py"
CIFAR10_PYTHON_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_PYTHON_MD5 = "c58f30108f718f92721af3b95e74349a"  # published with the release; torchvision's CIFAR10.tgz_md5
SPLITS = ("train", "test")
GZIP_MAGIC = b"\x1f\x8b"
PIXELS_PER_IMAGE = 3 * 32 * 32
PICKLE_FORMAT = "a CIFAR-10 python-release batch is a dict with 'data' (N×3072 uint8) and 'labels' (N ints in 0..9)"
# What reading a damaged archive raises: tarfile wraps some zlib errors in ReadError, but a member's bytes come straight
# from the decompressor (zlib.error, not an OSError), a cut-off stream raises EOFError, a bad trailer gzip.BadGzipFile.
ARCHIVE_DAMAGE = (tarfile.TarError, zlib.error, EOFError, OSError)
# What np.load raises for a cut-off or overwritten .npz (measured with numpy 2.4: BadZipFile for bad CRCs and headers,
# EOFError for an empty file, ValueError for bytes that are not an array); KeyError for a file without our arrays.
CACHE_DAMAGE = (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError)


@dataclass
class Images:
    """A labelled image set as uint8 NCHW tensors (on the CPU until `to` moves it)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Images":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Images(move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                      self.classes, move(self.val_x), move(self.val_y))


def default_cache_dir() -> Path:
    """Where downloads and decoded arrays live: $DEPTHLAB_CACHE or ~/.cache/depthlab."""
    return Path(os.environ.get("DEPTHLAB_CACHE", Path.home() / ".cache" / "depthlab"))


# ----------------------------------------------------------------------------- synthetic


def synthetic_images(train_size: int = SYNTHETIC_TRAIN_IMAGES, test_size: int = SYNTHETIC_TEST_IMAGES, seed: int = 0) -> Images:
    """CIFAR-shaped images whose class is a coarse colour pattern under noise and a random shift.

    Small nets learn it in an epoch or two, so a smoke sweep shows real learning curves.
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=g)]
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        x = torch.stack([templates[c].roll(tuple(s.tolist()), dims=(1, 2)) for c, s in zip(y, shifts)])
        x = x + 0.25 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return Images(train_x, train_y, test_x, test_y, tuple(f"pattern{i}" for i in range(10)))


# ----------------------------------------------------------------------------- formats on disk


# Every global a CIFAR-10 batch names: numpy's array and scalar constructors (numpy.core under numpy 1, which wrote the
# published batches; numpy._core under numpy 2) and _codecs.encode, which Python 3 names for bytes at protocols 0-2.
# Unpickling calls whatever a file names — os.system as readily as these — so everything else is refused.
CIFAR_PICKLE_GLOBALS = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
    | {(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")}
)


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that a CIFAR-10 batch never needs."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, str, bytes, numbers and numpy arrays, and nothing that could run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(file: Path | str, stream: Optional[BinaryIO] = None) -> object:
    """The object pickled in `file` (or in `stream`, a member of an archive that `file` names)."""
    try:
        with open(file, "rb") if stream is None else nullcontext(stream) as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as err:
        raise DataError(f"{file}: not loaded: the pickle names the global {err}, which could run code (it was not called); a "
                        "CIFAR-10 batch holds only dicts, lists, str, bytes, ints and numpy arrays: re-download it from its source") from None
    except Exception as err:  # unpickling a damaged file can raise almost any exception (pickle's docs say so)
        raise DataError(f"{file}: not a readable pickle ({type(err).__name__}: {err}); re-download or re-create it") from None


def _as_array(value: object, file: Path, key: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise DataError(f"{file}: '{key}' is not an array ({err}); {PICKLE_FORMAT}") from None


def _read_pickle_batch(file: Path | str, stream: Optional[BinaryIO] = None) -> tuple[np.ndarray, np.ndarray]:
    """One batch file, checked, so that a damaged or foreign file is named here rather than failing deep in training."""
    entry = _unpickle(file, stream)
    if not isinstance(entry, dict) or not {"data", "labels"} <= entry.keys():
        found = f"keys {sorted(map(str, entry))}" if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{file}: expected 'data' and 'labels', found {found}; {PICKLE_FORMAT}")
    x, y = _as_array(entry["data"], file, "data"), _as_array(entry["labels"], file, "labels")
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS_PER_IMAGE:
        raise DataError(f"{file}: 'data' is {x.dtype} of shape {x.shape}; {PICKLE_FORMAT}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{file}: {len(x)} images but 'labels' has shape {y.shape}; {PICKLE_FORMAT}")
    if not np.issubdtype(y.dtype, np.integer) or np.any((y < 0) | (y >= len(CIFAR10_CLASSES))):
        raise DataError(f"{file}: 'labels' must be ints in 0..9, found {y.dtype} values {np.unique(y)[:10].tolist()}; {PICKLE_FORMAT}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


RELEASE_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
RELEASE_MISSING = "expected data_batch_1..5 and test_batch of the CIFAR-10 python release"


def _release_arrays(read: Callable[[str], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """train_x, train_y, test_x, test_y of the python release, each batch read by `read(name)`."""
    arrays: list[np.ndarray] = []
    for split in SPLITS:
        batches = [read(name) for name in RELEASE_BATCHES[split]]
        arrays += [np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])]
    return tuple(arrays)  # type: ignore[return-value]


def _read_pickle_batches(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The python-pickle release of CIFAR-10 (what torchvision downloads), unpacked."""

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        if not (folder / name).is_file():
            raise DataError(f"{folder}: missing {name} ({RELEASE_MISSING})")
        return _read_pickle_batch(folder / name)

    return _release_arrays(read)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_release_tarball(path: Path, batches: dict[str, bytes]) -> tuple[np.ndarray, ...]:
    """cifar-10-python.tar.gz as published, read without unpacking it; its MD5 must be the published one."""
    found = file_md5(path)
    if found != CIFAR10_PYTHON_MD5:
        raise DataError(f"{path}: holds {TORCHVISION_FOLDER}/ but its MD5 is {found}, not the published {CIFAR10_PYTHON_MD5} of "
                        f"{CIFAR10_PYTHON_TARBALL}: re-download it (a copy you packed yourself: unpack it and give the folder)")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in batches:
            raise DataError(f"{path}: missing {TORCHVISION_FOLDER}/{name} ({RELEASE_MISSING})")
        return _read_pickle_batch(f"{path}:{TORCHVISION_FOLDER}/{name}", io.BytesIO(batches[name]))

    return (*_release_arrays(read), CIFAR10_CLASSES)


def _class_order(names: set[str]) -> tuple[str, ...]:
    """CIFAR-10's label order when the folders are its classes, else alphabetical."""
    return CIFAR10_CLASSES if names == set(CIFAR10_CLASSES) else tuple(sorted(names))


def _decode(blob: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise DataError(f"{where}: cannot decode image (not a format PIL reads, or damaged)") from None
    except Exception as err:  # PIL raises many kinds of errors for a bad file
        raise DataError(f"{where}: cannot decode image ({err})") from None
    if array.shape != (32, 32, 3):
        raise DataError(f"{where}: expected a 32×32 image, got {array.shape[1]}×{array.shape[0]}")
    return array.transpose(2, 0, 1)


def _stack(files: dict[str, dict[str, list[tuple[str, bytes]]]], origin: str) -> tuple[np.ndarray, ...]:
    """Decode {split: {class: [(name, bytes)]}} into arrays, in a fixed order."""
    missing = [s for s in SPLITS if not any(files.get(s, {}).values())]
    if missing:
        raise DataError(f"{origin}: no images under {', '.join(f'{s}/<class>/' for s in missing)} (expected train/<class>/*.jpg|png and test/<class>/*.jpg|png)")
    classes = _class_order(set(files["train"]))
    if set(files["test"]) - set(classes):
        raise DataError(f"{origin}: test classes {sorted(set(files['test']) - set(classes))} do not appear under train/")
    out = []
    for split in SPLITS:
        xs, ys = [], []
        for label, name in enumerate(classes):
            for file, blob in sorted(files[split].get(name, [])):
                xs.append(_decode(blob, f"{origin}:{split}/{name}/{file}"))
                ys.append(label)
        out += [np.stack(xs), np.asarray(ys, dtype=np.int64)]
    return (*out, classes)


def _read_image_folder(root: Path) -> tuple[np.ndarray, ...]:
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for split in SPLITS:
        for class_dir in sorted(p for p in (root / split).glob("*") if p.is_dir()):
            images = [p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            files.setdefault(split, {})[class_dir.name] = [(p.name, p.read_bytes()) for p in images]
    return _stack(files, str(root))


_MEMBER = re.compile(r"(?:^|.*/)(train|test)/([^/]+)/([^/]+)$")
_RELEASE_MEMBER = re.compile(rf"^(?:\./)?{TORCHVISION_FOLDER}/(data_batch_[1-5]|test_batch)$")


def _tar_images(tar: tarfile.TarFile) -> tuple[dict[str, dict[str, list[tuple[str, bytes]]]], dict[str, bytes]]:
    """{split: {class: [(name, bytes)]}} of the image members and {name: bytes} of the python release's batches,
    read in one pass over the archive."""
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    batches: dict[str, bytes] = {}
    for member in tar:
        match = _MEMBER.match(member.name)
        release = _RELEASE_MEMBER.match(member.name)
        if member.isfile() and match and Path(match[3]).suffix.lower() in IMAGE_SUFFIXES:
            split, name, file = match.groups()
            blob = tar.extractfile(member).read()
            files.setdefault(split, {}).setdefault(name, []).append((file, blob))
        elif member.isfile() and release:
            batches[release[1]] = tar.extractfile(member).read()
    return files, batches


def _only_padding_follows(tar: tarfile.TarFile) -> bool:
    """Read the archive to its very end: whether nothing but the zero padding follows where tarfile stopped.

    tarfile stops quietly at an unreadable header, as if the archive ended there, and never reads the gzip trailer;
    reading on checks the gzip CRC (raising on damage) and tells a real end from a damaged header.
    """
    padding = True
    while chunk := tar.fileobj.read(1 << 20):
        padding = padding and not chunk.strip(b"\0")
    return padding


def _damaged(path: Path, problem: Exception | str) -> DataError:
    if isinstance(problem, EOFError):  # gzip's own words ("end-of-stream marker") do not say what happened to the file
        problem = "its compressed data ends early (cut off or overwritten)"
    return DataError(f"{path}: the archive is damaged: {problem}; re-download or re-create it")


def _read_tarball(path: Path) -> tuple[np.ndarray, ...]:
    """A tar or .tar.gz of an image folder or of the python release, verified to its end so a damaged archive never
    trains on part of itself."""
    with open(path, "rb") as f:
        compressed = f.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    try:
        tar = tarfile.open(path, "r:gz" if compressed else "r:")
    except ARCHIVE_DAMAGE as err:
        if compressed:
            raise _damaged(path, err) from None
        raise DataError(f"{path}: not a readable tar archive ({err})") from None
    try:
        with tar:
            files, batches = _tar_images(tar)
            if not _only_padding_follows(tar):
                raise _damaged(path, f"unreadable tar header at byte {tar.offset}, the entries after it were not read")
    except ARCHIVE_DAMAGE as err:
        raise _damaged(path, err) from None
    if batches and not files:
        return _read_release_tarball(path, batches)
    return _stack(files, str(path))


def detect_format(path: Path) -> tuple[str, Path]:
    """Which format `path` holds: 'pickle', 'folder' or 'tarball', and where exactly."""
    if path.is_file() and (path.name.endswith((".tar.gz", ".tgz", ".tar"))):
        return "tarball", path
    if path.is_dir():
        for candidate in (path, path / TORCHVISION_FOLDER):
            if (candidate / "data_batch_1").is_file():
                return "pickle", candidate
        if (path / "train").is_dir() and (path / "test").is_dir():
            return "folder", path
    raise DataError(
        f"{path}: no dataset found. Expected one of: CIFAR-10's python release ({CIFAR10_PYTHON_TARBALL} or its {TORCHVISION_FOLDER}/ "
        "with data_batch_1..5 and test_batch), an image folder with train/<class>/ and test/<class>/, or a .tar.gz of that folder"
    )


def _cache_key(path: Path) -> str:
    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if path.is_dir():  # folders change inside: look at their direct entries too
        text += "|" + "|".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir()))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _load_cache(cache: Path) -> tuple[list[np.ndarray], tuple[str, ...]] | None:
    """The cached arrays, or None where there are none; a damaged cache is deleted (it is only a cache) and reads as None."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as z:
            return [z[k] for k in ("train_x", "train_y", "test_x", "test_y")], tuple(str(c) for c in z["classes"])
    except CACHE_DAMAGE:
        cache.unlink(missing_ok=True)
        return None


def _save_cache(cache: Path, arrays: list[np.ndarray], classes: tuple[str, ...]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")  # per process: two sweeps decoding at once must not mix bytes
    np.savez(tmp, train_x=arrays[0], train_y=arrays[1], test_x=arrays[2], test_y=arrays[3], classes=np.array(classes))
    os.replace(tmp, cache)


def _decode_format(data_format: str, where: Path) -> tuple[list[np.ndarray], tuple[str, ...]]:
    if data_format == "pickle":
        return list(_read_pickle_batches(where)), CIFAR10_CLASSES
    *arrays, classes = _read_tarball(where) if data_format == "tarball" else _read_image_folder(where)
    return arrays, classes


def read_dataset(path: Path, cache_dir: Path) -> Images:
    """Decode the dataset at `path` (any format) once; later calls load the cached arrays."""
    data_format, where = detect_format(path)
    cache = cache_dir / "decoded" / f"{where.name}-{_cache_key(where)}.npz"
    cached = _load_cache(cache)
    if cached is None:
        cached = _decode_format(data_format, where)
        _save_cache(cache, *cached)
    arrays, classes = cached
    return Images(*(torch.from_numpy(a) for a in arrays), classes=classes)


def download_cifar10(root: Path) -> Path:
    """Fetch CIFAR-10 with torchvision into `root`; a clear error where there is no internet."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as err:  # urllib raises several kinds of errors when offline
        raise DataError(
            f"could not download CIFAR-10 into {root} ({type(err).__name__}: {err}). Without internet, point depthlab "
            "at a copy with --data PATH (the python release, an image folder train/<class>/ test/<class>/, or a .tar.gz of one)"
        ) from None
    return root / TORCHVISION_FOLDER


def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or size >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
    return x[keep], y[keep]


def _check_cifar10_classes(path: Path, images: Images) -> None:
    """With data.source cifar10 the labels mean CIFAR-10's classes; ten folders of anything else are another data set,
    and an empty class folder would train and test on nine classes without a word."""
    classes = images.classes
    if set(classes) != set(CIFAR10_CLASSES):
        raise DataError(
            f"{path}: data.source is cifar10, so the class folders must be CIFAR-10's ({', '.join(CIFAR10_CLASSES)}); "
            f"found {', '.join(classes)}. For another labelled image set use data.source: folder"
        )
    for split, labels in zip(SPLITS, (images.train_y, images.test_y)):
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        empty = [f"{split}/{name}/" for name, count in zip(classes, counts) if count == 0]
        if empty:
            raise DataError(f"{path}: no images in {', '.join(empty)}; data.source is cifar10, so each of its ten classes "
                            f"needs images under train/<class>/ and test/<class>/ ({'|'.join(IMAGE_SUFFIXES)})")


def load_images(spec: DataSpec, cache_dir: Path | None = None) -> Images:
    """The images a sweep trains and evaluates on, with its subsets and validation split applied."""
    cache_dir = cache_dir or default_cache_dir()
    if spec.source == "synthetic":
        images = synthetic_images(*spec.image_counts())
    else:
        path = Path(spec.path).expanduser() if spec.path else cache_dir / "cifar10"
        if spec.path is None and spec.source == "cifar10" and not (path / TORCHVISION_FOLDER / "data_batch_1").is_file():
            if not spec.download:
                raise DataError(f"no CIFAR-10 in {path} and data.download is false: give --data PATH")
            download_cifar10(path)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        images = read_dataset(path, cache_dir)
        if spec.source == "cifar10":
            _check_cifar10_classes(path, images)
        images.train_x, images.train_y = _subset(images.train_x, images.train_y, spec.train_size, seed=1)
        images.test_x, images.test_y = _subset(images.test_x, images.test_y, spec.test_size, seed=2)
    if spec.val_split:
        if spec.val_split >= len(images.train_y):
            raise DataError(f"data.val_split={spec.val_split} leaves no training images (there are {len(images.train_y)})")
        order = torch.randperm(len(images.train_y), generator=torch.Generator().manual_seed(3))
        val, train = order[: spec.val_split], order[spec.val_split :]
        images.val_x, images.val_y = images.train_x[val], images.train_y[val]
        images.train_x, images.train_y = images.train_x[train], images.train_y[train]
    return images


# ----------------------------------------------------------------------------- on the device


STATS_CHUNK = 1024  # images per step when summing the training set; a guess: 25 MB of float64 per chunk for CIFAR


def pixel_sums(train_x: torch.Tensor, chunk: int = STATS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel sum and sum of squares of the raw 0..255 values, in float64, a chunk of images at a time.

    A float copy of the whole set (614 MB for CIFAR-10) only to average it would crowd the device; the sums of
    uint8 values stay exact in float64 for any set that fits in memory.
    """
    total = torch.zeros(train_x.shape[1:], dtype=torch.float64, device=train_x.device)
    squares = torch.zeros_like(total)
    for start in range(0, len(train_x), chunk):
        part = train_x[start : start + chunk].double()
        total += part.sum(0)
        squares += part.square_().sum(0)
    return total, squares


class Normalizer:
    """uint8 images → float inputs: the paper subtracts the per-pixel mean of the training set.

    `pixel_mean`: x/255 minus the mean training image; `channel`: per-channel mean and std (unbiased).
    """

    def __init__(self, train_x: torch.Tensor, mode: str):
        total, squares = pixel_sums(train_x)
        if mode == "pixel_mean":
            self.mean = (total / (255 * len(train_x))).float()[None]
            self.scale = torch.ones(1, 3, 1, 1, device=train_x.device)
        else:
            count = len(train_x) * train_x.shape[2] * train_x.shape[3]
            mean = total.sum((1, 2)) / count
            variance = (squares.sum((1, 2)) - count * mean.square()) / (count - 1)
            self.mean = (mean / 255).float().view(1, 3, 1, 1)
            self.scale = (255 / variance.sqrt()).float().view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean).mul_(self.scale)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` and cut a random window of the original size, per image, in one gather."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # NHWC: one gather moves whole pixels
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's augmentation: 4-pixel zero padding, random 32×32 crop, horizontal flip."""
    return random_flip(random_crop(x, 4, generator), generator)


def training_batch(images: torch.Tensor, index: torch.Tensor, normalize: Normalizer, generator: torch.Generator,
                   memory_format: torch.memory_format) -> torch.Tensor:
    """Gather, normalise and augment one batch on the device, in the memory format the model runs in."""
    return augment(normalize(images[index]), generator).contiguous(memory_format=memory_format)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Shuffled index batches of one epoch; the last partial batch is dropped (static shapes)."""
    order = torch.randperm(n, device=device, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def eval_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Contiguous slices covering all `n` images (evaluation sees every image once)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
