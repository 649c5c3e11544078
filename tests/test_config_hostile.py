"""Hostile sweep files: every bad one ends in a ConfigError naming the key, never another exception."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depthlab.config import (
    MAX_CELLS,
    MAX_NAME_LENGTH,
    RANGES,
    TRAIN_KEYS,
    ConfigError,
    SweepConfig,
    check_fits_data,
    load_config,
    parse_config,
    with_overrides,
)
from depthlab.options import ARCHS, MAX_DEPTH, SHORTCUTS, valid_depths

from .conftest import tiny_sweep

GRID = "grid:\n  arch: [plain]\n  depth: [8]\n"
SYNTHETIC = "data: {source: synthetic, train_size: 256}\n"


def _load_text(tmp_path: Path, text: str | bytes) -> SweepConfig:
    path = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return load_config(path)


def _train(line: str) -> str:
    return f"name: t\n{SYNTHETIC}{GRID}train:\n  epochs: 2\n  {line}\n"


# (id, file text, the key the error names, words of the message)
BAD_FILES = [
    ("lr-nan", _train("lr: .nan"), "train.lr", "finite"),
    ("lr-inf", _train("lr: .inf"), "train.lr", "finite"),
    ("lr-overflowing-exponent", _train("lr: 1e400"), "train.lr", "finite"),
    ("lr-huge-integer", _train("lr: " + "9" * 400), "train.lr", "finite"),
    ("lr-decay-nan", _train("lr_decay: .NaN"), "train.lr_decay", "finite"),
    ("momentum-minus-inf", _train("momentum: -.inf"), "train.momentum", "finite"),
    ("weight-decay-nan", _train("weight_decay: .nan"), "train.weight_decay", "finite"),
    ("warmup-lr-inf", _train("warmup_lr: .inf"), "train.warmup_lr", "finite"),
    ("warmup-until-err-nan", _train("warmup_until_err: .nan"), "train.warmup_until_err", "finite"),
    ("lr-zero", _train("lr: 0"), "train.lr", "(0"),
    ("lr-above-sanity-bound", _train("lr: 1e3"), "train.lr", "10.0]"),
    ("momentum-one", _train("momentum: 1"), "train.momentum", "[0, 1)"),
    ("momentum-negative", _train("momentum: -0.9"), "train.momentum", "[0, 1)"),
    ("lr-decay-zero", _train("lr_decay: 0"), "train.lr_decay", "(0, 1]"),
    ("lr-decay-above-one", _train("lr_decay: 10"), "train.lr_decay", "(0, 1]"),
    ("weight-decay-negative", _train("weight_decay: -1e-4"), "train.weight_decay", "[0"),
    ("weight-decay-above-sanity-bound", _train("weight_decay: 5"), "train.weight_decay", "0.1]"),
    ("warmup-lr-zero", _train("warmup_lr: 0"), "train.warmup_lr", "(0"),
    ("warmup-until-err-negative", _train("warmup_until_err: -5"), "train.warmup_until_err", "[0, 100]"),
    ("warmup-until-err-above-100", _train("warmup_until_err: 150"), "train.warmup_until_err", "[0, 100]"),
    ("iterations-huge-integer", f"name: t\n{SYNTHETIC}{GRID}train: {{iterations: {'9' * 400}}}\n", "train.iterations", "10,000,000"),
    ("epochs-never-finish", f"name: t\n{SYNTHETIC}{GRID}train: {{epochs: 1e9}}\n", "train.epochs", "100,000"),
    ("iterations-never-finish", f"name: t\n{SYNTHETIC}{GRID}train: {{iterations: 1e12}}\n", "train.iterations", "10,000,000"),
    ("epochs-non-integral-float", f"name: t\n{SYNTHETIC}{GRID}train: {{epochs: 1.5}}\n", "train.epochs", "integer"),
    ("batch-size-larger-than-synthetic-set", f"name: t\n{SYNTHETIC}{GRID}train: {{epochs: 2, batch_size: 300}}\n",
     "batch_size", "256"),
    ("batch-size-larger-than-default-synthetic-set", f"name: t\ndata: {{source: synthetic}}\n{GRID}train: {{epochs: 2, batch_size: 1001}}\n",
     "batch_size", "1,000"),
    ("batch-size-larger-than-set-after-val-split",
     f"name: t\ndata: {{source: synthetic, train_size: 256, val_split: 200}}\n{GRID}train: {{epochs: 2, batch_size: 64}}\n",
     "batch_size", "data.val_split"),
    ("batch-size-larger-than-cifar", f"name: t\n{GRID}train: {{epochs: 2, batch_size: 60000}}\n", "batch_size", "50,000"),
    ("batch-size-larger-than-cifar-subset", f"name: t\ndata: {{train_size: 100}}\n{GRID}train: {{epochs: 2}}\n", "batch_size", "100"),
    ("val-split-takes-everything", f"name: t\ndata: {{source: synthetic, train_size: 256, val_split: 256}}\n{GRID}",
     "data.val_split", "no training images"),
    ("seed-negative", f"name: t\n{SYNTHETIC}grid: {{arch: plain, depth: 8, seed: -1}}\n", "grid.seed", "2,147,483,648"),
    ("seed-overflows-rng", f"name: t\n{SYNTHETIC}grid: {{arch: plain, depth: 8, seed: 2147483648}}\n", "grid.seed", "RNG"),
    ("train-size-terabytes", "name: t\ndata: {source: synthetic, train_size: 1e12}\n" + GRID, "data.train_size", "1,000,000"),
    ("test-size-terabytes", "name: t\ndata: {source: synthetic, test_size: 1e12}\n" + GRID, "data.test_size", "1,000,000"),
    ("val-split-terabytes", "name: t\ndata: {source: folder, path: x, val_split: 1e12}\n" + GRID, "data.val_split", "1,000,000"),
    ("val-split-negative", "name: t\ndata: {val_split: -1}\n" + GRID, "data.val_split", "[0"),
    ("eval-batch-terabytes", f"name: t\n{SYNTHETIC}runtime: {{eval_batch_size: 1e10}}\n{GRID}", "runtime.eval_batch_size", "65,536"),
    ("batch-size-terabytes", f"name: t\ndata: {{source: folder, path: x}}\n{GRID}train: {{batch_size: 1e10}}\n",
     "train.batch_size", "65,536"),
    ("jobs-zero", f"name: t\n{SYNTHETIC}runtime: {{jobs: 0}}\n{GRID}", "runtime.jobs", "[1"),
    ("device-index-wraps-in-torch", f"name: t\n{SYNTHETIC}runtime: {{device: 'cuda:99999'}}\n{GRID}", "runtime.device", "127"),
    ("device-unicode-digit", f"name: t\n{SYNTHETIC}runtime: {{device: 'cuda:٣'}}\n{GRID}", "runtime.device", "cuda:N"),
    ("depth-past-max", f"name: t\n{SYNTHETIC}grid: {{arch: residual, depth: {MAX_DEPTH + 6}}}\n", "grid.depth", "1202"),
    ("depth-astronomical", f"name: t\n{SYNTHETIC}grid: {{arch: residual, depth: 6e30}}\n", "grid.depth", "from 8 to"),
    ("binary-file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "", "not a UTF-8 text file"),
    ("latin-1-file", "name: café\n".encode("latin-1") + GRID.encode(), "", "not a UTF-8 text file"),
    ("nul-byte-in-utf-8", b"name: t\x00\n" + GRID.encode(), "", "not a UTF-8 text file"),
    ("deeply-nested", "name: t\ndescription: " + "[" * 5000 + "]" * 5000 + "\n" + GRID, "", "nested too deeply"),
    ("empty-file", "", "", "is empty"),
    ("only-comments", "# nothing here\n", "", "is empty"),
    ("duplicate-top-level-key", f"name: t\n{SYNTHETIC}{GRID}name: u\n", "name", "line 6 (first set on line 1)"),
    ("duplicate-nested-key", f"name: t\n{SYNTHETIC}{GRID}train:\n  lr: 0.1\n  lr: 0.01\n", "lr", "line 7"),
    ("duplicate-key-in-flow-mapping", f"name: t\n{SYNTHETIC}grid: {{arch: plain, depth: 8, depth: 14}}\n", "depth", "duplicate"),
    ("impossible-date", "name: 2024-13-01\n" + GRID, "", "month"),
    ("bad-explicit-int", "name: t\n" + GRID + "train: {epochs: !!int two}\n", "", "line 5"),
    ("name-too-long", f"name: {'n' * (MAX_NAME_LENGTH + 1)}\n{GRID}", "name", f"at most {MAX_NAME_LENGTH}"),
    ("name-too-long-in-utf-8", f"name: {'é' * (MAX_NAME_LENGTH // 2 + 1)}\n{GRID}", "name", "bytes"),
    ("name-nul", 'name: "a\\0b"\n' + GRID, "name", "control characters"),
    ("name-newline", 'name: "a\\nb"\n' + GRID, "name", "control characters"),
    ("name-tab", 'name: "a\\tb"\n' + GRID, "name", "control characters"),
    ("name-lone-surrogate", 'name: "a\\ud800"\n' + GRID, "name", "control characters"),
    ("name-blank", 'name: "   "\n' + GRID, "name", "blank"),
    ("name-missing", GRID, "name", "required"),
    ("name-slash", "name: a/b\n" + GRID, "name", "slashes"),
    ("name-backslash", "name: 'a\\b'\n" + GRID, "name", "slashes"),
    ("name-dot", "name: .\n" + GRID, "name", "dot"),
    ("name-dot-dot", "name: ..\n" + GRID, "name", "dot"),
    ("name-trailing-space", "name: 'a '\n" + GRID, "name", "spaces"),
    ("name-number", "name: 1e5\n" + GRID, "name", "expected a string"),
    ("description-junk", "name: t\ndescription: {a: [1, 2]}\n" + GRID, "description", "string"),
    ("data-path-nul", 'name: t\ndata: {source: folder, path: "a\\0b"}\n' + GRID, "data.path", "control characters"),
    ("cell-id-too-long", f"name: t\n{SYNTHETIC}{GRID}  milestones: [[{', '.join(map(str, range(1, 90)))}], [1]]\n"
                         "train: {epochs: 100, batch_size: 64}\n", "grid", "file name"),
    ("grid-too-many-cells", f"name: t\n{SYNTHETIC}grid: {{arch: plain, depth: 8, seed: {list(range(200))}, lr: "
                            f"{[round(0.001 * i, 3) for i in range(1, 101)]}}}\n", "grid", f"{MAX_CELLS:,}"),
    ("cells-together-too-many", f"name: t\n{SYNTHETIC}cells:\n" + f"  - {{arch: plain, depth: 8, seed: {list(range(4000))}}}\n" * 3,
     "cells[2]", "past 10,000 cells"),
    ("unknown-key-with-newline", f'name: t\n{SYNTHETIC}{GRID}"bad\\nkey": 1\n', "bad\\nkey", "unknown key"),
    ("self-referencing-alias", f"name: t\n{SYNTHETIC}grid: {{arch: plain, depth: 8, seed: &s [*s]}}\n", "grid.seed", "integer"),
    ("top-level-list", "- name: t\n", "", "expected a mapping"),
]


@pytest.mark.parametrize(("text", "key", "words"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_a_bad_file_is_a_config_error_naming_the_key(tmp_path: Path, text: str | bytes, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load_text(tmp_path, text)
    assert err.value.key == key
    assert key in str(err.value) and words in err.value.message
    assert "\n" not in str(err.value), "the CLI prints the error as one line"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("weight_decay: 5e-4", "weight_decay", 5e-4),
        ("lr: 1e-1", "lr", 0.1),
        ("lr: 1E-1", "lr", 0.1),
        ("lr: +1e-2", "lr", 0.01),
        ("momentum: .5", "momentum", 0.5),
        ("lr_decay: 1.", "lr_decay", 1.0),
        ("warmup_until_err: 8E1", "warmup_until_err", 80.0),
    ],
    ids=["5e-4", "1e-1", "upper-case-E", "leading-plus", "leading-dot", "trailing-dot", "exponent-in-percent"],
)
def test_scientific_notation_is_a_number(tmp_path: Path, text: str, key: str, expected: float) -> None:
    config = _load_text(tmp_path, _train(text))
    assert getattr(config.cells[0].train, key) == pytest.approx(expected)


def test_integral_floats_are_accepted_for_integer_keys(tmp_path: Path) -> None:
    config = _load_text(tmp_path, f"name: t\ndata: {{source: folder, path: x}}\n{GRID}  seed: [1e1]\n"
                                  "train: {iterations: 64e3, batch_size: 1.28e2}\n")
    cell = config.cells[0]
    assert (cell.train.iterations, cell.train.batch_size, cell.seed) == (64_000, 128, 10)
    assert all(type(v) is int for v in (cell.train.iterations, cell.train.batch_size, cell.seed))


def test_an_integral_float_means_the_same_cell_as_the_integer(tmp_path: Path) -> None:
    as_float = _load_text(tmp_path, f"name: t\n{GRID}train: {{iterations: 64e3}}\n").cells[0]
    as_int = _load_text(tmp_path, f"name: t\n{GRID}train: {{iterations: 64000}}\n").cells[0]
    assert as_float.fingerprint() == as_int.fingerprint()


def test_the_deepest_net_of_the_paper_is_allowed_and_so_is_max_depth() -> None:
    deepest = max(d for d in valid_depths(MAX_DEPTH) if d <= MAX_DEPTH)
    config = parse_config(tiny_sweep(grid={"arch": "residual", "depth": [1202, deepest]}))
    assert {c.depth for c in config.cells} == {1202, deepest}


def test_the_bounds_themselves_are_allowed() -> None:
    train = {"epochs": 2, "milestones": [1], "batch_size": 256, "momentum": 0.0, "lr_decay": 1.0, "weight_decay": 0.0,
             "warmup_lr": 1e-3, "warmup_until_err": 100.0}
    config = parse_config(tiny_sweep(train=train, grid={"arch": "plain", "depth": 8, "seed": [0, RANGES["seed"].high - 1]}))
    assert {c.seed for c in config.cells} == {0, 2**31 - 1} and config.cells[0].train.batch_size == 256


def test_a_folder_dataset_of_unknown_size_is_checked_once_its_images_are_loaded() -> None:
    config = parse_config(tiny_sweep(data={"source": "folder", "path": "x"}, train={"epochs": 2, "batch_size": 512}))
    check_fits_data(config, 512)
    with pytest.raises(ConfigError) as err:
        check_fits_data(config, 511)
    assert err.value.key == "batch_size" and "plain-8-s0 uses 512" in err.value.message and "at most 511" in err.value.message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"device": "cuda:x"}, "runtime.device"), ({"jobs": 0}, "runtime.jobs"), ({"jobs": MAX_CELLS + 1}, "runtime.jobs"),
     ({"data_path": "a\x00b"}, "data.path")],
    ids=["device", "jobs-zero", "jobs-huge", "data-path-nul"],
)
def test_command_line_overrides_are_validated_like_the_file(overrides: dict, key: str) -> None:
    config = parse_config(tiny_sweep(data={"source": "cifar10", "train_size": 256}))
    with pytest.raises(ConfigError) as err:
        with_overrides(config, **overrides)
    assert err.value.key == key


def test_the_cli_refuses_a_hostile_file_with_one_error_line_and_writes_nothing(tmp_path: Path, cli) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_train("lr: .nan"))
    out = tmp_path / "out"
    result = cli("sweep", path, "--out", out)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "train.lr" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


def test_the_cli_prints_markup_like_values_literally(tmp_path: Path, cli) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: t\n{SYNTHETIC}{GRID}'[/]': 1\n")
    result = cli("sweep", path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "[/]" in result.stderr


# ----------------------------------------------------------------------------- property-based

# Sizes kept small so a generated config parses in milliseconds; the ranges are the schema's own.
SMALL = {"iterations": 10_000, "epochs": 1_000, "batch_size": 512, "test_size": 2_000}


def _number(key: str, allowed: Any, integer: bool) -> st.SearchStrategy:
    high = min(allowed.high, SMALL.get(key, allowed.high))
    if integer:
        return st.integers(int(allowed.low) + allowed.low_open, int(high) - allowed.high_open)
    return st.floats(allowed.low, high, exclude_min=allowed.low_open, exclude_max=allowed.high_open, allow_nan=False)


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A sweep that parse_config must accept, drawn from the schema's types and ranges."""
    integer_keys = {"iterations", "epochs", "batch_size"}
    train = {k: draw(_number(k, r, k in integer_keys)) for k, r in RANGES.items() if k in TRAIN_KEYS and k not in ("iterations", "epochs")
             and draw(st.booleans())}
    length_key = draw(st.sampled_from(["iterations", "epochs"]))
    train[length_key] = draw(_number(length_key, RANGES[length_key], True))
    batch = train.get("batch_size", 128)
    val_split = draw(st.integers(0, 100))
    data = {"source": "synthetic", "train_size": draw(st.integers(batch + val_split, batch + val_split + 1000)), "val_split": val_split}
    if draw(st.booleans()):
        data["test_size"] = draw(_number("test_size", RANGES["test_size"], True))
    grid = {"arch": draw(st.lists(st.sampled_from(ARCHS), min_size=1, max_size=2, unique=True)),
            "depth": draw(st.lists(st.sampled_from(valid_depths(20)), min_size=1, max_size=3, unique=True)),
            "seed": draw(st.lists(st.integers(0, RANGES["seed"].high - 1), min_size=1, max_size=2, unique=True)),
            "shortcut": draw(st.sampled_from(SHORTCUTS))}
    # A leading letter: YAML 1.1's dumper would write a name like "1e5" unquoted, and YAML 1.2 reads that back as a number.
    name = draw(st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_-]{0,%d}\Z" % (MAX_NAME_LENGTH - 1)))
    return {"name": name, "data": data, "train": train, "runtime": {"device": "cpu"}, "grid": grid}


