"""The Figure-6 verdict, specified on crafted cells: each way the old rule was fooled, and simulated sweeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from depthlab import files
from depthlab.results_folder import cell_identity
from depthlab.report import build_report, report_markdown, write_report
from depthlab.verdict import (ALPHA, MARGIN, SEEDS_REQUIRED, binomial_floor, decide, judge, look_number,
                              mean_interval, t_quantile, welch)
from tests.test_report import FIGURE6, cell, finish, finish_all, start, sweep, write_sweep

DEPTHS = (20, 32, 44, 56)
PAPER = {"source": "cifar10", "iterations": 64_000, "batch_size": 128, "train_size": None}


def frame(errors: dict[tuple[str, int], list[float]], status: dict[str, str] | None = None, **data) -> pd.DataFrame:
    """One row per seed, as report hands them over: `errors` are clean training errors, `status` overrides by id."""
    status = status or {}
    rows = []
    for (arch, depth), errs in errors.items():
        for seed, err in enumerate(errs):
            state = status.get(f"{arch}-{depth}-s{seed}", "finished")
            rows.append({"arch": arch, "depth": depth, "variant": "", "seed": seed, "status": state,
                         "clean_train_err": err if state == "finished" else math.nan,
                         "train_err": err + 1 if state in ("finished", "diverged") else math.nan, **{**PAPER, **data}})
    return pd.DataFrame(rows)


def figure6(plain: tuple[float, ...] = (5, 6, 7, 8), residual: tuple[float, ...] = (5, 4.5, 4, 3.5),
            spread: tuple[float, ...] = (-0.1, 0.1)) -> dict[tuple[str, int], list[float]]:
    """Per-seed errors around per-depth means: by default a clear Figure 6 with tight seeds."""
    return {(arch, d): [m + s for s in spread]
            for arch, means in (("plain", plain), ("residual", residual)) for d, m in zip(DEPTHS, means)}


# ----------------------------------------------------------------------------- Student's t and Welch


@pytest.mark.parametrize("p, df, table", [(0.95, 1, 6.314), (0.95, 2, 2.920), (0.95, 5, 2.015), (0.95, 30, 1.697),
                                          (0.975, 1, 12.706), (0.975, 4, 2.776), (0.975, 10, 2.228),
                                          (0.95, math.inf, 1.645)])
def test_t_quantiles_match_the_printed_table(p, df, table):
    # NIST/SEMATECH e-Handbook of Statistical Methods, §1.3.6.7.2, upper critical values of Student's t
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)


def test_t_quantiles_of_fractional_df_lie_between_their_neighbours():
    assert t_quantile(0.95, 2) < t_quantile(0.95, 1.5) < t_quantile(0.95, 1)


def test_welch_bounds_are_the_gap_plus_minus_t_times_the_standard_error():
    diff = welch([1.0, 3.0], [4.0, 8.0])  # variances 2 and 8, n = 2: se² = 1 + 4
    df = 25 / (1 / 1 + 16 / 1)
    assert diff.gap == 4 and diff.df == pytest.approx(df)
    assert diff.low == pytest.approx(4 - t_quantile(0.95, df) * math.sqrt(5))
    assert diff.high == pytest.approx(4 + t_quantile(0.95, df) * math.sqrt(5))


def test_identical_seeds_leave_no_room_around_the_gap_without_a_floor():
    diff = welch([5.0, 5.0], [7.0, 7.0])
    assert diff.low == diff.gap == diff.high == 2


def test_the_binomial_floor_is_the_sampling_variance_of_an_error_rate():
    assert binomial_floor(40.0, 8000) == pytest.approx(40 * 60 / 8000)  # pp²: p(1 − p)/N in percent
    assert binomial_floor(0.0, 8000) > 0  # at least one image wrong: never zero


def test_a_mean_interval_needs_two_seeds():
    assert all(math.isnan(v) for v in mean_interval([5.0]))
    low, high = mean_interval([4.0, 6.0])
    assert low == pytest.approx(5 - 12.706, abs=1e-3) and high == pytest.approx(5 + 12.706, abs=1e-3)


def test_a_folder_written_before_the_variant_was_recorded_is_read_by_its_id():
    assert cell_identity("residual-110-s2", {}) == {"id": "residual-110-s2", "arch": "residual", "depth": 110, "seed": 2,
                                                    "shortcut": None, "variant": ""}
    old_summary = {"arch": "residual", "depth": 56, "seed": 0, "shortcut": "B"}
    assert cell_identity("residual-56-B-s0", old_summary)["variant"] == "B"
    assert cell_identity("plain-20-lr=0.05-s1", {"arch": "plain", "depth": 20, "seed": 1})["variant"] == "lr=0.05"


def test_a_cell_recorded_with_its_fields_is_read_by_them_not_by_its_id():
    described = {"arch": "residual", "depth": 20, "seed": 3, "shortcut": "A", "variant": "init=zero_gamma"}
    assert cell_identity("renamed-folder", described)["variant"] == "init=zero_gamma"


# ----------------------------------------------------------------------------- outcomes on crafted cells


def test_a_clear_figure6_with_two_seeds_is_reproduced():
    verdict = decide(frame(figure6()))
    assert verdict["outcome"] == "reproduced" and verdict["reproduced"] is True
    assert verdict["notes"] == [] and verdict["label"] is None and verdict["seeds_required"] == SEEDS_REQUIRED


def test_a_diverged_deepest_resnet_is_undecided_and_named():
    errors = {**figure6(), ("residual", 110): [3.0, 3.2]}
    verdict = decide(frame(errors, {"residual-110-s0": "diverged"}))
    assert verdict["outcome"] == "undecided" and verdict["reproduced"] is None
    assert "diverged: residual-110-s0" in verdict["reason"] and "warmup_lr" in verdict["reason"]


def test_a_resnet_stuck_at_chance_is_not_reproduced():
    verdict = decide(frame({**figure6(), ("residual", 110): [90.0, 90.1]}))
    assert verdict["outcome"] == "not_reproduced" and verdict["residual_degrades"] is True
    assert f"ResNets degrade by more than {MARGIN} pp: ResNet-20→110" in verdict["reason"]
    assert "ResNet ResNet" not in verdict["reason"]


def test_a_diverged_plain_56_is_undecided_not_a_failed_reproduction():
    verdict = decide(frame(figure6(), {"plain-56-s1": "diverged"}))
    assert verdict["outcome"] == "undecided" and "diverged: plain-56-s1" in verdict["reason"]


def test_missing_unfinished_and_failed_cells_are_named():
    status = {"plain-44-s0": "not started", "plain-56-s0": "running", "plain-56-s1": "failed", "residual-56-s0": "stale"}
    verdict = decide(frame(figure6(), status))
    assert verdict["outcome"] == "undecided"
    for part in ("not started: plain-44-s0", "running: plain-56-s0", "failed: plain-56-s1", "stale: residual-56-s0"):
        assert part in verdict["reason"]


def test_one_seed_is_indicative_with_its_direction():
    verdict = decide(frame(figure6(spread=(0.0,))))
    assert verdict["outcome"] == "undecided" and verdict["reproduced"] is None
    assert verdict["label"] == "indicative (1 seed)"
    assert "plain-20→56 rises +3.00 pp" in verdict["reason"] and "ResNet-20→56 falls -1.50 pp" in verdict["reason"]


def test_one_net_short_of_seeds_is_undecided():
    errors = {**figure6(), ("plain", 56): [8.0]}
    verdict = decide(frame(errors))
    assert verdict["outcome"] == "undecided" and verdict["label"] is None
    assert f"fewer than {SEEDS_REQUIRED} finished seeds at plain-56 (1)" in verdict["reason"]


def test_a_noisy_resnet_cannot_pass_as_not_degrading():
    # ResNet-56 2 points above ResNet-20 with seeds 3 points apart: no evidence either way
    errors = figure6(residual=(5, 5, 5, 7), spread=(-3, 3))
    verdict = decide(frame(errors))
    assert verdict["residual_degrades"] is None and verdict["outcome"] == "undecided"
    assert f"ResNet-20→56 +2.00 pp" in verdict["reason"] and f"not below {MARGIN}" in verdict["reason"]


def test_plain_no_worse_than_resnet_at_the_deepest_depth_is_undecided():
    errors = figure6(plain=(1, 2, 3, 4), residual=(5, 4.8, 4.6, 4.4))
    verdict = decide(frame(errors))
    assert verdict["plain_degrades"] is True and verdict["residual_degrades"] is False
    assert verdict["outcome"] == "undecided" and "plain-56 − ResNet-56 -0.40 pp" in verdict["reason"]
    assert verdict["interaction"]["above_zero"]  # the depth effects differ as claimed; only the levels do not


def test_synthetic_images_are_never_reproduced():
    verdict = decide(frame(figure6(), source="synthetic"))
    assert verdict["outcome"] == "undecided" and verdict["reproduced"] is None
    assert verdict["reason"].startswith("synthetic images check the pipeline, not the science (the numbers: reproduced")


@pytest.mark.parametrize("share, shown", [(0.02, "2.0%"), (0.006, "0.6%"), (0.00003, "0.003%")])
def test_a_tiny_budget_is_never_shown_as_zero_percent(share: float, shown: str):
    from depthlab.verdict import _percent
    assert _percent(share) == shown


def test_a_budget_far_from_the_papers_is_noted_but_does_not_change_the_outcome():
    verdict = decide(frame(figure6(), iterations=1280, train_size=10_000))
    assert verdict["outcome"] == "reproduced"
    assert verdict["notes"] == ["budget: 1,280 iterations × 128 = 2.0% of the paper's 64,000 × 128, on 10,000 of "
                                "50,000 images; the verdict holds for this budget, not for the paper's"]


# ----------------------------------------------------------------------------- end to end through the folder


def test_a_diverged_deepest_resnet_on_disk_is_undecided(tmp_path):
    finish_all(tmp_path, FIGURE6)
    finish(tmp_path, cell("residual", 110, 0), float("nan"), float("nan"), status="diverged")
    finish(tmp_path, cell("residual", 110, 1), 3.0)
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "undecided" and "diverged: residual-110-s0" in verdict["reason"]


def test_cells_of_sweep_yaml_without_results_stop_the_verdict(tmp_path):
    expected = write_sweep(tmp_path, sweep(depth=[20, 32, 44, 56], seed=[0, 1]))
    for c in expected.values():
        if c.depth in (20, 32):
            finish(tmp_path, c, 5.0 + c.depth / 10 + 0.1 * c.seed if c.arch == "plain" else 5.0 - c.depth / 10 + 0.1 * c.seed)
    start(tmp_path, expected["plain-44-s0"], epochs_done=2)
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "undecided"
    assert "not started: plain-44-s1, plain-56-s0" in verdict["reason"] and "running: plain-44-s0" in verdict["reason"]


def test_a_smoke_sweep_on_synthetic_images_checks_the_pipeline(tmp_path):
    finish_all(tmp_path, FIGURE6, source="synthetic")
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "undecided" and verdict["label"] == "pipeline check"


def test_one_seed_on_disk_is_indicative(tmp_path):
    finish_all(tmp_path, {key: errs[:1] for key, errs in FIGURE6.items()})
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "undecided" and verdict["label"] == "indicative (1 seed)"


# ----------------------------------------------------------------------------- the ways the earlier rule was fooled (issue 16)

CPU = {"train_size": 8000}  # the CPU demo's training subset: the clean error's binomial floor is measured on it


def two_depths(plain: tuple[list[float], list[float]], residual: tuple[list[float], list[float]]) -> dict:
    return {("plain", 8): plain[0], ("plain", 20): plain[1], ("residual", 8): residual[0], ("residual", 20): residual[1]}


@pytest.mark.parametrize("data", [CPU, {"train_size": 50_000}])
def test_resnets_rising_more_than_plain_nets_are_never_reproduced(data):
    # plain +0.5 and ResNet +0.8 with seeds 0.1 apart: the old rule said "reproduced"
    errors = two_depths(([39.9, 40.0, 40.1], [40.4, 40.5, 40.6]), ([38.9, 39.0, 39.1], [39.7, 39.8, 39.9]))
    verdict = decide(frame(errors, **data))
    assert verdict["outcome"] in ("not_reproduced", "undecided") and verdict["plain_degrades"] is not True
    assert verdict["interaction"]["gap"] == pytest.approx(-0.3) and not verdict["interaction"]["above_zero"]


def test_a_plain_rise_of_a_tenth_against_a_resnet_rise_of_nine_tenths_is_not_reproduced():
    errors = two_depths(([39.9, 40.0, 40.1], [40.0, 40.1, 40.2]), ([38.9, 39.0, 39.1], [39.8, 39.9, 40.0]))
    assert decide(frame(errors, **CPU))["outcome"] != "reproduced"
    verdict = decide(frame(errors, train_size=50_000))  # measured on more images, the floor is lower: firm
    assert verdict["outcome"] == "not_reproduced" and verdict["plain_degrades"] is False
    assert f"plain nets do not degrade by {MARGIN} pp: plain-8→20 +0.10 pp" in verdict["reason"]


def test_worse_intermediate_resnets_are_caught_at_every_depth():
    # ResNet 20/32/44/56 = 5/9/9/4.5, plain 5/9/9/6, s.d. 0.1: deepest vs shallowest alone looks fine for ResNets
    verdict = decide(frame(figure6(plain=(5, 9, 9, 6), residual=(5, 9, 9, 4.5), spread=(-0.1, 0, 0.1))))
    assert verdict["outcome"] == "not_reproduced" and verdict["residual_degrades"] is True
    assert "ResNet-20→32 +4.00 pp" in verdict["reason"] and "ResNet-20→44 +4.00 pp" in verdict["reason"]
    steps = {s["depth"]: s for s in verdict["residual_steps"]}
    assert steps[56]["within_margin"] and steps[32]["beyond_margin"] and steps[44]["beyond_margin"]


def test_identical_seeds_one_image_apart_are_no_evidence():
    # every seed identical, plain-20 one image of 8,000 (0.0125 pp) worse: the old rule called it a firm "degrades"
    errors = two_depths(([45.0] * 3, [45.0125] * 3), ([46.0] * 3, [44.0] * 3))
    verdict = decide(frame(errors, **CPU))
    plain = verdict["details"]["plain"]
    assert verdict["plain_degrades"] is not True and verdict["outcome"] != "reproduced"
    assert plain["high"] - plain["low"] > 0.5  # the binomial floor: s.d. √(45 · 55 / 8000) = 0.56 pp per seed
    assert sorted(verdict["variance_floor"]["applied"]) == ["plain-20", "plain-8", "residual-20", "residual-8"]
    assert verdict["variance_floor"]["images"] == 8000


def test_a_resnet_rise_within_the_margin_is_no_degradation_however_tight_the_seeds():
    # the old "not reproduced" used 0 on the ResNet side: a true +0.5 was called degrading
    errors = two_depths(([45.0, 45.1, 45.2], [53.0, 53.1, 53.2]), ([46.0, 46.1, 46.2], [46.5, 46.6, 46.7]))
    verdict = decide(frame(errors, train_size=50_000))
    assert verdict["residual_degrades"] is False and verdict["outcome"] == "reproduced"


def test_plain_nets_must_rise_by_more_than_the_margin():
    # a rise beyond any doubt, but within the margin: no degradation in the paper's sense
    shallow = [45.0, 45.05, 45.1, 45.02, 45.08]
    errors = two_depths((shallow, [e + 0.4 for e in shallow]), ([e + 1 for e in shallow], [e - 1 for e in shallow]))
    verdict = decide(frame(errors, train_size=50_000))
    assert verdict["details"]["plain"]["rises"] and verdict["plain_degrades"] is False
    assert verdict["outcome"] == "not_reproduced"


# ----------------------------------------------------------------------------- outlier seeds


def test_a_far_seed_is_named_and_widens_the_bound_instead_of_blocking():
    errors = two_depths(([45.1, 46.2, 44.9], [53.0, 54.3, 52.1]), ([46.2, 46.8, 46.6], [44.0, 43.4, 54.0]))
    verdict = decide(frame(errors, **CPU))
    assert [(o["cell"], o["seed"]) for o in verdict["outliers"]] == [("residual-20", 2)]
    assert any("outlier: ResNet-20 seed 2 at 54.00 %" in note for note in verdict["notes"])
    assert verdict["outcome"] == "undecided"  # the far seed widens ResNet-8→20 past the margin
    assert verdict["seeds"]["residual-20"] == {"arch": "residual", "depth": 20, "seeds": [0, 1, 2], "values": [44.0, 43.4, 54.0]}


def test_ordinary_spread_is_not_an_outlier():
    errors = two_depths(([45.1, 46.2, 44.9], [53.0, 54.3, 52.1]), ([46.2, 46.8, 46.6], [44.0, 43.4, 45.5]))
    assert decide(frame(errors, **CPU))["outliers"] == []


def test_two_seeds_far_apart_are_named_as_a_pair():
    errors = {**figure6(), ("residual", 32): [4.0, 11.0]}
    outliers = decide(frame(errors))["outliers"]
    assert [(o["cell"], o["seed"], o["seeds"]) for o in outliers] == [("residual-32", None, [0, 1])]


# ----------------------------------------------------------------------------- seeds decided in advance


def test_undecided_says_how_many_seeds_would_likely_decide_and_the_promise_holds_in_simulation():
    rng = np.random.default_rng(1)
    means = {("plain", 8): 45.5, ("plain", 20): 53.2, ("residual", 8): 46.5, ("residual", 20): 44.4}
    sds = {("plain", 8): 1.1, ("plain", 20): 1.2, ("residual", 8): 0.6, ("residual", 20): 1.3}
    errors = {("plain", 8): [44.4, 46.6], ("plain", 20): [52.0, 54.4], ("residual", 8): [45.9, 47.1], ("residual", 20): [43.1, 45.7]}
    verdict = decide(frame(errors, **CPU))
    plan = verdict["seeds_needed"]
    assert verdict["outcome"] == "undecided" and plan["outcome"] == "reproduced"
    assert plan["seeds"] > 2 and plan["probability"] >= 0.8 and plan["alpha"] == ALPHA / 2
    assert f"would likely need {plan['seeds']} seeds per net" in verdict["reason"]
    # drawn from the observed means and s.d.s (the plan's own assumption), n seeds decide as promised
    sweeps = 150
    hits = sum(judge({k: rng.normal(means[k], sds[k], plan["seeds"]).tolist() for k in means}, alpha=plan["alpha"],
                     images=8000)["outcome"] == "reproduced" for _ in range(sweeps))
    assert hits / sweeps > 0.8 - 3 * math.sqrt(0.8 * 0.2 / sweeps)


def test_a_firm_verdict_plans_no_seeds():
    assert decide(frame(figure6()))["seeds_needed"] is None


# ----------------------------------------------------------------------------- looks


def test_a_seed_set_that_extends_a_judged_one_is_a_later_look():
    two = ["plain-8-s0", "plain-8-s1"]
    assert look_number(two, []) == (1, [])
    assert look_number(two + ["plain-8-s2"], [two]) == (2, [0])
    assert look_number(two + ["plain-8-s2"], [two, two, two + ["plain-8-s2"]]) == (2, [0])  # the same set twice is one look
    assert look_number(["plain-8-s3", "plain-8-s4"], [two]) == (1, [])  # fresh seeds: a new first look


def test_look_two_tests_at_half_the_level_and_says_so():
    errors = figure6(spread=(-0.1, 0.1, 0.0))
    first = [f"{a}-{d}-s{s}" for (a, d) in errors for s in (0, 1)]
    verdict = decide(frame(errors), judged_before=[first])
    assert verdict["looks"]["look"] == 2 and verdict["looks"]["alpha"] == ALPHA / 2
    assert any(f"every test ran at α = {ALPHA}/2" in note for note in verdict["notes"])
    assert "α = 0.025" in verdict["reason"]


# ----------------------------------------------------------------------------- through the folder: looks, seeds, figure


def test_adding_seeds_after_a_verdict_is_look_two_on_disk(tmp_path):
    finish_all(tmp_path, FIGURE6)
    assert build_report(tmp_path).verdict["looks"]["look"] == 1
    for (arch, depth), errs in FIGURE6.items():
        finish(tmp_path, cell(arch, depth, 2), errs[0] + 0.05)
    verdict = build_report(tmp_path).verdict
    assert verdict["looks"]["look"] == 2 and verdict["looks"]["recorded"] is True
    assert [e["look"] for e in verdict["looks"]["earlier"]] == [1]
    build_report(tmp_path)  # judging the same seeds again is not another look
    lines = (tmp_path / "verdict_looks.jsonl").read_text().splitlines()
    assert [json.loads(line)["look"] for line in lines] == [1, 2]


def test_a_folder_that_cannot_be_written_still_gets_its_verdict(tmp_path, monkeypatch):
    finish_all(tmp_path, FIGURE6)

    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "write_text", refuse)
    verdict = build_report(tmp_path).verdict
    assert verdict["outcome"] == "reproduced" and verdict["looks"]["recorded"] is False
    assert any(note.startswith("this look could not be recorded in verdict_looks.jsonl") for note in verdict["notes"])


def test_a_damaged_look_record_is_noted_not_fatal(tmp_path):
    finish_all(tmp_path, FIGURE6)
    (tmp_path / "verdict_looks.jsonl").write_text("not json\n")
    report = build_report(tmp_path)
    assert report.verdict["looks"]["look"] == 1
    assert report.notes == ["verdict_looks.jsonl line 1 is not a judged seed set; it is left out of the look count"]


def test_the_report_shows_every_seed_and_draws_the_verdict_figure(tmp_path):
    finish_all(tmp_path, {**FIGURE6, ("residual", 56): [4.0, 4.1]})
    report = build_report(tmp_path)
    written = write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "ResNet-56 seeds: 3.00 (s0), 3.10 (s1)" in md  # clean error = running − 1
    assert "(verdict.png)" in md and tmp_path / "verdict.png" in written
    assert (tmp_path / "verdict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shown_intervals_of_an_error_rate_stay_within_0_and_100(tmp_path):
    finish_all(tmp_path, {("plain", 8): [70.0, 89.7], ("plain", 20): [80.0, 81.0],
                          ("residual", 8): [60.0, 61.0], ("residual", 20): [50.0, 51.0]})
    md = report_markdown(build_report(tmp_path))
    assert "8: 78.85 [0.00, 100.00] (n=2)" in md
