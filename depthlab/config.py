"""Sweep configuration: the YAML schema, its validation and the grid of cells it expands to.

A sweep file has the sections `name`, `data`, `model`, `train`, `runtime`, `grid` and `cells`.
`grid` and `cells` use flat cell options (`arch`, `depth`, `seed`, `shortcut` and any `train`
key); every value may be a list, and each combination becomes one cell. User mistakes raise
ConfigError, which names the file, the key path, the bad value and what is allowed.

Numbers are read as YAML 1.2 reads them (`5e-4` is a float, not a string), duplicate keys are
refused, and every number has a range: the ceilings marked "sanity bound" are not facts about
training but limits past which a sweep would never finish or never fit in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError, one_line
from .options import ARCHS, BLOCK_ORDERS, FAMILIES, INITS, NORMS, SHORTCUTS, NetSpec, depth_error, net_spec_error


CIFAR10_TRAIN_IMAGES, CIFAR10_TEST_IMAGES = 50_000, 10_000
SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_TEST_IMAGES = 1_000, 500  # the synthetic set's size when data.train_size/test_size is not given


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxdict = 5


def _show(value: Any) -> str:
    """A bad value for a message: short however large, nested or self-referencing it is."""
    return _SHOW.repr(value)


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how they are prepared."""

    source: Literal["cifar10", "folder", "synthetic"] = "cifar10"  # folder: train/<class>/*, test/<class>/* or a .tar.gz of it
    path: Optional[str] = None  # cifar10: None = download into the cache directory
    download: bool = True  # cifar10 only: fetch it when it is missing
    normalize: Literal["pixel_mean", "channel"] = "pixel_mean"  # the paper subtracts the per-pixel mean
    val_split: int = 0  # hold out this many training images as a validation set (the paper's 5000)
    train_size: Optional[int] = None  # use this many training images (synthetic: generate this many)
    test_size: Optional[int] = None  # likewise for the test set

    def identity(self) -> dict[str, Any]:
        """What makes two runs see the same data (the path may differ between machines)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("path", "download")}

    def image_counts(self) -> tuple[int, int]:
        """(training, test) images loaded, before val_split, known without loading them: the one place that counts them
        (a folder dataset is assumed CIFAR-sized; a subset larger than CIFAR-10 keeps all of it)."""
        if self.source == "synthetic":
            return self.train_size or SYNTHETIC_TRAIN_IMAGES, self.test_size or SYNTHETIC_TEST_IMAGES
        return min(self.train_size or CIFAR10_TRAIN_IMAGES, CIFAR10_TRAIN_IMAGES), min(self.test_size or CIFAR10_TEST_IMAGES, CIFAR10_TEST_IMAGES)

    def expected_train_images(self) -> int:
        """Training images a sweep will see, after val_split."""
        return self.image_counts()[0] - self.val_split

    def known_train_images(self) -> Optional[int]:
        """expected_train_images when the config alone tells it (not for a folder dataset, whose size is known only once read)."""
        return None if self.source == "folder" else self.expected_train_images()


@dataclass(frozen=True)
class TrainSpec:
    """The optimisation recipe of one cell; the defaults are the paper's."""

    iterations: Optional[int] = 64_000  # length in iterations (the paper: 64k) ...
    epochs: Optional[int] = None  # ... or in epochs: exactly one of the two is set
    milestones: Optional[list[int]] = None  # lr decay points, in the same unit; None = 1/2 and 3/4 of the run
    lr: float = 0.1
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    warmup_lr: Optional[float] = None  # ResNet-110: train at this lr until the training error falls below ...
    warmup_until_err: float = 80.0  # ... this percentage, then switch to `lr`
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # auto: bf16 autocast where the device computes bf16 natively

    def decay_points(self) -> list[int]:
        """The milestones, with the paper's proportions filled in when none are given."""
        length = self.iterations if self.iterations is not None else self.epochs
        assert length is not None
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({p for p in (length // 2, length * 3 // 4) if 0 < p < length})

    def run_length(self, n_train: int) -> "RunLength":
        """How long this recipe trains on `n_train` images (the last partial batch of an epoch is dropped)."""
        per_epoch = n_train // self.batch_size
        if per_epoch < 1:
            raise ValueError(f"{n_train} training images are fewer than one batch of {self.batch_size}")
        iterations = self.iterations if self.iterations is not None else self.epochs * per_epoch
        return RunLength(iterations=iterations, epochs=math.ceil(iterations / per_epoch), iterations_per_epoch=per_epoch)


@dataclass(frozen=True)
class RunLength:
    """A cell's length: its iterations, the epochs they span (the last may be partial) and iterations per epoch."""

    iterations: int
    epochs: int
    iterations_per_epoch: int


@dataclass(frozen=True)
class RuntimeSpec:
    """How cells are run. Nothing here changes what a finished cell means.

    A new key is one field here (its annotation is what the file is checked against) and, for a number, its RANGES line.
    """

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    jobs: Union[int, Literal["auto"]] = "auto"  # cells trained at once
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = "auto"
    channels_last: Union[bool, Literal["auto"]] = "auto"  # auto: on a GPU; on a CPU, if it measures faster there
    eval_batch_size: int = 1000
    deterministic: bool = False  # GPU: deterministic kernels, no cuDNN autotuning (slower), for bit-identical resumes
    tensorboard: bool = False  # also log every epoch to <results>/tensorboard/<cell>/ (needs the tensorboard extra)
    # at most this many cells that differ only in seed train as one grouped model in one worker (1: each alone);
    # auto: the device's measured default (group_training.resolve_group_seeds)
    group_seeds: Union[int, Literal["auto"]] = "auto"


@dataclass(frozen=True)
class Cell:
    """One training run of the sweep: a model, a seed, a recipe and the data."""

    arch: str
    depth: int
    seed: int
    shortcut: str
    train: TrainSpec
    data: DataSpec
    tags: tuple[tuple[str, Any], ...] = ()  # the options that tell this cell from others of the same net and seed
    net_options: tuple[tuple[str, Any], ...] = ()  # the net's ablation options (NET_KEYS) that differ from the 2015 net

    @property
    def variant(self) -> str:
        """What sets this cell apart from the 2015 net of its arch and depth: shortcut B, ablation options, grid tags."""
        parts = [self.shortcut] if self.arch == "residual" and self.shortcut != "A" else []
        return "-".join(parts + [f"{k}={_slug(v)}" for k, v in self.net_options + self.tags])

    @property
    def id(self) -> str:
        """The folder name: arch, depth, the variant (when there is one) and the seed."""
        return "-".join([self.arch, str(self.depth), *([self.variant] if self.variant else []), f"s{self.seed}"])

    def to_dict(self) -> dict[str, Any]:
        """Everything that defines the result, as plain JSON-able data."""
        return {
            "id": self.id,
            "arch": self.arch,
            "depth": self.depth,
            "seed": self.seed,
            "shortcut": self.shortcut,
            "train": dataclasses.asdict(self.train),
            "data": self.data.identity(),
            "tags": dict(self.tags),
            **({"net": dict(self.net_options)} if self.net_options else {}),  # absent for the 2015 net: its fingerprints stay as they were
            **({"net_revision": PREACT_REVISION} if self.arch == "residual" and dict(self.net_options).get("block") == "pre" else {}),
        }

    def to_record(self) -> dict[str, Any]:
        """to_dict() and the cell's identity as data, for config.json and summary.json: its variant and its net's
        NetSpec fields (kept out of to_dict, so that fingerprints stay as they were)."""
        return {**self.to_dict(), "variant": self.variant, "net_spec": dataclasses.asdict(self.net_spec())}

    def net_spec(self) -> NetSpec:
        """The net this cell trains, for `models.build_net`."""
        return NetSpec(self.arch, self.depth, shortcut=self.shortcut, **dict(self.net_options))

    def fingerprint(self) -> str:
        """A hash of what defines the result (not its name): equal fingerprints mean a finished result is still valid."""
        science = {k: v for k, v in self.to_dict().items() if k not in ("id", "tags")}
        text = json.dumps(science, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The residual pre-activation net changed to follow He et al. 2016's reference code (BN-ReLU after the stem and
# before the split where the shape changes; zero_gamma zeroes the last conv): results and checkpoints of the
# earlier layer order are a different net, so they count as stale rather than resuming into the new one.
PREACT_REVISION = 2


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: its cells (the grid expanded) and how to run them."""

    name: str
    data: DataSpec
    runtime: RuntimeSpec
    cells: list[Cell]
    source: str = "<config>"
    description: Optional[str] = None
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE options applied to the file, as given


    def to_document(self) -> dict[str, Any]:
        """The sweep as a YAML document with every cell spelled out: `parse_config` of it gives the same cells."""
        document: dict[str, Any] = {"name": self.name}
        if self.description:
            document["description"] = self.description
        document["data"] = dataclasses.asdict(self.data)
        document["runtime"] = dataclasses.asdict(self.runtime)
        document["cells"] = [{"arch": c.arch, "depth": c.depth, "seed": c.seed, "shortcut": c.shortcut, **dict(c.net_options),
                              **dataclasses.asdict(c.train)} for c in self.cells]
        return document

    def to_yaml(self) -> str:
        """The resolved sweep as YAML (what sweep.yaml holds), headed by the --set overrides that made it, if any."""
        header = "".join(f"# --set {one_line(item)}\n" for item in self.overrides)
        return header + yaml.safe_dump(self.to_document(), sort_keys=False)


NET_KEYS = ("family", "shortcut_scale", "init", "norm", "block")  # the ablation axes of options.NetSpec
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainSpec))
TOP_KEYS = ("name", "description", "data", "model", "train", "runtime", "grid", "cells")
MODEL_KEYS = ("shortcut",) + NET_KEYS
# The type of every cell option (a key of `grid`, of a `cells` entry, or of `model`): the net's, then the recipe's.
OPTION_TYPES: dict[str, Any] = {
    "arch": Literal[ARCHS], "depth": int, "seed": int, "shortcut": Literal[SHORTCUTS], "family": Literal[FAMILIES],
    "shortcut_scale": float, "init": Literal[INITS], "norm": Literal[NORMS], "block": Literal[BLOCK_ORDERS],
    **typing.get_type_hints(TrainSpec)}
SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "batch": "batch_size", "steps": "iterations",
            "iters": "iterations", "max_iters": "iterations", "archs": "arch", "depths": "depth", "seeds": "seed",
            "dataset": "data", "option": "shortcut", "dtype": "precision"}

MAX_LR = 10.0  # a sanity bound: the paper trains at 0.1; SGD on these nets diverges long before 10
MAX_IMAGES = 1_000_000  # a sanity bound: 20x CIFAR-10's training set; 3 GB as uint8 on the device
MAX_BATCH_SIZE = 65_536  # a sanity bound: more than CIFAR-10's whole training set in one batch
MAX_CELLS = 10_000  # a sanity bound: the paper's Figure 6 is 9 nets; 10,000 cells would take months on one GPU
MAX_NAME_LENGTH = 100  # bytes of the results folder's name
MAX_CELL_ID_LENGTH = 200  # cells/<id>/ and superseded/<id>-<stamp>/ stay under the usual 255-byte file-name limit
MAX_GROUP_SEEDS = 64  # a sanity bound, not measured: 64 nets side by side is 64x a net's memory in one worker
MAX_CUDA_INDEX = 127  # a fact: torch keeps a device index in 8 signed bits (torch 2.x here: "cuda:99999" became cuda:-97)


@dataclass(frozen=True)
class Range:
    """The values a number may take; an open end excludes its bound; `why` is said when a value is outside."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:,}, {self.high:,}{')' if self.high_open else ']'}"


# The range of every number a sweep file sets, whatever its section (no key name repeats across sections). The upper
# ends are sanity bounds, not facts: far past anything the paper's recipe needs, well short of what would never finish.
RANGES = {
    "iterations": Range(1, 10_000_000),  # 156x the paper's 64k iterations
    "epochs": Range(1, 100_000),  # 600x the paper's ~164 epochs
    "lr": Range(0, MAX_LR, low_open=True),
    "lr_decay": Range(0, 1, low_open=True),
    "momentum": Range(0, 1, high_open=True),
    "weight_decay": Range(0, 0.1),  # the paper uses 1e-4; at 0.1 the decay swamps every gradient
    "batch_size": Range(1, MAX_BATCH_SIZE),
    "warmup_lr": Range(0, MAX_LR, low_open=True),
    "warmup_until_err": Range(0, 100),  # a training error in percent; 0 is never reached: the whole run warms up
    # a fact, not a sanity bound: the trainer seeds torch with seed * 1_000_003 + epoch, which must fit in 64 bits
    "seed": Range(0, 2**31, high_open=True, why=" (the trainer derives 64-bit RNG seeds from it)"),
    "train_size": Range(1, MAX_IMAGES),
    "test_size": Range(1, MAX_IMAGES),
    "val_split": Range(0, MAX_IMAGES),
    "eval_batch_size": Range(1, MAX_BATCH_SIZE),
    "jobs": Range(1, MAX_CELLS),
    "group_seeds": Range(1, MAX_GROUP_SEEDS),
}


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(map(str, value))
    return str(value)


# ----------------------------------------------------------------------------- validation

_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _convert(value: Any, hint: Any) -> Any:
    """`value` as a field of type `hint` holds it (an integer as a float where a number is meant, 64e3 as 64000 where
    an integer is); else a ValueError saying what `hint` allows. YAML's true is not an integer here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError("one of " + ", ".join(map(repr, args)))
    if origin is list:  # only list[int]: the milestones
        if isinstance(value, list):
            try:
                return [_convert(item, args[0]) for item in value]
            except ValueError:
                pass
        raise ValueError(f"a list of {_WORDS[args[0]].split()[-1]}s")
    if origin in (Union, types.UnionType):
        allowed = []
        for arg in args:
            try:
                return _convert(value, arg)
            except ValueError as err:
                allowed.append(str(err))
        raise ValueError(" or ".join(allowed))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float and number:
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float: infinite, and refused as such
            return math.inf if value > 0 else -math.inf
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if (number or hint is not int) and isinstance(value, hint):
        return value
    raise ValueError(_WORDS[hint])


def _check(value: Any, hint: Any, source: str, prefix: str, key: str) -> Any:
    """`value` of the key `prefix + key` converted to `hint` and inside the key's range, or a ConfigError naming it."""
    try:
        value = _convert(value, hint)
    except ValueError as err:
        raise ConfigError(source, prefix + key, f"expected {err}, got {_show(value)}") from None
    allowed = RANGES.get(key)
    if allowed is None or not isinstance(value, (int, float)):  # None, "auto" (a bool never passes a numeric type)
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, prefix + key, f"must be a finite number, got {_show(value)}")
    if value not in allowed:
        raise ConfigError(source, prefix + key, f"must be in {allowed}{allowed.why}, got {_show(value)}")
    return value


def _reject_unknown(section: dict[str, Any], allowed: typing.Iterable[str], source: str, prefix: str) -> None:
    allowed = tuple(allowed)
    for key in section:
        if key not in allowed:
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in allowed else difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f" — did you mean {close[0]!r}?" if close else ""
            raise ConfigError(source, f"{prefix}{key}", f"unknown key{hint} (allowed: {', '.join(allowed)})")


def _section(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"expected a mapping of keys to values, got {_show(value)}")
    return value


def _checked(values: dict[str, Any], types: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """A YAML mapping with every key known and every value of its type and in its range."""
    _reject_unknown(values, types, source, prefix)
    return {k: _check(v, types[k], source, prefix, k) for k, v in values.items()}


def _data_spec(values: dict[str, Any], source: str) -> DataSpec:
    spec = DataSpec(**_checked(values, typing.get_type_hints(DataSpec), source, "data."))
    if spec.source == "folder" and not spec.path:
        raise ConfigError(source, "data.path", "source 'folder' needs a path to a train/<class>/, test/<class>/ folder or a .tar.gz of one")
    if spec.path is not None and not spec.path.isprintable():
        raise ConfigError(source, "data.path", f"must not contain NUL, newlines or other control characters, got {_show(spec.path)}")
    left = spec.known_train_images()
    if left is not None and left < 1:
        raise ConfigError(source, "data.val_split", f"leaves no training images: at most {spec.val_split + left - 1:,} of "
                                                    f"{spec.val_split + left:,} can be held out, got {spec.val_split:,}")
    return spec


def _runtime_spec(values: dict[str, Any], source: str) -> RuntimeSpec:
    spec = RuntimeSpec(**_checked(values, typing.get_type_hints(RuntimeSpec), source, "runtime."))
    index = re.fullmatch(r"cuda:([0-9]{1,3})", spec.device)
    if spec.device not in ("auto", "cpu", "cuda") and not (index and int(index.group(1)) <= MAX_CUDA_INDEX):
        raise ConfigError(source, "runtime.device", f"expected auto, cpu, cuda or cuda:N (N up to {MAX_CUDA_INDEX}), got {_show(spec.device)}")
    return spec


def _train_spec(base: dict[str, Any], options: dict[str, Any], source: str, where: str) -> TrainSpec:
    """The recipe `base` with the checked train `options` set: naming only one of iterations and epochs means that one."""
    other = {"epochs": "iterations", "iterations": "epochs"}
    spec = TrainSpec(**{**base, **{other[k]: None for k in other if k in options and other[k] not in options}, **options})
    if (spec.iterations is None) == (spec.epochs is None):
        raise ConfigError(source, where, "set exactly one of 'iterations' and 'epochs'")
    length, unit = (spec.iterations, "iterations") if spec.iterations is not None else (spec.epochs, "epochs")
    points = spec.decay_points()
    if any(b <= a for a, b in zip(points, points[1:])) or any(not 0 < p < length for p in points):
        raise ConfigError(source, f"{where}.milestones", f"must increase strictly and lie inside the run (0 < m < {length} {unit}); got {points}")
    return spec


# ----------------------------------------------------------------------------- the grid


def expand_grid(options: dict[str, Any], source: str, where: str, limit: int = MAX_CELLS) -> list[dict[str, Any]]:
    """Every combination of the listed option values, each checked, as flat option dicts (in file order).

    A list is a choice, except for the milestones, which are one list (a list of lists is a choice of them).
    More than `limit` combinations is refused before any is built: a few long lists multiply fast.
    """
    _reject_unknown(options, OPTION_TYPES, source, f"{where}.")
    values = []
    for key, value in options.items():
        listed = isinstance(value, list) and (key != "milestones" or (value and all(isinstance(v, list) for v in value)))
        choices = value if listed else [value]
        if not choices:
            raise ConfigError(source, f"{where}.{key}", "is an empty list: nothing to run")
        values.append([_check(v, OPTION_TYPES[key], source, f"{where}.", key) for v in choices])
    count = math.prod(map(len, values))
    if count > limit:
        raise ConfigError(source, where, f"makes {count:,} cells, which brings the sweep past {MAX_CELLS:,} cells (a sanity bound)")
    return [dict(zip(options, combo)) for combo in itertools.product(*values)]


def _make_cell(options: dict[str, Any], base: dict[str, Any], model: dict[str, Any], data: DataSpec, source: str, where: str) -> Cell:
    for key in ("arch", "depth"):
        if key not in options:
            raise ConfigError(source, where, f"every cell needs '{key}' (set it in grid or in the cell)")
    problem = depth_error(options["depth"])
    if problem:
        raise ConfigError(source, f"{where}.depth", problem)
    spec = _train_spec(base, {k: v for k, v in options.items() if k in TRAIN_KEYS}, source, where)
    net = NetSpec(options["arch"], options["depth"], **{**model, **{k: v for k, v in options.items() if k in MODEL_KEYS}})
    problem = net_spec_error(net)
    if problem:
        raise ConfigError(source, where, problem)
    net = net.canonical()
    return Cell(arch=net.arch, depth=net.depth, seed=options.get("seed", 0), shortcut=net.shortcut, train=spec, data=data,
                net_options=tuple((k, v) for k, v in net.non_default() if k != "shortcut"))


def _name_variants(cells: list[Cell]) -> list[Cell]:
    """Drop duplicates; where one net and seed has several recipes, name them by what differs.

    A lone recipe keeps the short id (`residual-110-s0`): names stay readable, and a changed
    recipe under the same name is caught by its fingerprint rather than silently renamed.
    """
    unique = list({c.fingerprint(): c for c in cells}.values())
    groups: dict[tuple, list[Cell]] = {}
    for cell in unique:
        groups.setdefault((cell.arch, cell.depth, cell.shortcut, cell.net_options, cell.seed), []).append(cell)
    named = []
    for cell in unique:
        siblings = groups[(cell.arch, cell.depth, cell.shortcut, cell.net_options, cell.seed)]
        recipes = [dataclasses.asdict(c.train) for c in siblings]
        differing = [k for k in TRAIN_KEYS if len({json.dumps(r[k]) for r in recipes}) > 1]
        named.append(dataclasses.replace(cell, tags=tuple((k, getattr(cell.train, k)) for k in differing)))
    return named


def _name_error(name: Any) -> Optional[str]:
    """Why `name` cannot be the results folder's name, or None when it can."""
    if name is None:
        return "is required: the results folder's name"
    if not isinstance(name, str):
        return "expected a string: the results folder's name"
    if not name.strip():
        return "must not be blank"
    if not name.isprintable():
        return "must not contain NUL, newlines or other control characters"
    if len(name.encode()) > MAX_NAME_LENGTH:
        return f"is {len(name.encode())} bytes long in UTF-8; at most {MAX_NAME_LENGTH} make a folder name"
    if any(c in name for c in "/\\") or name.startswith(".") or name != name.strip():
        return "must be one folder name: no slashes, not starting with a dot, no spaces at either end"
    return None


def check_fits_data(config: SweepConfig, n_train: int) -> None:
    """Refuse cells whose batch is larger than the `n_train` training images (after data.val_split).

    Such a cell could not draw a single batch. The sweep calls this with the real count as soon as
    the images are loaded, before it writes anything; parse_config calls it when the config tells the count.
    """
    for cell in config.cells:
        if cell.train.batch_size > n_train:
            after = " left after data.val_split" if config.data.val_split else ""
            raise ConfigError(config.source, "batch_size", f"{cell.id} uses {cell.train.batch_size:,}, more than the "
                                                           f"{n_train:,} training images{after}: at most {n_train:,}")


def _combos(raw: dict[str, Any], source: str) -> list[tuple[dict[str, Any], str]]:
    """The grid's and the extra cells' option dicts, each with where it came from; at most MAX_CELLS in all."""
    combos = [(c, "grid") for c in expand_grid(_section(raw, "grid", source), source, "grid")] if raw.get("grid") else []
    extra = raw.get("cells") or []
    if not isinstance(extra, list):
        raise ConfigError(source, "cells", f"expected a list of cells, got {_show(extra)}")
    for i, entry in enumerate(extra):
        if not isinstance(entry, dict):
            raise ConfigError(source, f"cells[{i}]", f"expected a mapping of cell options, got {_show(entry)}")
        combos += [(c, f"cells[{i}]") for c in expand_grid(entry, source, f"cells[{i}]", MAX_CELLS - len(combos))]
    if not combos:
        raise ConfigError(source, "grid", "no cells: give a grid (arch, depth, seed, …) or a list of cells")
    return combos


def parse_config(raw: Any, source: str = "<config>") -> SweepConfig:
    """Validate a loaded YAML document and expand it into cells."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    _reject_unknown(raw, TOP_KEYS, source, "")
    name, description = raw.get("name"), raw.get("description")
    problem = _name_error(name)
    if problem:
        raise ConfigError(source, "name", f"{problem}, got {_show(name)}")
    if not isinstance(description, (str, type(None))):
        raise ConfigError(source, "description", f"expected a string, got {_show(description)}")
    data = _data_spec(_section(raw, "data", source), source)
    runtime = _runtime_spec(_section(raw, "runtime", source), source)
    model = _checked(_section(raw, "model", source), {k: OPTION_TYPES[k] for k in MODEL_KEYS}, source, "model.")
    train = _checked(_section(raw, "train", source), typing.get_type_hints(TrainSpec), source, "train.")
    base = dataclasses.asdict(_train_spec(dataclasses.asdict(TrainSpec()), train, source, "train"))
    cells = _name_variants([_make_cell(options, base, model, data, source, where) for options, where in _combos(raw, source)])
    for cell in cells:
        if len(cell.id.encode()) > MAX_CELL_ID_LENGTH:
            raise ConfigError(source, "grid", f"cell id {_show(cell.id)} is {len(cell.id.encode())} bytes; at most {MAX_CELL_ID_LENGTH} "
                                              "fit in a file name (each train option that differs between cells is part of the id)")
    config = SweepConfig(name=name, data=data, runtime=runtime, cells=cells, source=source, description=description)
    if data.known_train_images() is not None:
        check_fits_data(config, data.known_train_images())
    return config


# ----------------------------------------------------------------------------- reading the file


FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 floats: YAML 1.1 (PyYAML's default) needs a dot, so `5e-4` would be the string "5e-4".
YAML12_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                                |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                                |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                                |[-+]?\.(?:inf|Inf|INF)
                                |\.(?:nan|NaN|NAN))$""", re.X)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that sets one key twice (YAML would keep the last silently); its args: the key, its lines."""


class SweepLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats, refused duplicate keys, and unreadable scalars as YAML errors."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in first_lines:
                    raise DuplicateKeyError(key, first_lines[key], line)
                first_lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML raises ValueError for `2024-13-01` or `!!int x`; make it a YAML error with its place."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as err:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {_show(node.value)} as {node.tag}: {err}",
                                                    node.start_mark) from None


SweepLoader.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+.0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`; every way it can be unreadable is a ConfigError."""
    try:
        return yaml.load(text, Loader=SweepLoader)
    except DuplicateKeyError as err:
        key, first_line, line = err.args
        raise ConfigError(source, str(key), f"duplicate key on line {line} (first set on line {first_line}): keep one") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, "", f"not valid YAML: {where}{getattr(err, 'problem', None) or err}") from None
    except RecursionError:
        raise ConfigError(source, "", "nested too deeply: a sweep file needs only a few levels of mappings and lists") from None


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> SweepConfig:
    """Read a sweep file, apply the command line's `--set KEY=VALUE` overrides to it, and validate the result.

    The overrides change the document before validation, so a bad value is refused exactly as in the
    file, and the message names the override (`--set train.lr`) rather than a line of the file.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, "", "no such file")
    not_text = "not a UTF-8 text file: a sweep file is YAML text"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(source, "", f"cannot read it: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", not_text) from None
    if "\0" in text:  # valid UTF-8 can still be binary
        raise ConfigError(source, "", not_text)
    raw = load_yaml(text, source)
    if raw is None:
        raise ConfigError(source, "", f"is empty: a sweep file is a mapping with keys {', '.join(TOP_KEYS)}")
    if not overrides:
        return parse_config(raw, source)
    parsed = [parse_override(item) for item in overrides]
    raw = apply_overrides(raw, parsed, source)
    try:
        config = parse_config(raw, source)
    except ConfigError as err:
        raise _blame_override(err, [key for key, _ in parsed]) from None
    return dataclasses.replace(config, overrides=tuple(overrides))


# ----------------------------------------------------------------------------- command-line overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` as ("train.lr", 0.05): the value read as YAML 1.2, as in a sweep file (`[0, 1]` is a list)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", _show(text), "expected KEY=VALUE with a dotted key, e.g. train.lr=0.05 or grid.seed=[0,1,2]")
    return key, load_yaml(value, f"--set {key}")


def apply_overrides(raw: Any, overrides: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """A copy of the document `raw` with each (dotted key, value) set, creating missing sections on the way.

    Setting `train.epochs` drops the file's `train.iterations` (and the other way round) unless both are
    set: the same rule as for a cell that names one of them, so the override means what it says.
    """
    document = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    given = {key for key, _ in overrides}
    for key, value in overrides:
        *parents, leaf = key.split(".")
        section = document
        for depth, part in enumerate(parents):
            if section.get(part) is None:  # absent, or an empty `runtime:` in the file
                section[part] = {}
            section = section[part]
            if not isinstance(section, dict):
                raise ConfigError(source, f"--set {key}", f"{'.'.join(parents[:depth + 1])} is {_show(section)}, not a mapping of keys")
        section[leaf] = value
        other = {"epochs": "iterations", "iterations": "epochs"}.get(leaf)
        if other and ".".join(parents + [other]) not in given:
            section.pop(other, None)
    return document


def with_overrides(config: SweepConfig, data_path: str | None = None, device: str | None = None,
                   jobs: int | None = None, tensorboard: bool = False) -> SweepConfig:
    """The config with command-line choices applied, validated as the file is; none of them changes what a cell means."""
    data = config.data
    if data_path is not None:
        if data.source == "synthetic":
            raise ConfigError(config.source, "data.source", "is 'synthetic': --data does not apply (set data.source to cifar10 or folder)")
        data = _data_spec({**dataclasses.asdict(data), "path": data_path}, "--data")
    chosen = {"device": device, "jobs": jobs, "tensorboard": tensorboard or None}
    runtime = _runtime_spec({**dataclasses.asdict(config.runtime), **{k: v for k, v in chosen.items() if v is not None}}, "command line")
    cells = [dataclasses.replace(cell, data=data) for cell in config.cells]
    return dataclasses.replace(config, data=data, runtime=runtime, cells=cells)


def _blame_override(err: ConfigError, keys: list[str]) -> ConfigError:
    """The validation error `err` named after the override it concerns (`--set train.lr`), or unchanged if none does."""
    for key in reversed(keys):  # the last override of a key is the one that counts
        if err.key == key or err.key.startswith((key + ".", key + "[")) or key.startswith(err.key + ".") or key.endswith("." + err.key):
            where = f"--set {key}" if err.key in (key, key.split(".")[-1]) else f"--set {key} ({err.key})"
            return ConfigError(err.source, where, err.message)
    return err
