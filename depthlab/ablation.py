"""Ablations judged with the verdict's statistics: does a variant change how training error grows with depth?

Each variant of a net (a non-empty `variant` of the report: `init=zero_gamma`, `norm=none-lr0.01`, …)
is compared with its baseline, the same arch without a variant. The quantity is the *depth effect*:
the clean training error of the deepest net minus that of the shallowest, per seed (both depths
trained with that seed), over the depths that variant and baseline both finished. The question is
whether the variant's depth effect differs from its baseline's: a Welch difference of the two
samples of per-seed effects (a difference of differences) with one-sided (1 − ALPHA) bounds.

A reading is a finding only with at least `SEEDS_FOR_FINDING` seeds on both sides; with fewer it is
*indicative* and says so, whatever its numbers. Only pandas and the standard library (no torch): the
report calls this.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from .verdict import ALPHA, PAPER_TRAIN_SIZE, binomial_floor, welch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MEASURE = "clean_train_err"
ABLATION_FIGURE = "ablation.png"
SEEDS_FOR_FINDING = 3  # one seed has no spread; two give one degree of freedom per side, too few to trust a bound
LABELS = {"plain": "plain", "residual": "ResNet"}
ROW_KEYS = ("variant", "arch", "depths", "n_seeds", "baseline_n_seeds", "n_diverged", "effect", "baseline_effect",
            "difference", "low", "high", "reading", "seeds")


def _finished(cells: pd.DataFrame, arch: str, variant: str) -> dict[int, dict[int, float]]:
    """depth → seed → error of one net's finished cells."""
    rows = cells[(cells.arch == arch) & (cells.variant == variant) & (cells.status == "finished") & cells[MEASURE].notna()]
    out: dict[int, dict[int, float]] = {}
    for row in rows.itertuples():
        out.setdefault(int(row.depth), {})[int(row.seed)] = float(getattr(row, MEASURE))
    return out


def _effects(by_depth: dict[int, dict[int, float]], shallow: int, deep: int) -> list[float]:
    """Per seed finished at both depths: deep − shallow, in seed order."""
    seeds = sorted(set(by_depth[shallow]) & set(by_depth[deep]))
    return [by_depth[deep][s] - by_depth[shallow][s] for s in seeds]


def _effect_floor(cells: pd.DataFrame, arch: str, variant: str) -> float:
    """The least variance (pp²) of a per-seed depth effect: two error rates, each with its binomial sampling variance,
    so that identical seeds never make a bound of zero width."""
    rows = cells[(cells.arch == arch) & (cells.variant == variant)]
    sizes = rows.train_size.dropna() if "train_size" in rows.columns else pd.Series(dtype=float)
    images = int(sizes.min()) if len(sizes) else PAPER_TRAIN_SIZE
    error = rows[MEASURE].dropna().mean() if rows[MEASURE].notna().any() else 50.0
    return 2 * binomial_floor(float(error), images)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _reading(n: int, n_base: int, difference: float, low: float, high: float, diverged: int) -> str:
    """The words for one comparison: a finding only from enough seeds, else indicative."""
    note = f"; {diverged} diverged cell{'s' if diverged > 1 else ''} left out" if diverged else ""
    if n == 0 or n_base == 0:
        return f"no comparison: needs each net finished at two depths with the same seed{note}"
    direction = "more" if difference > 0 else "less"
    if min(n, n_base) < SEEDS_FOR_FINDING:
        return (f"indicative ({min(n, n_base)} seed{'s' if min(n, n_base) > 1 else ''}): its error rises {abs(difference):.1f} pp "
                f"{direction} with depth than its baseline's; not a finding below {SEEDS_FOR_FINDING} seeds{note}")
    level = f"{1 - ALPHA:.0%}"
    if low > 0:
        return f"degrades more with depth than its baseline: by at least {low:.1f} pp (one-sided {level}){note}"
    if high < 0:
        return f"degrades less with depth than its baseline: by at least {-high:.1f} pp (one-sided {level}){note}"
    return f"no difference shown: {difference:+.1f} pp, one-sided {level} bounds {low:+.1f} … {high:+.1f}{note}"


