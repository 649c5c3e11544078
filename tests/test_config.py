"""Sweep files: how a grid expands into cells, and how mistakes are reported (exit 2, key named, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from depthlab.config import ConfigError, load_config, parse_config

from .conftest import tiny_sweep, write_config


def test_the_grid_is_the_product_of_its_lists() -> None:
    config = parse_config(tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8, 14, 20], "seed": [0, 1]}))
    assert len(config.cells) == 12
    assert {(c.arch, c.depth, c.seed) for c in config.cells} == {
        (a, d, s) for a in ("plain", "residual") for d in (8, 14, 20) for s in (0, 1)}


def test_extra_cells_join_the_grid_with_their_own_options() -> None:
    config = parse_config(tiny_sweep(cells=[{"arch": "residual", "depth": 14, "seed": [0, 1], "warmup_lr": 0.01}]))
    extra = [c for c in config.cells if c.depth == 14]
    assert [c.id for c in extra] == ["residual-14-s0", "residual-14-s1"]
    assert all(c.train.warmup_lr == 0.01 for c in extra)


def test_plain_nets_ignore_the_shortcut_option_so_they_are_not_trained_twice() -> None:
    config = parse_config(tiny_sweep(grid={"arch": ["plain", "residual"], "depth": [8], "shortcut": ["A", "B"]}))
    assert sorted(c.id for c in config.cells) == ["plain-8-s0", "residual-8-B-s0", "residual-8-s0"]


def test_recipes_that_differ_for_the_same_net_are_named_by_what_differs() -> None:
    config = parse_config(tiny_sweep(grid={"arch": ["plain"], "depth": [8], "lr": [0.1, 0.05]}))
    assert sorted(c.id for c in config.cells) == ["plain-8-lr=0.05-s0", "plain-8-lr=0.1-s0"]


def test_epochs_in_a_section_replace_the_paper_default_of_iterations() -> None:
    config = parse_config(tiny_sweep(train={"epochs": 10}))
    spec = config.cells[0].train
    assert (spec.iterations, spec.epochs, spec.decay_points()) == (None, 10, [5, 7])


def test_the_defaults_are_the_papers_recipe() -> None:
    config = parse_config({"name": "p", "grid": {"arch": "residual", "depth": 20}})
    spec = config.cells[0].train
    assert (spec.iterations, spec.decay_points(), spec.lr, spec.momentum, spec.weight_decay, spec.batch_size) == (
        64_000, [32_000, 48_000], 0.1, 0.9, 1e-4, 128)
    assert config.cells[0].shortcut == "A" and config.data.normalize == "pixel_mean"


def test_a_changed_recipe_changes_the_fingerprint_but_not_a_device_choice() -> None:
    a = parse_config(tiny_sweep()).cells[0]
    b = parse_config(tiny_sweep(train={"epochs": 3, "batch_size": 64})).cells[0]
    c = parse_config(tiny_sweep(runtime={"device": "auto", "jobs": 2})).cells[0]
    assert a.id == b.id and a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == c.fingerprint()


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"grid": {"arch": ["plain"], "depth": [21]}}, "grid.depth", "6n+2"),
        ({"grid": {"arch": ["resnet"], "depth": [8]}}, "grid.arch", "'plain', 'residual'"),
        ({"grid": {"arch": ["plain"], "depht": [8]}}, "grid.depht", "did you mean 'depth'"),
        ({"train": {"lr": "fast"}}, "train.lr", "expected a number"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "integer"),
        ({"train": {"epochs": 4, "milestones": [3, 2]}}, "train.milestones", "increase"),
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate", "did you mean 'lr'"),
        ({"data": {"source": "imagenet"}}, "data.source", "'cifar10', 'folder', 'synthetic'"),
        ({"data": {"source": "folder"}}, "data.path", "needs a path"),
        ({"runtime": {"device": "tpu"}}, "runtime.device", "auto, cpu, cuda"),
        ({"grid": {"arch": ["plain"], "depth": []}}, "grid.depth", "empty"),
        ({"grid": None}, "grid", "no cells"),
        ({"name": "a/b"}, "name", "folder name"),
        ({"epochs": 3}, "epochs", "unknown key"),
    ],
)
def test_mistakes_name_the_key_and_what_is_allowed(change: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_sweep(**change), source="sweep.yaml")
    assert err.value.key == key
    assert message in err.value.message
    assert str(err.value).startswith(f"sweep.yaml: {key}: ")


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngrid: {arch: [plain\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML: line \d+"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\ngrid: {arch: plain, depth: 9}\n", "grid.depth"),
        ("name: t\ngrid: {arch: plain, depth: 8}\ntrain: {lr: fast}\n", "train.lr"),
        ("name: t\ngrid: {arch: plain, depth: 8}\ntrian: {}\n", "did you mean 'train'"),
        ("name: t\ngrid: [arch\n", "not valid YAML"),
    ],
)
def test_the_cli_exits_2_with_a_one_line_error_and_writes_nothing(tmp_path: Path, cli, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    result = cli("sweep", path, "--out", out)
    assert result.exit_code == 2
    assert expected in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path, cli) -> None:
    result = cli("sweep", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_the_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    configs = {p.stem: load_config(p) for p in root.glob("*.yaml")}
    assert {"cifar", "quick", "smoke"} <= set(configs)
    paper = configs["cifar"]
    assert sorted({(c.arch, c.depth) for c in paper.cells}) == sorted(
        [("plain", d) for d in (20, 32, 44, 56)] + [("residual", d) for d in (20, 32, 44, 56, 110)])
    assert len({c.seed for c in paper.cells}) >= 2  # the verdict needs two seeds per net
    resnet110 = next(c for c in paper.cells if c.depth == 110)
    assert resnet110.train.warmup_lr == 0.01 and resnet110.train.iterations == 64_000
    assert yaml.safe_load((root / "smoke.yaml").read_text())["data"]["source"] == "synthetic"
