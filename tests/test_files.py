"""Result files are written atomically, and readable like any file the user creates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from depthlab import files


def test_an_atomic_write_leaves_the_new_content_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "summary.json"
    files.write_json(target, {"x": 1})
    files.write_json(target, {"x": 2})
    assert files.read_json(target) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]


def test_results_get_the_same_permissions_as_a_plainly_created_file(tmp_path: Path) -> None:
    files.write_text(tmp_path / "report.md", "hi")
    (tmp_path / "plain.md").write_text("hi")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "report.md") == mode(tmp_path / "plain.md")
