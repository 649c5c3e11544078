"""What is committed carries no path of the machine it was made on (examples, configs, docs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:home|root|work|Users|tmp)/[\w.-]+")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if n.startswith(("docs/", "configs/")) and n.endswith((".yaml", ".json", ".md", ".csv"))]


def test_examples_configs_and_docs_name_no_path_of_a_machine() -> None:
    found = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in tracked_text_files()
             for match in MACHINE_PATH.finditer(path.read_text(errors="replace"))]
    assert not found, found