JUNK = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**30, -(10**30), -1, 0, 0.5, 1e300, True, None, "", "x",
                     "\x00", "../..", [], {}, [[[]]], {"a": {"b": [None]}}, 2**31, 2**63]),
    st.integers(), st.floats(), st.text(max_size=20),
    st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a config, for a mutation to pick."""
    if not isinstance(node, dict):
        return []
    return [p for key, value in node.items() for p in [prefix + (key,)] + _paths(value, prefix + (key,))]


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with one value replaced by junk, one key deleted, or an unknown key added."""
    config = copy.deepcopy(draw(valid_configs()))
    path = draw(st.sampled_from(_paths(config)))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "insert"]))
    if action == "replace":
        parent[path[-1]] = draw(JUNK)
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[draw(st.text(max_size=10))] = draw(JUNK)
    return config


@st.composite
def mutated_texts(draw: st.DrawFn) -> bytes:
    """A valid config's YAML with a line duplicated, deleted or replaced by arbitrary bytes."""
    lines = yaml.safe_dump(draw(valid_configs()), sort_keys=False, allow_unicode=True).encode().splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    action = draw(st.sampled_from(["duplicate", "delete", "replace"]))
    if action == "duplicate":
        lines.insert(i, lines[i])
    elif action == "delete":
        del lines[i]
    else:
        lines[i] = draw(st.binary(max_size=30))
    return b"".join(lines)


