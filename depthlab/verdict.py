"""The Figure-6 verdict: do plain nets get worse on their training set with depth, and ResNets not?

Three outcomes, each with a one-line reason:

- `reproduced`: every expected cell finished with enough seeds, the plain nets' training error
  rises from the shallowest to the deepest net beyond its confidence interval, the ResNets'
  provably stays within MARGIN (an equivalence test, so noise cannot pass as "no rise"), and the
  deepest plain net is worse than the ResNet of the same depth.
- `not_reproduced`: the intervals show the opposite of one claim (plain nets flat within MARGIN,
  or ResNets rising).
- `undecided`: anything else — a missing, unfinished, failed or diverged cell, too few seeds,
  synthetic images, or intervals too wide to tell.

"Reproduced" is the conjunction of three one-sided tests at level ALPHA each; such an
intersection-union test has a false-positive rate of at most ALPHA (Berger 1982), and
tests/test_verdict.py measures it by simulation. The deciding measure is the clean training error
(eval mode, whole training set) in summary.json, not the running error of the last logged epoch,
which can be a short final epoch of a few dozen mini-batches.

Only pandas and the standard library: the report must not load torch.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import pandas as pd

from .options import ARCHS

ALPHA = 0.05  # one-sided level of each test; the verdict's false-positive rate is at most this
SEEDS_REQUIRED = 2  # finished seeds per net before the verdict may be firm: one seed has no spread
MARGIN = 1.0  # percentage points: a rise smaller than this is "no degradation" (a judgement call, not a measurement)
MEASURE = "clean_train_err"
PAPER_ITERATIONS, PAPER_BATCH, PAPER_TRAIN_SIZE = 64_000, 128, 50_000  # He et al. 2015, §4.2
FAR_FROM_PAPER = 0.5  # a budget below half the paper's images seen (or training set) is "far" (a judgement call)
LABELS = {"plain": "plain", "residual": "ResNet"}
PENDING_ADVICE = {
    "diverged": "a NaN loss is a failure of the recipe, not a training error to compare (rerun with warmup_lr or another seed)",
    "failed": "see its error.txt",
    "stale": "trained under another configuration",
}
RULE = (f"Decided on the clean training error (eval mode, whole training set) of the nets without a variant, "
        f"once every expected cell has finished with at least {SEEDS_REQUIRED} seeds. Reproduced when, at one-sided "
        f"{1 - ALPHA:.0%} Welch bounds, the plain nets' deepest − shallowest difference is above 0, the ResNets' is "
        f"below {MARGIN} pp, and the deepest plain net is worse than the ResNet of the same depth; not reproduced "
        f"when the plain nets' difference is below {MARGIN} pp or the ResNets' is above 0; undecided otherwise, "
        f"and always on synthetic images.")

_BASE_ID = re.compile(r"^(?P<arch>[a-z]+)-(?P<depth>\d+)-s(?P<seed>\d+)$")


# ----------------------------------------------------------------------------- Student's t, without scipy


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Numerical Recipes, 3rd ed., §6.4, modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), by whichever side of the continued fraction converges fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (not necessarily whole) degrees of freedom, t >= 0."""
    return 0.5 * _regularized_beta(df / 2, 0.5, df / (df + t * t))


