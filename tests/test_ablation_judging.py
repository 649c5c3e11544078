"""Ablations judged like the verdict: each variant's depth effect against its baseline's, with seed counts and bounds."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
from matplotlib.figure import Figure

from depthlab.ablation import SEEDS_FOR_FINDING, ablation_figure, ablation_markdown, judge_ablations
from depthlab.verdict import welch

COLUMNS = ["arch", "depth", "variant", "seed", "status", "clean_train_err"]


def cells(nets: dict[tuple[str, str], dict[int, list[float]]], status: str = "finished") -> pd.DataFrame:
    """(arch, variant) → depth → one error per seed (seed = position)."""
    rows = [(arch, depth, variant, seed, status, err) for (arch, variant), by_depth in nets.items()
            for depth, errs in by_depth.items() for seed, err in enumerate(errs)]
    return pd.DataFrame(rows, columns=COLUMNS)


BASELINE = {8: [50.0, 51.0, 49.0], 20: [50.5, 51.0, 50.0]}  # depth effects 0.5, 0.0, 1.0


def test_a_variant_is_compared_with_the_same_arch_without_a_variant_seed_by_seed() -> None:
    degrading = {8: [50.0, 51.0, 49.0], 20: [60.0, 62.0, 59.0]}  # effects 10, 11, 10
    [row] = judge_ablations(cells({("residual", ""): BASELINE, ("residual", "norm=none"): degrading,
                                   ("plain", ""): {8: [0.0] * 3, 20: [99.0] * 3}}))
    assert (row["arch"], row["variant"], row["depths"], row["n_seeds"], row["baseline_n_seeds"]) == ("residual", "norm=none", [8, 20], 3, 3)
    assert row["effect"] == pytest.approx(31 / 3) and row["baseline_effect"] == pytest.approx(0.5)
    expected = welch([0.5, 0.0, 1.0], [10.0, 11.0, 10.0])
    assert (row["difference"], row["low"], row["high"]) == pytest.approx((expected.gap, expected.low, expected.high))
    assert row["low"] > 0 and row["reading"].startswith("degrades more with depth than its baseline")


def test_a_variant_that_removes_the_rise_reads_as_degrading_less() -> None:
    plain = {8: [50.0, 51.0, 49.0], 20: [60.0, 62.0, 59.0]}
    flat = {8: [50.0, 51.0, 49.0], 20: [50.5, 51.0, 49.5]}
    [row] = judge_ablations(cells({("plain", ""): plain, ("plain", "init=delta_orthogonal"): flat}))
    assert row["high"] < 0 and row["reading"].startswith("degrades less")


def test_noise_within_the_seed_spread_shows_no_difference() -> None:
    noisy = {8: [50.0, 51.0, 49.0], 20: [49.0, 53.0, 50.0]}  # effects −1, 2, 1 around the baseline's 0.5
    [row] = judge_ablations(cells({("residual", ""): BASELINE, ("residual", "block=pre"): noisy}))
    assert row["low"] < 0 < row["high"] and row["reading"].startswith("no difference shown")


@pytest.mark.parametrize("seeds", [1, 2])
def test_fewer_than_three_seeds_are_indicative_never_a_finding(seeds: int) -> None:
    huge = {8: [10.0, 11.0][:seeds], 20: [90.0, 91.0][:seeds]}
    [row] = judge_ablations(cells({("residual", ""): {d: e[:seeds] for d, e in BASELINE.items()}, ("residual", "norm=none"): huge}))
    assert row["n_seeds"] == seeds < SEEDS_FOR_FINDING
    assert row["reading"].startswith(f"indicative ({seeds} seed") and "not a finding" in row["reading"]
    assert math.isnan(row["low"]) == (seeds == 1)


def test_only_seeds_finished_at_both_depths_count_and_diverged_cells_are_named() -> None:
    frame = cells({("residual", ""): BASELINE, ("residual", "norm=none"): {8: [50.0, 50.0, 50.0, 50.0], 20: [55.0, 56.0, 57.0]}})
    diverged = pd.DataFrame([("residual", 20, "norm=none", 3, "diverged", math.nan)], columns=COLUMNS)
    [row] = judge_ablations(pd.concat([frame, diverged], ignore_index=True))
    assert row["n_seeds"] == 3 and row["n_diverged"] == 1 and "1 diverged cell left out" in row["reading"]


def test_the_depths_are_the_shallowest_and_deepest_both_nets_finished() -> None:
    base = {8: [1.0, 2.0, 3.0], 20: [1.0, 2.0, 3.0], 56: [5.0, 6.0, 7.0]}
    variant = {8: [1.0, 2.0, 3.0], 20: [2.0, 3.0, 4.0]}
    [row] = judge_ablations(cells({("residual", ""): base, ("residual", "shortcut_scale=0.5"): variant}))
    assert row["depths"] == [8, 20] and row["baseline_effect"] == 0.0 and row["effect"] == 1.0


def test_a_variant_without_a_baseline_says_there_is_no_comparison() -> None:
    [row] = judge_ablations(cells({("plain", "norm=none"): {8: [1.0] * 3, 20: [2.0] * 3}}))
    assert row["n_seeds"] == 0 and row["reading"].startswith("no comparison")
    assert ablation_figure([row]) is None


def test_the_table_and_figure_show_every_variant_with_its_seeds() -> None:
    rows = judge_ablations(cells({("residual", ""): BASELINE, ("residual", "norm=none"): {8: [50.0] * 3, 20: [60.0, 61.0, 62.0]},
                                  ("residual", "block=pre"): {8: [50.0] * 3, 20: [50.0, 51.0, 49.0]}}))
    table = ablation_markdown(rows)
    assert table.count("\n") == 2 + len(rows) and "3 / 3" in table and "one-sided 95%" in table
    fig = ablation_figure(rows)
    assert isinstance(fig, Figure) and sum(ax.get_visible() for ax in fig.axes) == len(rows)
    dots = [line for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert sum(len(line.get_xdata()) for line in dots) == 4 * 3  # two nets × two depths × three seeds


def test_the_ablation_module_does_not_need_torch() -> None:
    code = "import sys, depthlab.ablation; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_identical_seeds_still_give_a_bound_of_some_width() -> None:
    """Two error rates per seed each carry the binomial sampling error of their images: zero spread is not zero doubt."""
    flat = {8: [50.0] * 3, 20: [50.0] * 3}
    tiny_rise = {8: [50.0] * 3, 20: [50.0125] * 3}  # one image of 8,000 more wrong, in every seed
    table = cells({("residual", ""): flat, ("residual", "init=zero_gamma"): tiny_rise}).assign(train_size=8000)
    [row] = judge_ablations(table)
    assert row["high"] - row["low"] > 0.5
    assert row["reading"].startswith("no difference shown")
