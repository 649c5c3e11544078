"""The paper beside the result: Table 6's number next to a ResNet trained with the paper's recipe, and nowhere else."""

from __future__ import annotations

from pathlib import Path

from depthlab.report import build_report, report_json, report_markdown

from .test_report import finish, write_sweep


def paper_sweep(tmp_path: Path, train: dict | None = None) -> dict:
    """Plain and ResNet-56 with the paper's recipe (every default), or with `train` changed."""
    raw = {"name": "paper", "data": {"source": "cifar10"}, "grid": {"arch": ["plain", "residual"], "depth": [56], "seed": [0, 1]}}
    if train:
        raw["train"] = train
    cells = write_sweep(tmp_path, raw)
    for i, c in enumerate(cells.values()):
        finish(tmp_path, c, 5.0 + i)
    return cells


def test_a_resnet_with_the_papers_recipe_shows_table_6_beside_it(tmp_path: Path) -> None:
    paper_sweep(tmp_path)
    report = build_report(tmp_path)
    rows = {row["arch"]: row for row in report_json(report)["rows"]}
    assert rows["residual"]["paper_test_err"] == 6.97  # He et al. 2015, Table 6, ResNet-56
    assert rows["plain"]["paper_test_err"] is None  # the paper has only curves for plain nets
    text = report_markdown(report)
    assert "(paper 6.97)" in text and "Table 6" in text and "plain nets only as the curves" in text


def test_another_recipe_gets_no_paper_number(tmp_path: Path) -> None:
    paper_sweep(tmp_path, train={"iterations": 32_000})
    report = build_report(tmp_path)
    assert all(row["paper_test_err"] is None for row in report_json(report)["rows"])
    assert "(paper" not in report_markdown(report)
