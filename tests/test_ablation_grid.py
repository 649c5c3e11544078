"""The ablation axes on the sweep grid: each option its own cell, name and row; the 2015 nets unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from depthlab.config import ConfigError, parse_config
from depthlab.models import build_net, net_size
from depthlab.options import NetSpec

from .conftest import tiny_sweep, write_config


def ablation_sweep(**grid) -> dict:
    return tiny_sweep(grid={"arch": ["residual"], "depth": [8], "seed": [0], **grid})


def test_each_ablation_value_is_its_own_cell_named_by_what_differs() -> None:
    config = parse_config(ablation_sweep(shortcut_scale=[1.0, 0.0], norm=["bn", "none"], block=["post", "pre"]))
    ids = [c.id for c in config.cells]
    assert len(set(ids)) == 8
    assert "residual-8-s0" in ids and "residual-8-shortcut_scale=0.0-norm=none-block=pre-s0" in ids
    assert len({c.fingerprint() for c in config.cells}) == 8


def test_the_2015_nets_keep_their_names_and_fingerprints() -> None:
    """A cell that uses no ablation option writes no 'net' key, so results trained before the axes existed stay valid."""
    cell = parse_config(ablation_sweep(init=["he"], block=["post"], norm=["bn"])).cells[0]
    assert cell.id == "residual-8-s0" and "net" not in cell.to_dict()
    assert cell.fingerprint() == parse_config(ablation_sweep()).cells[0].fingerprint()


def test_residual_pre_activation_cells_of_the_old_layer_order_are_stale() -> None:
    """The pre-activation ResNet now follows the 2016 reference code: a cell trained as the earlier net must not resume
    into it. Its fingerprint carries the net's revision; the plain pre net (the same layers as post) keeps its own."""
    pre, plain_pre = parse_config(tiny_sweep(grid={"arch": ["residual", "plain"], "depth": [8], "seed": [0], "block": ["pre"]})).cells
    assert pre.to_dict()["net_revision"] >= 2 and "net_revision" not in plain_pre.to_dict()
    earlier = {k: v for k, v in pre.to_dict().items() if k not in ("id", "tags", "net_revision")}
    assert pre.fingerprint() != hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:16]


def test_a_cell_trains_the_net_its_options_name() -> None:
    cell = parse_config(ablation_sweep(family=["mlp"], shortcut=["B"], init=["zero_gamma"])).cells[0]
    assert cell.net_spec() == NetSpec("residual", 8, family="mlp", shortcut="B", init="zero_gamma")
    assert net_size(cell.net_spec())[0] == sum(p.numel() for p in build_net(cell.net_spec()).parameters())


@pytest.mark.parametrize("options, words", [({"arch": ["plain"], "init": ["zero_gamma"]}, "zero_gamma"),
                                            ({"norm": ["layer"]}, "norm"), ({"shortcut_scale": [float("nan")]}, "shortcut_scale")],
                         ids=["zero-gamma-on-a-plain-net", "unknown-norm", "nan-scale"])
def test_impossible_nets_are_config_errors_that_name_the_option(options: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(ablation_sweep(**options))


def test_model_section_sets_an_option_for_every_cell() -> None:
    raw = ablation_sweep(arch=["plain", "residual"])
    raw["model"] = {"norm": "none"}
    assert [c.id for c in parse_config(raw).cells] == ["plain-8-norm=none-s0", "residual-8-norm=none-s0"]


def test_the_sweep_file_as_run_keeps_the_ablation_options() -> None:
    config = parse_config(ablation_sweep(block=["post", "pre"], init=["he", "delta_orthogonal"]))
    again = parse_config(yaml.safe_load(yaml.safe_dump(config.to_document(), sort_keys=False)))
    assert again.cells == config.cells


def test_a_sweep_over_an_axis_reports_each_value_as_its_own_row(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ablation.yaml", tiny_sweep(
        train={"epochs": 1, "batch_size": 64}, grid={"arch": ["plain", "residual"], "depth": [8], "seed": [0], "block": ["post", "pre"]}))
    result = cli("sweep", config, "--out", tmp_path / "out", "--jobs", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(cli("report", tmp_path / "out", "--format", "json").stdout)
    assert sorted((r["arch"], r["variant"]) for r in report["rows"]) == [("plain", ""), ("plain", "block=pre"),
                                                                          ("residual", ""), ("residual", "block=pre")]
    # each variant is judged against its baseline; one depth gives no depth effect to compare
    assert sorted((a["arch"], a["variant"], a["n_seeds"]) for a in report["ablations"]) == [("plain", "block=pre", 0),
                                                                                             ("residual", "block=pre", 0)]
    assert all(a["reading"].startswith("no comparison") for a in report["ablations"])