def _t_density(t: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t for 0.5 <= p < 1 (Welch's df need not be whole); the normal one for df = inf.

    Newton's method from the normal quantile: the upper tail is convex for t > 0, so the steps rise
    monotonically onto the root and never overshoot.
    """
    if not 0.5 <= p < 1:
        raise ValueError(f"p must lie in [0.5, 1), got {p}")
    t = statistics.NormalDist().inv_cdf(p)
    if math.isinf(df):
        return t
    for _ in range(200):
        step = (t_upper_tail(t, df) - (1 - p)) / _t_density(t, df)
        t += step
        if abs(step) < 1e-12 * max(1.0, t):
            break
    return t


# ----------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Difference:
    """mean(b) − mean(a) with one-sided (1 − ALPHA) Welch bounds: `low` for "above", `high` for "below"."""

    gap: float
    low: float
    high: float
    df: float

    def as_dict(self) -> dict[str, float]:
        return {"gap": self.gap, "low": self.low, "high": self.high, "df": self.df}


def welch(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Difference:
    """mean(b) − mean(a) and its one-sided bounds, Welch–Satterthwaite df; both samples need two or more values."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    gap = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(va + vb)
    if se == 0:  # identical seeds on both sides: nothing to widen
        return Difference(gap, gap, gap, math.inf)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(1 - alpha, df) * se
    return Difference(gap, gap - half, gap + half, df)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A two-sided t interval for the mean over seeds; (nan, nan) with one seed (no spread known)."""
    if len(values) < 2:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    half = t_quantile((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


# ----------------------------------------------------------------------------- the statistical judgement


def _span(arch: str, depths: Sequence[int]) -> str:
    return f"{LABELS[arch]}-{min(depths)}→{max(depths)}"


def _claims(diff: Difference, margin: float) -> dict[str, bool]:
    """What a deepest − shallowest difference shows: a rise beyond noise, and/or a change within the margin."""
    return {"rises": diff.low > 0, "within_margin": diff.high < margin}


def _degrades(arch: str, claims: Mapping[str, bool]) -> Optional[bool]:
    """True / False when the intervals show it, None when they cannot tell.

    When a small rise is both significant and within the margin, the claim the paper makes about
    that architecture decides: plain nets must rise, ResNets must stay within the margin.
    """
    if arch == "plain":
        return True if claims["rises"] else (False if claims["within_margin"] else None)
    return False if claims["within_margin"] else (True if claims["rises"] else None)


def judge(values: Mapping[tuple[str, int], Sequence[float]], margin: float = MARGIN) -> dict[str, Any]:
    """The statistical outcome on per-seed errors keyed by (arch, depth): every net needs two or more seeds,
    each architecture two or more depths. Returns outcome, reason, per-arch differences and the cross comparison."""
    trends: dict[str, dict[str, Any]] = {}
    for arch in ARCHS:
        depths = sorted(d for a, d in values if a == arch)
        diff = welch(values[(arch, depths[0])], values[(arch, depths[-1])])
        claims = _claims(diff, margin)
        trends[arch] = {"span": _span(arch, depths), **diff.as_dict(), **claims, "degrades": _degrades(arch, claims)}
    common = sorted({d for a, d in values if a == "plain"} & {d for a, d in values if a == "residual"})
    cross = None
    if common:
        depth = common[-1]
        cross = {"depth": depth, **welch(values[("residual", depth)], values[("plain", depth)]).as_dict()}
    return {**_outcome(trends, cross, margin), "trends": trends, "cross": cross}


def _show(trend: Mapping[str, Any]) -> str:
    return f"{trend['span']} {trend['gap']:+.2f} pp [{trend['low']:+.2f}, {trend['high']:+.2f}]"


def _outcome(trends: Mapping[str, Mapping[str, Any]], cross: Optional[Mapping[str, Any]], margin: float) -> dict[str, str]:
    """The three-way outcome and its one-line reason from the per-arch claims and the cross comparison."""
    plain, residual = trends["plain"], trends["residual"]
    bounds = f"one-sided {1 - ALPHA:.0%} bounds"
    refuted = []
    if plain["degrades"] is False:
        refuted.append(f"plain nets do not degrade: {_show(plain)}, within {margin} pp")
    if residual["degrades"] is True:
        refuted.append(f"ResNets degrade too: {_show(residual)}, above 0")
    if refuted:
        return {"outcome": "not_reproduced", "reason": "; ".join(refuted) + f" ({bounds})."}
    cross_shown = cross is not None and cross["low"] > 0
    if plain["degrades"] and residual["degrades"] is False and cross_shown:
        return {"outcome": "reproduced",
                "reason": (f"plain nets degrade ({_show(plain)}), ResNets stay within {margin} pp ({_show(residual)}), "
                           f"plain-{cross['depth']} is {cross['gap']:.2f} pp worse than ResNet-{cross['depth']} "
                           f"(bound {cross['low']:+.2f}) — {bounds}.")}
    open_parts = []
    if plain["degrades"] is None:
        open_parts.append(f"plain {_show(plain)} neither above 0 nor within {margin} pp")
    if residual["degrades"] is None:
        open_parts.append(f"ResNet {_show(residual)} neither within {margin} pp nor above 0")
    if not cross_shown:
        open_parts.append("no depth with both architectures" if cross is None else
                          f"plain-{cross['depth']} − ResNet-{cross['depth']} {cross['gap']:+.2f} pp "
                          f"[{cross['low']:+.2f}, {cross['high']:+.2f}] not above 0")
    return {"outcome": "undecided", "reason": "the intervals cannot separate the claims: " + "; ".join(open_parts) + f" ({bounds})."}


# ----------------------------------------------------------------------------- from result cells to a verdict


def base_cell_key(cell_id: str) -> Optional[tuple[str, int, int]]:
    """(arch, depth, seed) of a cell id without a variant (shortcut B, grid tags), else None: variants are not Fig. 6."""
    match = _BASE_ID.match(cell_id)
    if not match or match["arch"] not in ARCHS:
        return None
    return match["arch"], int(match["depth"]), int(match["seed"])


def _blocking(cells: pd.DataFrame) -> list[str]:
    """'diverged: plain-56-s0 (why it blocks)' per status among cells that do not count as finished results."""
    unusable = cells[(cells.status != "finished") | cells[MEASURE].isna()]
    status = unusable.status.where(unusable.status != "finished", "finished without a clean training error")
    parts = []
    for state, group in unusable.groupby(status, sort=True):
        ids = ", ".join(f"{a}-{d}-s{s}" for a, d, s in zip(group.arch, group.depth, group.seed))
        advice = PENDING_ADVICE.get(state)
        parts.append(f"{state}: {ids}" + (f" ({advice})" if advice else ""))
    return parts


def _direction(values: Mapping[tuple[str, int], Sequence[float]]) -> str:
    """Where single-seed numbers point: each architecture's deepest − shallowest difference of means."""
    parts = []
    for arch in ARCHS:
        depths = sorted(d for a, d in values if a == arch)
        gap = statistics.fmean(values[(arch, depths[-1])]) - statistics.fmean(values[(arch, depths[0])])
        parts.append(f"{_span(arch, depths)} {'rises' if gap > 0 else 'falls'} {gap:+.2f} pp")
    return ", ".join(parts)


def _budget_note(cells: pd.DataFrame) -> Optional[str]:
    """A note when the smallest training budget is far from the paper's 64,000 iterations × 128 on 50,000 images."""
    if not {"iterations", "batch_size"} <= set(cells.columns) or cells[["iterations", "batch_size"]].isna().all().any():
        return None
    smallest = cells.loc[(cells.iterations * cells.batch_size).idxmin()]
    share = smallest.iterations * smallest.batch_size / (PAPER_ITERATIONS * PAPER_BATCH)
    sizes = cells.train_size.dropna() if "train_size" in cells.columns else pd.Series(dtype=float)
    images = int(sizes.min()) if len(sizes) else PAPER_TRAIN_SIZE
    if share >= FAR_FROM_PAPER and images >= FAR_FROM_PAPER * PAPER_TRAIN_SIZE:
        return None
    return (f"budget: {int(smallest.iterations):,} iterations × {int(smallest.batch_size)} = {share:.1%} of the paper's "
            f"{PAPER_ITERATIONS:,} × {PAPER_BATCH}, on {images:,} of {PAPER_TRAIN_SIZE:,} images; "
            f"the verdict holds for this budget, not for the paper's")


def _per_depth(cells: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per architecture and depth: seeds, mean and 95 % interval of the deciding error, mean running error."""
    details = {}
    for arch in ARCHS:
        rows = cells[cells.arch == arch]
        depths = sorted(int(d) for d in rows.depth.unique())
        finished = [rows[(rows.depth == d) & (rows.status == "finished")] for d in depths]
        details[arch] = {
            "depths": depths,
            "n_seeds": [len(f) for f in finished],
            "err": [float(f[MEASURE].mean()) for f in finished],
            "err_ci": [list(mean_interval(f[MEASURE].dropna().tolist())) for f in finished],
            "train_err": [float(f.train_err.mean()) if "train_err" in f else math.nan for f in finished],
            **dict.fromkeys(("gap", "low", "high", "df", "noise", "rises", "within_margin", "degrades")),
            "threshold": None, "spearman": _spearman(depths, [float(f[MEASURE].mean()) for f in finished]),
        }
    return details


def _spearman(depths: Sequence[int], errors: Sequence[float]) -> Optional[float]:
    """Rank correlation of depth with mean error: shown for the shape of the curve, not used to decide."""
    if len(depths) < 2 or not all(math.isfinite(e) for e in errors):
        return None
    return float(pd.Series(depths).rank().corr(pd.Series(errors).rank()))


def decide(cells: pd.DataFrame, seeds_required: int = SEEDS_REQUIRED, margin: float = MARGIN) -> dict[str, Any]:
    """The verdict on one row per cell: arch, depth, variant, seed, status and MEASURE (optional: train_err, source,
    iterations, batch_size, train_size). Rows with a variant are left out; so are unknown architectures.

    A diverged cell makes the verdict undecided rather than counting as its architecture's degradation:
    a NaN loss says the recipe is numerically unstable for that net (the paper needed a warm-up for
    ResNet-110), which is not the higher-but-finite training error Figure 6 is about — counting it
    either way would let one unstable run decide the answer. It is named so it can be rerun.

    `reproduced` is True only for a firm yes, False for a firm no, None when undecided.
    """
    base = cells[(cells.variant == "") & cells.arch.isin(ARCHS)]
    details = _per_depth(base)
    notes = [note for note in [_budget_note(base[base.status == "finished"])] if note]
    verdict: dict[str, Any] = {"outcome": "undecided", "reason": "", "reproduced": None, "plain_degrades": None,
                               "residual_degrades": None, "label": None, "details": details, "cross": None,
                               "measure": MEASURE, "seeds_required": seeds_required, "margin": margin,
                               "alpha": ALPHA, "notes": notes, "rule": RULE}
    verdict.update(_judge_cells(base, details, seeds_required, margin))
    synthetic = "source" in base.columns and base.source.eq("synthetic").any()
    if synthetic:
        verdict.update(outcome="undecided", label="pipeline check",
                       reason=f"synthetic images check the pipeline, not the science (the numbers: {verdict['outcome']}, "
                              f"{verdict['reason']})")
    verdict["reproduced"] = {"reproduced": True, "not_reproduced": False}.get(verdict["outcome"])
    return verdict


def _judge_cells(base: pd.DataFrame, details: dict[str, dict[str, Any]], seeds_required: int,
                 margin: float) -> dict[str, Any]:
    """Outcome, reason and evidence: first what stops a decision (cells, depths, seeds), then the intervals."""
    blocking = _blocking(base)
    if blocking:
        return {"reason": "not every cell of the comparison has a result — " + "; ".join(blocking) + "."}
    few_depths = [LABELS[a] for a in ARCHS if len(details[a]["depths"]) < 2]
    if few_depths:
        return {"reason": f"{' and '.join(few_depths)} need at least two depths to compare."}
    values = {(a, int(d)): group[MEASURE].tolist() for (a, d), group in base.groupby(["arch", "depth"])}
    short = {key: len(v) for key, v in values.items() if len(v) < seeds_required}
    if short:
        listed = ", ".join(f"{LABELS[a]}-{d} ({n})" for (a, d), n in sorted(short.items()))
        if max(len(v) for v in values.values()) == 1:
            return {"label": "indicative (1 seed)",
                    "reason": f"indicative (1 seed): {_direction(values)}; a firm verdict needs {seeds_required} seeds per net."}
        return {"reason": f"fewer than {seeds_required} finished seeds at {listed}."}
    judged = judge(values, margin)
    for arch, trend in judged["trends"].items():
        details[arch].update({k: v for k, v in trend.items() if k != "span"},
                             noise=trend["high"] - trend["gap"], threshold=margin)
    return {"outcome": judged["outcome"], "reason": judged["reason"], "cross": judged["cross"],
            "plain_degrades": judged["trends"]["plain"]["degrades"],
            "residual_degrades": judged["trends"]["residual"]["degrades"]}
