"""The licence pyproject declares is in the tree, and CITATION.cff says how to cite depthlab and the paper it reproduces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from depthlab import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_the_license_file_is_the_mit_licence_pyproject_declares() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (ROOT / "LICENSE").read_text()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]

    assert declared == "MIT" and text.startswith("MIT License")
    assert "Copyright (c) 2026 the depthlab authors" in text and "WITHOUT WARRANTY OF ANY KIND" in text


def test_citation_cff_names_depthlab_its_version_and_licence_and_the_paper() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())

    assert citation["cff-version"] == "1.2.0" and citation["title"].startswith("depthlab")
    assert citation["version"] == __version__ and citation["license"] == "MIT"
    paper = citation["references"][0]
    assert paper["title"] == "Deep Residual Learning for Image Recognition" and paper["doi"] == "10.1109/CVPR.2016.90"
    assert [a["family-names"] for a in paper["authors"]] == ["He", "Zhang", "Ren", "Sun"]