def judge_ablations(cells: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per (arch, variant) with a non-empty variant, in the order the cells list them.

    `cells`: one row per cell with `arch`, `depth`, `variant`, `seed`, `status` and `clean_train_err`
    (the report's per-cell frame). Keys: `variant`, `arch`, `depths` [shallowest, deepest], `n_seeds`
    and `baseline_n_seeds` (seeds finished at both depths), `n_diverged` (the variant's diverged cells),
    `effect` and `baseline_effect` (mean deep − shallow error, pp), `difference` (effect − baseline
    effect), `low`/`high` (its one-sided Welch bounds; nan below two seeds a side), `reading`, and
    `seeds` (depth → seed → error of the variant and of its baseline, for the figure).
    """
    rows = []
    variants = cells.loc[cells.variant.fillna("") != "", ["arch", "variant"]].drop_duplicates()
    for arch, variant in variants.itertuples(index=False):
        ours, base = _finished(cells, arch, variant), _finished(cells, arch, "")
        diverged = int(((cells.arch == arch) & (cells.variant == variant) & (cells.status == "diverged")).sum())
        depths = sorted(set(ours) & set(base))
        effects, base_effects = ([], []) if len(depths) < 2 else (_effects(ours, depths[0], depths[-1]),
                                                                 _effects(base, depths[0], depths[-1]))
        low = high = math.nan
        difference = _mean(effects) - _mean(base_effects)
        if len(effects) >= 2 and len(base_effects) >= 2:
            diff = welch(base_effects, effects, floor=_effect_floor(cells, arch, variant))
            difference, low, high = diff.gap, diff.low, diff.high
        shown = depths[:1] + depths[-1:] if len(depths) >= 2 else depths
        rows.append({
            "variant": variant, "arch": arch, "depths": shown, "n_seeds": len(effects), "baseline_n_seeds": len(base_effects),
            "n_diverged": diverged, "effect": _mean(effects), "baseline_effect": _mean(base_effects), "difference": difference,
            "low": low, "high": high, "reading": _reading(len(effects), len(base_effects), difference, low, high, diverged),
            "seeds": {"variant": {d: ours[d] for d in shown}, "baseline": {d: base[d] for d in shown}},
        })
    return rows


def _pp(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def ablation_markdown(rows: list[dict[str, Any]]) -> str:
    """The ablation table: each variant's depth effect beside its baseline's, with bounds and seed counts."""
    lines = [f"| net | variant | depths | seeds (variant / baseline) | depth effect pp | baseline's pp | difference pp "
             f"| one-sided {1 - ALPHA:.0%} bounds | reading |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        depths = "→".join(map(str, r["depths"])) or "n/a"
        bounds = "n/a" if math.isnan(r["low"]) else f"{r['low']:+.2f} … {r['high']:+.2f}"
        lines.append(f"| {LABELS.get(r['arch'], r['arch'])} | {r['variant']} | {depths} | {r['n_seeds']} / {r['baseline_n_seeds']} "
                     f"| {_pp(r['effect'])} | {_pp(r['baseline_effect'])} | {_pp(r['difference'])} | {bounds} | {r['reading']} |")
    return "\n".join(lines) + "\n"


def ablation_figure(rows: list[dict[str, Any]]) -> Optional[Figure]:
    """Per variant, its shallowest and deepest net beside its baseline's: seeds as dots, means joined by a line."""
    rows = [r for r in rows if len(r["depths"]) == 2]
    if not rows:
        return None
    from matplotlib.figure import Figure

    columns = min(4, len(rows))
    fig = Figure(figsize=(3.4 * columns, 3.2 * math.ceil(len(rows) / columns)), layout="constrained")
    axes = fig.subplots(math.ceil(len(rows) / columns), columns, squeeze=False).flatten()
    for ax, r in zip(axes, rows):
        for offset, (who, colour) in enumerate((("baseline", "tab:gray"), ("variant", "tab:orange"))):
            xs = [2 * offset, 2 * offset + 1]
            means = []
            for x, depth in zip(xs, r["depths"]):
                values = list(r["seeds"][who].get(depth, {}).values())
                ax.plot([x] * len(values), values, "o", color=colour, alpha=0.7, ms=5)
                means.append(_mean(values))
            ax.plot(xs, means, "-", color=colour, lw=2, label=who if who == "baseline" else r["variant"])
        ax.set_xticks(range(4), [f"{d}" for d in r["depths"]] * 2)
        ax.set_xlabel("depth: baseline | variant", fontsize=8)
        bounds = "" if math.isnan(r["low"]) else f" [{r['low']:+.1f}, {r['high']:+.1f}]"
        ax.set_title(f"{LABELS.get(r['arch'], r['arch'])} [{r['variant']}]\nΔ − Δbase {_pp(r['difference'])} pp{bounds}, "
                     f"n={r['n_seeds']}/{r['baseline_n_seeds']}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    axes[0].set_ylabel("clean training error %")
    fig.suptitle("ablations: shallowest vs deepest net, each variant beside its baseline (dots: seeds; line: mean)", fontsize=10)
    return fig
