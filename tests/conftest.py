"""Shared fixtures: a throwaway cache, tiny sweep files, and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from depthlab.cli import app

SHARED_TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write the user's ~/.cache/depthlab from tests."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("DEPTHLAB_CACHE", str(cache))
    return cache


def tiny_sweep(**overrides) -> dict:
    """A sweep that trains in about a second per cell on the CPU."""
    config = {
        "name": "tiny",
        "data": {"source": "synthetic", "train_size": 256, "test_size": 128},
        "train": {"epochs": 2, "milestones": [1], "batch_size": 64},
        "runtime": {"device": "cpu"},
        "grid": {"arch": ["plain", "residual"], "depth": [8], "seed": [0]},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def cli():
    """Run `depthlab ARGS…` in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
