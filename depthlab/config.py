"""Sweep configuration: the YAML schema, its validation and the grid of cells it expands to.

A sweep file has the sections `name`, `data`, `model`, `train`, `runtime`, `grid` and `cells`.
`grid` and `cells` use flat cell options (`arch`, `depth`, `seed`, `shortcut` and any `train`
key); every value may be a list, and each combination becomes one cell. User mistakes raise
ConfigError, which names the file, the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .options import ARCHS, SHORTCUTS, depth_error


CIFAR10_TRAIN_IMAGES = 50_000
SYNTHETIC_TRAIN_IMAGES = 1_000  # the synthetic set's size when data.train_size is not given
SYNTHETIC_TEST_IMAGES = 500


class ConfigError(Exception):
    """A mistake in a sweep file: where it is and what is allowed instead."""

    def __init__(self, source: str, key: str, message: str):
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source, self.key, self.message = source, key, message


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

    def expected_train_images(self) -> int:
        """Training images a sweep will see, known without loading them (a folder dataset is assumed CIFAR-sized)."""
        default = SYNTHETIC_TRAIN_IMAGES if self.source == "synthetic" else CIFAR10_TRAIN_IMAGES
        return (self.train_size or default) - self.val_split


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
    precision: Literal["fp32", "bf16"] = "fp32"

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
    """How cells are run. Nothing here changes what a finished cell means."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    jobs: Union[int, Literal["auto"]] = "auto"  # cells trained at once
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = "auto"
    channels_last: Union[bool, Literal["auto"]] = "auto"
    eval_batch_size: int = 1000
    deterministic: bool = False  # GPU: deterministic kernels, no cuDNN autotuning (slower), for bit-identical resumes


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

    @property
    def id(self) -> str:
        parts = [self.arch, str(self.depth)]
        if self.arch == "residual" and self.shortcut != "A":
            parts.append(self.shortcut)
        parts += [f"{k}={_slug(v)}" for k, v in self.tags]
        parts.append(f"s{self.seed}")
        return "-".join(parts)

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
        }

    def fingerprint(self) -> str:
        """A hash of what defines the result (not its name): equal fingerprints mean a finished result is still valid."""
        science = {k: v for k, v in self.to_dict().items() if k not in ("id", "tags")}
        text = json.dumps(science, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: its cells (the grid expanded) and how to run them."""

    name: str
    data: DataSpec
    runtime: RuntimeSpec
    cells: list[Cell]
    source: str = "<config>"
    description: Optional[str] = None

    def to_document(self) -> dict[str, Any]:
        """The sweep as a YAML document with every cell spelled out: `parse_config` of it gives the same cells."""
        document: dict[str, Any] = {"name": self.name}
        if self.description:
            document["description"] = self.description
        document["data"] = dataclasses.asdict(self.data)
        document["runtime"] = dataclasses.asdict(self.runtime)
        document["cells"] = [{"arch": c.arch, "depth": c.depth, "seed": c.seed, "shortcut": c.shortcut,
                              **dataclasses.asdict(c.train)} for c in self.cells]
        return document


CELL_KEYS = ("arch", "depth", "seed", "shortcut")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainSpec))
TOP_KEYS = ("name", "description", "data", "model", "train", "runtime", "grid", "cells")
MODEL_KEYS = ("shortcut",)
SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "batch": "batch_size", "steps": "iterations",
            "iters": "iterations", "max_iters": "iterations", "archs": "arch", "depths": "depth", "seeds": "seed",
            "dataset": "data", "option": "shortcut", "dtype": "precision"}


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(map(str, value))
    return str(value)


# ----------------------------------------------------------------------------- validation


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether `value` fits the type `hint`, and the value converted (int → float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None, None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (Union, types.UnionType):
        for a in args:
            ok, converted = _matches(value, a)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        converted = []
        for item in value:
            ok, c = _matches(item, args[0])
            if not ok:
                return False, value
            converted.append(c)
        return True, converted
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported type {hint}")


def _check(value: Any, hint: Any, source: str, key: str) -> Any:
    ok, converted = _matches(value, hint)
    if not ok:
        raise ConfigError(source, key, f"expected {_describe(hint)}, got {value!r}")
    return converted


def _reject_unknown(section: dict[str, Any], allowed: tuple[str, ...], source: str, prefix: str) -> None:
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
        raise ConfigError(source, key, f"expected a mapping of keys to values, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], source: str, prefix: str) -> Any:
    """A dataclass from a YAML mapping: unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    _reject_unknown(values, names, source, prefix)
    return cls(**{k: _check(v, hints[k], source, prefix + k) for k, v in values.items()})


def _positive(value: Optional[float], source: str, key: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(source, key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _validate_train(spec: TrainSpec, source: str, where: str) -> None:
    if (spec.iterations is None) == (spec.epochs is None):
        raise ConfigError(source, where, "set exactly one of 'iterations' and 'epochs'")
    for key in ("iterations", "epochs", "lr", "batch_size", "warmup_lr", "lr_decay"):
        _positive(getattr(spec, key), source, f"{where}.{key}")
    for key in ("momentum", "weight_decay"):
        _positive(getattr(spec, key), source, f"{where}.{key}", allow_zero=True)
    length = spec.iterations if spec.iterations is not None else spec.epochs
    points = spec.decay_points()
    unit = "iterations" if spec.iterations is not None else "epochs"
    if any(b <= a for a, b in zip(points, points[1:])) or any(not 0 < p < length for p in points):
        raise ConfigError(source, f"{where}.milestones", f"must increase strictly and lie inside the run (0 < m < {length} {unit}); got {points}")


def _validate_data(spec: DataSpec, source: str) -> None:
    for key in ("train_size", "test_size"):
        _positive(getattr(spec, key), source, f"data.{key}")
    _positive(spec.val_split, source, "data.val_split", allow_zero=True)
    if spec.source == "folder" and not spec.path:
        raise ConfigError(source, "data.path", "source 'folder' needs a path to a train/<class>/, test/<class>/ folder or a .tar.gz of one")


def _validate_runtime(spec: RuntimeSpec, source: str) -> None:
    if spec.jobs != "auto":
        _positive(spec.jobs, source, "runtime.jobs")
    _positive(spec.eval_batch_size, source, "runtime.eval_batch_size")
    if not (spec.device in ("auto", "cpu", "cuda") or (spec.device.startswith("cuda:") and spec.device[5:].isdigit())):
        raise ConfigError(source, "runtime.device", f"expected auto, cpu, cuda or cuda:N, got {spec.device!r}")


# ----------------------------------------------------------------------------- the grid


def _option_hint(key: str) -> Any:
    if key in TRAIN_KEYS:
        return typing.get_type_hints(TrainSpec)[key]
    return {"arch": Literal[ARCHS], "depth": int, "seed": int, "shortcut": Literal[SHORTCUTS]}[key]


def _choices(key: str, value: Any) -> list[Any]:
    """The values a grid entry takes: a list is a choice, except for list-typed options."""
    if typing.get_origin(_option_hint(key)) is list or key == "milestones":
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        return [value]
    return value if isinstance(value, list) else [value]


def expand_grid(options: dict[str, Any], source: str, where: str) -> list[dict[str, Any]]:
    """Every combination of the listed option values, as flat option dicts (in file order)."""
    allowed = CELL_KEYS + TRAIN_KEYS
    _reject_unknown(options, allowed, source, f"{where}.")
    keys = list(options)
    values = []
    for key in keys:
        choices = _choices(key, options[key])
        if not choices:
            raise ConfigError(source, f"{where}.{key}", "is an empty list: nothing to run")
        values.append([_check(v, _option_hint(key), source, f"{where}.{key}") for v in choices])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _make_cell(options: dict[str, Any], base: dict[str, Any], default_shortcut: str, data: DataSpec, source: str, where: str) -> Cell:
    for key in ("arch", "depth"):
        if key not in options:
            raise ConfigError(source, where, f"every cell needs '{key}' (set it in grid or in the cell)")
    problem = depth_error(options["depth"])
    if problem:
        raise ConfigError(source, f"{where}.depth", problem)
    train = dict(base)
    overrides = {k: v for k, v in options.items() if k in TRAIN_KEYS}
    if "epochs" in overrides and "iterations" not in overrides:
        train["iterations"] = None  # a cell that says 'epochs' means epochs
    if "iterations" in overrides and "epochs" not in overrides:
        train["epochs"] = None
    train.update(overrides)
    spec = TrainSpec(**train)
    _validate_train(spec, source, where)
    arch = options["arch"]
    shortcut = options.get("shortcut", default_shortcut) if arch == "residual" else "A"
    return Cell(arch=arch, depth=options["depth"], seed=options.get("seed", 0), shortcut=shortcut, train=spec, data=data)


def _name_variants(cells: list[Cell]) -> list[Cell]:
    """Drop duplicates; where one net and seed has several recipes, name them by what differs.

    A lone recipe keeps the short id (`residual-110-s0`): names stay readable, and a changed
    recipe under the same name is caught by its fingerprint rather than silently renamed.
    """
    unique = list({c.fingerprint(): c for c in cells}.values())
    groups: dict[tuple, list[Cell]] = {}
    for cell in unique:
        groups.setdefault((cell.arch, cell.depth, cell.shortcut, cell.seed), []).append(cell)
    named = []
    for cell in unique:
        siblings = groups[(cell.arch, cell.depth, cell.shortcut, cell.seed)]
        recipes = [dataclasses.asdict(c.train) for c in siblings]
        differing = [k for k in TRAIN_KEYS if len({json.dumps(r[k]) for r in recipes}) > 1]
        named.append(dataclasses.replace(cell, tags=tuple((k, getattr(cell.train, k)) for k in differing)))
    return named


def parse_config(raw: Any, source: str = "<config>") -> SweepConfig:
    """Validate a loaded YAML document and expand it into cells."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    _reject_unknown(raw, TOP_KEYS, source, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(source, "name", f"expected a non-empty folder name (no slashes), got {name!r}")
    data = _build(DataSpec, _section(raw, "data", source), source, "data.")
    _validate_data(data, source)
    runtime = _build(RuntimeSpec, _section(raw, "runtime", source), source, "runtime.")
    _validate_runtime(runtime, source)
    model = _section(raw, "model", source)
    _reject_unknown(model, MODEL_KEYS, source, "model.")
    default_shortcut = _check(model.get("shortcut", "A"), Literal[SHORTCUTS], source, "model.shortcut")

    train_raw = _section(raw, "train", source)
    base = dataclasses.asdict(_build(TrainSpec, train_raw, source, "train."))
    if "epochs" in train_raw and "iterations" not in train_raw:
        base["iterations"] = None
    _validate_train(TrainSpec(**base), source, "train")

    combos = expand_grid(_section(raw, "grid", source), source, "grid") if raw.get("grid") else []
    extra = raw.get("cells") or []
    if not isinstance(extra, list):
        raise ConfigError(source, "cells", f"expected a list of cells, got {extra!r}")
    for i, entry in enumerate(extra):
        if not isinstance(entry, dict):
            raise ConfigError(source, f"cells[{i}]", f"expected a mapping of cell options, got {entry!r}")
        combos += [(c, f"cells[{i}]") for c in expand_grid(entry, source, f"cells[{i}]")]
    combos = [c if isinstance(c, tuple) else (c, "grid") for c in combos]
    if not combos:
        raise ConfigError(source, "grid", "no cells: give a grid (arch, depth, seed, …) or a list of cells")

    cells = _name_variants([_make_cell(options, base, default_shortcut, data, source, where) for options, where in combos])
    description = raw.get("description")
    return SweepConfig(name=name, data=data, runtime=runtime, cells=cells, source=source,
                       description=description if isinstance(description, str) else None)


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, "", "no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, "", f"not valid YAML: {where}{getattr(err, 'problem', None) or err}") from None
    return parse_config(raw, source)


def with_overrides(config: SweepConfig, data_path: str | None = None, device: str | None = None,
                   jobs: int | None = None) -> SweepConfig:
    """The config with command-line choices applied; none of them changes what a cell means."""
    data, runtime = config.data, config.runtime
    if data_path is not None:
        if data.source == "synthetic":
            raise ConfigError(config.source, "data.source", "is 'synthetic': --data does not apply (set data.source to cifar10 or folder)")
        data = dataclasses.replace(data, path=data_path)
    if device is not None:
        runtime = dataclasses.replace(runtime, device=device)
    if jobs is not None:
        runtime = dataclasses.replace(runtime, jobs=jobs)
    _validate_runtime(runtime, "--device")
    cells = [dataclasses.replace(cell, data=data) for cell in config.cells]
    return dataclasses.replace(config, data=data, runtime=runtime, cells=cells)