def _is_config_or_config_error(parse: Any, *args: Any) -> bool:
    """True for a SweepConfig, False for a ConfigError; any other exception fails the test."""
    try:
        return isinstance(parse(*args), SweepConfig)
    except ConfigError as err:
        assert "\n" not in str(err)
        return False


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_configs_drawn_from_the_schema_parse_and_survive_a_round_trip_through_a_file(tmp_path: Path) -> None:
    tried = []

    @FAST
    @given(valid_configs())
    def check(raw: dict[str, Any]) -> None:
        tried.append(raw)
        assert isinstance(parse_config(raw), SweepConfig)
        path = tmp_path / "valid.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
        assert load_config(path).cells == parse_config(raw).cells

    check()
    print(f"{len(tried)} valid configs tried")
    assert tried


def test_a_mutated_config_is_a_sweep_config_or_a_config_error_never_a_crash() -> None:
    outcomes = []

    @FAST
    @given(mutated_configs())
    def check(raw: dict[str, Any]) -> None:
        outcomes.append(_is_config_or_config_error(parse_config, raw))

    check()
    print(f"{len(outcomes)} mutated configs tried, {outcomes.count(False)} refused")
    assert False in outcomes, "some mutations must be refused, or the test mutates nothing"


def test_a_mutated_file_is_a_sweep_config_or_a_config_error_never_a_crash(tmp_path: Path) -> None:
    outcomes = []

    @FAST
    @given(mutated_texts())
    def check(text: bytes) -> None:
        path = tmp_path / "mutated.yaml"
        path.write_bytes(text)
        outcomes.append(_is_config_or_config_error(load_config, path))

    check()
    print(f"{len(outcomes)} mutated files tried, {outcomes.count(False)} refused")
    assert False in outcomes
