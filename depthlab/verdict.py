"""The Figure-6 verdict: do plain nets get worse on their training set with depth, and ResNets not?

Three outcomes, each with a one-line reason (docs/statistics.md gives the rule, its guarantee and
what that assumes, with the simulations that measure it):

- `reproduced`: every expected cell finished with enough seeds and four one-sided Welch bounds
  clear: the plain nets rise by more than MARGIN from the shallowest to the deepest net; the
  ResNets rise by less than MARGIN from the shallowest to *every* deeper net (an equivalence test,
  so noise cannot pass as "no rise"); the plain rise exceeds the ResNet rise (the interaction);
  and the deepest plain net is worse than the ResNet of the same depth. All four must hold — an
  intersection-union test, whose false-positive rate is at most the level of each test
  (Berger 1982), so no correction for the number of tests is needed.
- `not_reproduced`: the margin used the same way against the claim — the plain rise provably
  below MARGIN, some ResNet step provably above it, or the interaction provably below 0. That is
  a union of refutations, so each is tested at the level divided by their number (Bonferroni).
- `undecided`: anything else — a missing, unfinished, failed or diverged cell, too few seeds,
  synthetic images, or intervals too wide to tell; then it says how many seeds would likely do.

Every cell's per-seed variance is at least the binomial variance of an error rate over the
images it was measured on, so identical seeds never give zero uncertainty. A seed far from its
cell's others is named. A seed set that extends one judged before in the same folder is a later
look at the same question, and every test then runs at ALPHA / look (report.py keeps the record).
The deciding measure is the clean training error (eval mode, whole training set) in summary.json,
not the running error of the last epoch, which can be a short final epoch of a few mini-batches.

Only pandas and the standard library: the report must not load torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import pandas as pd

from .options import ARCHS

ALPHA = 0.05  # one-sided level of each test at a folder's first look; the false-"reproduced" rate is at most this
SEEDS_REQUIRED = 2  # finished seeds per net before the verdict may be firm: one seed has no spread
MARGIN = 1.0  # percentage points, both ways: a rise smaller than this is "no degradation" (a judgement call, not a measurement)
MEASURE = "clean_train_err"
PAPER_ITERATIONS, PAPER_BATCH, PAPER_TRAIN_SIZE = 64_000, 128, 50_000  # He et al. 2015, §4.2
FAR_FROM_PAPER = 0.5  # a budget below half the paper's images seen (or training set) is "far" (a judgement call)
OUTLIER_DISTANCE = 4.0  # a seed this many reference s.d.s from its cell's median is named (a judgement call; see docs/statistics.md)
POWER_TARGET = 0.8  # "likely" in the seed plan: this chance that every bound of the expected outcome clears
MOST_SEEDS_PLANNED = 50  # the seed plan gives up beyond this: the observed gap sits too close to its threshold
LABELS = {"plain": "plain", "residual": "ResNet"}
PENDING_ADVICE = {
    "diverged": "a NaN loss is a failure of the recipe, not a training error to compare (rerun with warmup_lr or another seed)",
    "failed": "see its error.txt",
    "stale": "trained under another configuration",
}
RULE = (f"Decided on the clean training error (eval mode, whole training set) of the nets without a variant, once "
        f"every expected cell has finished with at least {SEEDS_REQUIRED} seeds; each seed's variance is at least the "
        f"binomial variance of an error rate over the images it was measured on. Reproduced when all four one-sided "
        f"{1 - ALPHA:.0%} Welch bounds clear: the plain nets' deepest − shallowest difference is above {MARGIN} pp; "
        f"every ResNet depth − the shallowest ResNet is below {MARGIN} pp; the plain rise exceeds the ResNet rise "
        f"(interaction above 0); the deepest plain net is worse than the ResNet of the same depth. Not reproduced "
        f"when, at the level divided by the number of refutations (Bonferroni), the plain rise is below {MARGIN} pp, "
        f"some ResNet step is above {MARGIN} pp, or the interaction is below 0. A seed set that extends one judged "
        f"before in this folder is look k, tested at {ALPHA}/k. Undecided otherwise, and always on synthetic images.")



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


def _cornish_fisher(z: float, df: float) -> float:
    """The t quantile's expansion around the normal one (Abramowitz & Stegun 26.7.5): Newton's start, close to the root."""
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t for 0.5 <= p < 1 (Welch's df need not be whole); the normal one for df = inf.

    Newton's method from the Cornish–Fisher expansion, or below 3 df (where it is poor) from the
    quantile at a whole df above, which lies below the root: the upper tail is convex for t > 0, so
    from below the steps rise monotonically onto the root, and from just above the first lands below it.
    """
    if not 0.5 <= p < 1:
        raise ValueError(f"p must lie in [0.5, 1), got {p}")
    z = statistics.NormalDist().inv_cdf(p)
    if math.isinf(df):
        return z
    if df >= 3:
        t = _cornish_fisher(z, df)
    else:  # a start below the root: the quantile at 3 df (expanded), or at 2 df (in closed form)
        t = _cornish_fisher(z, 3.0) if df >= 2 else (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    for _ in range(200):
        step = (t_upper_tail(t, df) - (1 - p)) / _t_density(t, df)
        t += step
        if abs(step) < 1e-12 * max(1.0, t):
            break
    return t


# ----------------------------------------------------------------------------- cells and contrasts


@dataclass(frozen=True)
class CellStats:
    """One net's seeds: mean, per-seed variance (never below `floor`), seed count, and the binomial floor (pp²)."""

    mean: float
    var: float
    n: int
    floor: float

    @property
    def sd(self) -> float:
        return math.sqrt(self.var)


def binomial_floor(error: float, images: int) -> float:
    """The sampling variance (pp²) of an error rate of `error` % over `images` images, at least that of one image wrong."""
    p = min(max(error, 100 / images), 100 - 100 / images)
    return p * (100 - p) / images


def cell_stats(values: Sequence[float], images: int = PAPER_TRAIN_SIZE) -> CellStats:
    """Mean and floored variance of one net's per-seed errors (in %), measured on `images` images each."""
    mean = statistics.fmean(values)
    floor = binomial_floor(mean, images)
    return CellStats(mean, max(_variance(values, mean), floor), len(values), floor)


def _variance(values: Sequence[float], mean: float) -> float:
    """The sample variance (ddof 1; 0 for one value) in floats: statistics.variance's exact fractions are 10× slower."""
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Difference:
    """A contrast of cell means with one-sided (1 − alpha) Welch–Satterthwaite bounds: `low` for "above", `high` for "below"."""

    gap: float
    low: float
    high: float
    df: float
    se: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"gap": self.gap, "low": self.low, "high": self.high, "df": self.df, "se": self.se}

    def bounds(self, alpha: float) -> tuple[float, float]:
        """The one-sided (1 − alpha) lower and upper bounds of the same contrast."""
        if self.se == 0:
            return self.gap, self.gap
        half = t_quantile(1 - alpha, self.df) * self.se
        return self.gap - half, self.gap + half


def contrast(plus: Sequence[CellStats], minus: Sequence[CellStats], alpha: float = ALPHA) -> Difference:
    """Σ means(plus) − Σ means(minus), its standard error and Welch–Satterthwaite df; every cell needs two or more seeds."""
    gap = sum(c.mean for c in plus) - sum(c.mean for c in minus)
    parts = [(c.var / c.n, c.n) for c in (*plus, *minus)]
    se = math.sqrt(sum(v for v, _ in parts))
    if se == 0:  # identical seeds and no floor: nothing to widen
        return Difference(gap, gap, gap, math.inf, 0.0)
    df = se ** 4 / sum(v ** 2 / (n - 1) for v, n in parts)
    half = t_quantile(1 - alpha, df) * se
    return Difference(gap, gap - half, gap + half, df, se)


def welch(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, floor: float = 0.0) -> Difference:
    """mean(b) − mean(a) and its one-sided bounds, Welch–Satterthwaite df; each sample needs two or more values.

    `floor` is the least per-seed variance (pp²) either sample may have; without it identical seeds give no width.
    """
    def stats(values: Sequence[float]) -> CellStats:
        mean = statistics.fmean(values)
        return CellStats(mean, max(_variance(values, mean), floor), len(values), floor)

    return contrast([stats(b)], [stats(a)], alpha)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A two-sided t interval for the mean over seeds; (nan, nan) with one seed (no spread known)."""
    if len(values) < 2:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    half = t_quantile((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


# ----------------------------------------------------------------------------- the statistical judgement


def net_name(arch: str, depth: int) -> str:
    """How a report names a net: plain-20, ResNet-56."""
    return f"{LABELS[arch]}-{depth}"


def _span(arch: str, low: int, high: int) -> str:
    return f"{LABELS[arch]}-{low}→{high}"


@dataclass(frozen=True)
class _Contrasts:
    """The four contrasts the claim is made of, on one grid of cells."""

    plain: Difference
    plain_span: tuple[int, int]
    steps: list[tuple[int, Difference]]  # (depth, ResNet-depth − shallowest ResNet), depth ascending
    residual_shallowest: int
    interaction: Difference
    interaction_spans: tuple[tuple[int, int], tuple[int, int]]  # (plain span, ResNet span)
    cross: Optional[tuple[int, Difference]]  # deepest common depth, plain − ResNet there


def _contrasts(stats: Mapping[tuple[str, int], CellStats], alpha: float) -> _Contrasts:
    """Plain rise, every ResNet step, the interaction over the widest span both families share, and the cross."""
    depths = {arch: sorted(d for a, d in stats if a == arch) for arch in ARCHS}
    plain_span = (depths["plain"][0], depths["plain"][-1])
    res0 = depths["residual"][0]
    steps = [(d, contrast([stats["residual", d]], [stats["residual", res0]], alpha)) for d in depths["residual"][1:]]
    common = sorted(set(depths["plain"]) & set(depths["residual"]))
    if len(common) >= 2:  # like with like: the same depths on both sides
        spans = ((common[0], common[-1]), (common[0], common[-1]))
    else:
        spans = (plain_span, (res0, depths["residual"][-1]))
    (p_lo, p_hi), (r_lo, r_hi) = spans
    interaction = contrast([stats["plain", p_hi], stats["residual", r_lo]], [stats["plain", p_lo], stats["residual", r_hi]], alpha)
    cross = (common[-1], contrast([stats["plain", common[-1]]], [stats["residual", common[-1]]], alpha)) if common else None
    plain = contrast([stats["plain", plain_span[1]]], [stats["plain", plain_span[0]]], alpha)
    return _Contrasts(plain, plain_span, steps, res0, interaction, spans, cross)


def refutation_count(residual_depths: int) -> int:
    """How many ways the data can refute the claim: the plain rise, each ResNet step, the interaction."""
    return 2 + (residual_depths - 1)


def judge(values: Mapping[tuple[str, int], Sequence[float]], margin: float = MARGIN, alpha: float = ALPHA,
          images: int = PAPER_TRAIN_SIZE) -> dict[str, Any]:
    """The statistical outcome on per-seed errors keyed by (arch, depth), each measured on `images` images: every net
    needs two or more seeds, each architecture two or more depths. `alpha` is the level of each test (ALPHA / look).

    Returns outcome, reason, per-arch trends (the deepest − shallowest contrasts), the ResNet steps, the interaction,
    the cross comparison, and the level the refutations were tested at.
    """
    stats = {key: cell_stats(v, images) for key, v in values.items()}
    c = _contrasts(stats, alpha)
    refute_alpha = alpha / refutation_count(len(c.steps) + 1)
    plain_low, plain_high = c.plain.bounds(refute_alpha)
    steps = []
    for depth, diff in c.steps:
        low, high = diff.bounds(refute_alpha)
        steps.append({"depth": depth, "span": _span("residual", c.residual_shallowest, depth), **diff.as_dict(),
                      "within_margin": diff.high < margin, "beyond_margin": low > margin,
                      "refute_low": low, "refute_high": high})
    i_low, i_high = c.interaction.bounds(refute_alpha)
    (p_lo, p_hi), (r_lo, r_hi) = c.interaction_spans
    interaction = {"plain_span": [p_lo, p_hi], "residual_span": [r_lo, r_hi], **c.interaction.as_dict(),
                   "above_zero": c.interaction.low > 0, "below_zero": i_high < 0, "refute_low": i_low, "refute_high": i_high}
    cross = None if c.cross is None else {"depth": c.cross[0], **c.cross[1].as_dict(), "above_zero": c.cross[1].low > 0}
    plain = {"span": _span("plain", *c.plain_span), **c.plain.as_dict(), "rises": c.plain.low > 0,
             "beyond_margin": c.plain.low > margin, "within_margin": plain_high < margin,
             "refute_low": plain_low, "refute_high": plain_high}
    plain["degrades"] = True if plain["beyond_margin"] else (False if plain["within_margin"] else None)
    deepest = steps[-1]
    residual = {**{k: v for k, v in deepest.items() if k != "depth"}, "rises": deepest["low"] > 0}
    residual["within_margin"] = all(s["within_margin"] for s in steps)
    residual["degrades"] = (False if residual["within_margin"] else
                            True if any(s["beyond_margin"] for s in steps) else None)
    trends = {"plain": plain, "residual": residual}
    outcome = _outcome(trends, steps, interaction, cross, margin, alpha, refute_alpha)
    return {**outcome, "trends": trends, "residual_steps": steps, "interaction": interaction, "cross": cross,
            "test_alpha": alpha, "refute_alpha": refute_alpha}


def _pp(value: float) -> str:
    return f"{value:+.2f}"


def _outcome(trends: Mapping[str, Mapping[str, Any]], steps: Sequence[Mapping[str, Any]], interaction: Mapping[str, Any],
             cross: Optional[Mapping[str, Any]], margin: float, alpha: float, refute_alpha: float) -> dict[str, str]:
    """The three-way outcome and its one-line reason."""
    plain = trends["plain"]
    bounds = f"one-sided Welch bounds at α = {alpha:.3g}"
    refuted = []
    if plain["within_margin"]:
        refuted.append(f"plain nets do not degrade by {margin} pp: {plain['span']} {_pp(plain['gap'])} pp, "
                       f"upper bound {_pp(plain['refute_high'])}")
    refuted += [f"ResNets degrade by more than {margin} pp: {s['span']} {_pp(s['gap'])} pp, lower bound {_pp(s['refute_low'])}"
                for s in steps if s["beyond_margin"]]
    if interaction["below_zero"]:
        refuted.append(f"the ResNets rise more than the plain nets: interaction {_pp(interaction['gap'])} pp, upper bound "
                       f"{_pp(interaction['refute_high'])}")
    cross_shown = cross is not None and cross["above_zero"]
    all_steps = all(s["within_margin"] for s in steps)
    if plain["beyond_margin"] and all_steps and interaction["above_zero"] and cross_shown:
        worst = max(steps, key=lambda s: s["high"])
        return {"outcome": "reproduced",
                "reason": (f"plain nets degrade ({plain['span']} {_pp(plain['gap'])} pp, lower bound {_pp(plain['low'])} "
                           f"> {margin}); every ResNet step stays within {margin} pp (highest upper bound "
                           f"{_pp(worst['high'])}, {worst['span']}); the plain rise exceeds the ResNet rise by "
                           f"{interaction['gap']:.2f} pp (lower bound {_pp(interaction['low'])}); plain-{cross['depth']} "
                           f"is {cross['gap']:.2f} pp worse than ResNet-{cross['depth']} (lower bound {_pp(cross['low'])}) "
                           f"— {bounds}.")}
    if refuted:
        return {"outcome": "not_reproduced",
                "reason": "; ".join(refuted) + f" (one-sided Welch bounds at α = {refute_alpha:.3g}, Bonferroni over the refutations)."}
    open_parts = []
    if not plain["beyond_margin"]:
        open_parts.append(f"{plain['span']} {_pp(plain['gap'])} pp [{_pp(plain['low'])}, "
                          f"{_pp(plain['high'])}] not above {margin}")
    open_parts += [f"{s['span']} {_pp(s['gap'])} pp [{_pp(s['low'])}, {_pp(s['high'])}] not below {margin}"
                   for s in steps if not s["within_margin"]]
    if not interaction["above_zero"]:
        open_parts.append(f"interaction {_pp(interaction['gap'])} pp [{_pp(interaction['low'])}, {_pp(interaction['high'])}] "
                          f"not above 0")
    if not cross_shown:
        open_parts.append("no depth with both architectures" if cross is None else
                          f"plain-{cross['depth']} − ResNet-{cross['depth']} {_pp(cross['gap'])} pp "
                          f"[{_pp(cross['low'])}, {_pp(cross['high'])}] not above 0")
    return {"outcome": "undecided", "reason": "the intervals cannot separate the claims: " + "; ".join(open_parts) + f" ({bounds})."}


# ----------------------------------------------------------------------------- seeds decided in advance


def _with_seeds(stats: Mapping[tuple[str, int], CellStats], n: int) -> dict[tuple[str, int], CellStats]:
    return {key: CellStats(c.mean, c.var, n, c.floor) for key, c in stats.items()}


def _clear_chance(diff: Difference, threshold: float, above: bool, alpha: float) -> float:
    """The chance that a one-sided (1 − alpha) bound of this contrast clears `threshold`, if its gap and se are true.

    The normal approximation to the noncentral t (power = Φ((δ − t) / √(1 + t²/2df))): it allows for the
    seeds' s.d. being estimated, which a plain Φ(δ − t) would not.
    """
    if diff.se == 0:
        return float((diff.gap > threshold) if above else (diff.gap < threshold))
    t = t_quantile(1 - alpha, diff.df)
    delta = (diff.gap - threshold) / diff.se * (1 if above else -1)
    return statistics.NormalDist().cdf((delta - t) / math.sqrt(1 + t * t / (2 * diff.df)))


def _route_chances(stats: Mapping[tuple[str, int], CellStats], margin: float, alpha: float) -> dict[str, float]:
    """Chance of a firm 'reproduced' (every bound clears) and of a firm 'not reproduced' (any refutation clears).

    Treats the tests as independent: they share cells and are positively related, so the chance that all
    of them clear is at least the product — the plan errs towards more seeds.
    """
    c = _contrasts(stats, alpha)
    reproduce = [(c.plain, margin, True), *[(d, margin, False) for _, d in c.steps], (c.interaction, 0.0, True)]
    reproduce += [(c.cross[1], 0.0, True)] if c.cross else []
    refute_alpha = alpha / refutation_count(len(c.steps) + 1)
    refute = [(c.plain, margin, False), *[(d, margin, True) for _, d in c.steps], (c.interaction, 0.0, False)]
    yes = math.prod(_clear_chance(d, thr, above, alpha) for d, thr, above in reproduce) if c.cross else 0.0
    no = 1 - math.prod(1 - _clear_chance(d, thr, above, refute_alpha) for d, thr, above in refute)
    return {"reproduced": yes, "not_reproduced": no}


def plan_seeds(values: Mapping[tuple[str, int], Sequence[float]], margin: float, alpha: float, images: int,
               start: int) -> dict[str, Any]:
    """The fewest seeds per net (from `start` up) that give a firm answer with POWER_TARGET chance, if the observed
    means and (floored) s.d.s are the truth, tested at `alpha`. The expected answer is the one the means point to."""
    stats = {key: cell_stats(v, images) for key, v in values.items()}
    observed = _contrasts(stats, alpha)
    points_yes = (observed.plain.gap > margin and all(d.gap < margin for _, d in observed.steps)
                  and observed.interaction.gap > 0 and observed.cross is not None and observed.cross[1].gap > 0)
    expected = "reproduced" if points_yes else "not_reproduced"
    plan: dict[str, Any] = {"outcome": expected, "seeds": None, "probability": None, "tried": None, "alpha": alpha,
                            "power_target": POWER_TARGET, "assumes": "the observed means and s.d.s are the truth; normal seeds"}
    most = max(MOST_SEEDS_PLANNED, start)
    for n in range(max(start, 2), most + 1):
        chance = _route_chances(_with_seeds(stats, n), margin, alpha)[expected]
        if chance >= POWER_TARGET:
            return {**plan, "seeds": n, "probability": chance}
    return {**plan, "probability": chance, "tried": most}


def _plan_sentence(plan: Mapping[str, Any], look: int) -> str:
    """What the seed plan says, for the reason: how many seeds, the chance, and the level they would be tested at."""
    word = plan["outcome"].replace("_", " ")
    level = f"α = {plan['alpha']:.3g}, the level of look {look} if they extend these seeds"
    if plan["seeds"] is None:
        return (f"Even {plan['tried']} seeds per net would give a firm '{word}' with only {plan['probability']:.0%} "
                f"chance ({level}): the observed gaps sit too close to their thresholds for more seeds to settle it.")
    return (f"A firm answer would likely need {plan['seeds']} seeds per net ({plan['probability']:.0%} chance of '{word}' "
            f"at {level}, if the observed means and s.d.s are true); decide the number before running them.")


# ----------------------------------------------------------------------------- outlier seeds


def find_outliers(seeds: Mapping[tuple[str, int], Mapping[int, float]], images: int = PAPER_TRAIN_SIZE) -> list[dict[str, Any]]:
    """Seeds further than OUTLIER_DISTANCE reference s.d.s from their cell's median.

    The reference s.d. is the largest of: the cell's own robust spread (1.4826 × MAD, from three seeds —
    two seeds' MAD is their own distance — so a cell that is wide throughout flags nothing), the median
    of every cell's s.d. (the grid's typical seed spread: with 2–5 seeds a cell's own MAD is often near
    0) and the binomial floor. Two seeds sit at the same distance from their median: the pair is named.
    """
    spreads = [statistics.stdev(v.values()) for v in seeds.values() if len(v) >= 2]
    typical = statistics.median(spreads) if spreads else 0.0
    found = []
    for (arch, depth), by_seed in sorted(seeds.items()):
        if len(by_seed) < 2:
            continue
        values = list(by_seed.values())
        median = statistics.median(values)
        mad = 1.4826 * statistics.median(abs(v - median) for v in values) if len(values) > 2 else 0.0  # of two: their gap
        scale = max(mad, typical, math.sqrt(binomial_floor(median, images)))
        far = {seed: v for seed, v in by_seed.items() if abs(v - median) > OUTLIER_DISTANCE * scale}
        entry = {"arch": arch, "depth": depth, "cell": f"{arch}-{depth}", "median": median, "scale": scale}
        if far and len(by_seed) == 2:
            found.append({**entry, "seed": None, "value": None, "seeds": sorted(by_seed),
                          "distance": abs(values[0] - median) / scale})
        elif far:
            found += [{**entry, "seed": seed, "value": value, "seeds": [seed], "distance": abs(value - median) / scale}
                      for seed, value in far.items()]
    return found


def _outlier_note(outlier: Mapping[str, Any]) -> str:
    name = net_name(outlier["arch"], outlier["depth"])
    if outlier["seed"] is None:
        a, b = outlier["seeds"]
        return (f"outlier: {name}'s two seeds ({a} and {b}) are {outlier['distance'] * outlier['scale'] * 2:.2f} pp apart, "
                f"{outlier['distance']:.1f} reference s.d.s each from their median (two seeds cannot say which is off)")
    return (f"outlier: {name} seed {outlier['seed']} at {outlier['value']:.2f} % sits {outlier['distance']:.1f} reference "
            f"s.d.s ({outlier['scale']:.2f} pp) from its cell's median {outlier['median']:.2f} %")


OUTLIER_POLICY = ("an outlier seed does not block the verdict: every bound already widens for it (one seed δ away "
                  "moves a mean by δ/n and widens its bound by t·δ/n, more than it moves it), but the guarantee assumes "
                  "normal seeds, and a second mode that no seed has hit yet cannot be seen (docs/statistics.md)")


# ----------------------------------------------------------------------------- looks


def look_number(cells: Iterable[str], judged_before: Iterable[Iterable[str]]) -> tuple[int, list[int]]:
    """This seed set's look at the question: 1 + the distinct seed sets judged before that it strictly contains;
    and the indices (into judged_before) of those earlier looks."""
    current = frozenset(cells)
    earlier: dict[frozenset[str], int] = {}
    for i, judged in enumerate(judged_before):
        judged = frozenset(judged)
        if judged < current:
            earlier.setdefault(judged, i)
    return 1 + len(earlier), sorted(earlier.values())


# ----------------------------------------------------------------------------- from result cells to a verdict


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
        parts.append(f"{_span(arch, depths[0], depths[-1])} {'rises' if gap > 0 else 'falls'} {gap:+.2f} pp")
    return ", ".join(parts)


def _percent(share: float) -> str:
    """A share as a percentage with two significant digits, so that a smoke run's budget is not "0.0%"."""
    return f"{share:.1%}" if share >= 0.001 else f"{share * 100:.2g}%"


def _budget_note(cells: pd.DataFrame) -> Optional[str]:
    """A note when the smallest training budget is far from the paper's 64,000 iterations × 128 on 50,000 images."""
    if not {"iterations", "batch_size"} <= set(cells.columns) or cells[["iterations", "batch_size"]].isna().all().any():
        return None
    smallest = cells.loc[(cells.iterations * cells.batch_size).idxmin()]
    share = smallest.iterations * smallest.batch_size / (PAPER_ITERATIONS * PAPER_BATCH)
    images = _images(cells)
    if share >= FAR_FROM_PAPER and images >= FAR_FROM_PAPER * PAPER_TRAIN_SIZE:
        return None
    return (f"budget: {int(smallest.iterations):,} iterations × {int(smallest.batch_size)} = {_percent(share)} of the paper's "
            f"{PAPER_ITERATIONS:,} × {PAPER_BATCH}, on {images:,} of {PAPER_TRAIN_SIZE:,} images; "
            f"the verdict holds for this budget, not for the paper's")


def _images(cells: pd.DataFrame) -> int:
    """The training-set size the clean errors were measured on: the smallest among the cells, else the paper's."""
    sizes = pd.to_numeric(cells.train_size, errors="coerce").dropna() if "train_size" in cells.columns else pd.Series(dtype=float)
    return int(sizes.min()) if len(sizes) and sizes.min() > 0 else PAPER_TRAIN_SIZE


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
            **dict.fromkeys(("gap", "low", "high", "df", "se", "noise", "rises", "beyond_margin", "within_margin", "degrades")),
            "threshold": None, "spearman": _spearman(depths, [float(f[MEASURE].mean()) for f in finished]),
        }
    return details


def _spearman(depths: Sequence[int], errors: Sequence[float]) -> Optional[float]:
    """Rank correlation of depth with mean error: shown for the shape of the curve, not used to decide."""
    if len(depths) < 2 or not all(math.isfinite(e) for e in errors):
        return None
    return float(pd.Series(depths).rank().corr(pd.Series(errors).rank()))


def _seeds(finished: pd.DataFrame) -> dict[tuple[str, int], dict[int, float]]:
    """Every finished seed's deciding error, per (arch, depth)."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for arch, depth, seed, value in zip(finished.arch, finished.depth, finished.seed, finished[MEASURE]):
        out.setdefault((arch, int(depth)), {})[int(seed)] = float(value)
    return {key: dict(sorted(v.items())) for key, v in sorted(out.items(), key=lambda kv: (ARCHS.index(kv[0][0]), kv[0][1]))}


def _variance_floor(seeds: Mapping[tuple[str, int], Mapping[int, float]], images: int) -> dict[str, Any]:
    """The binomial floor per cell (as an s.d. in pp) and the cells whose seeds spread less than it."""
    per_cell = {f"{a}-{d}": math.sqrt(binomial_floor(statistics.fmean(v.values()), images)) for (a, d), v in seeds.items()}
    applied = [f"{a}-{d}" for (a, d), v in seeds.items()
               if (statistics.stdev(v.values()) if len(v) > 1 else 0.0) < per_cell[f"{a}-{d}"]]
    return {"images": images, "sd": per_cell, "applied": applied}


def _data(finished: pd.DataFrame, images: int) -> dict[str, Any]:
    """What the judged cells trained on, for a figure's title: image source, images, the smallest budget."""
    def smallest(column: str) -> Optional[int]:
        values = pd.to_numeric(finished[column], errors="coerce").dropna() if column in finished.columns else []
        return int(min(values)) if len(values) else None

    sources = finished.source.dropna().unique().tolist() if "source" in finished.columns else []
    return {"source": ", ".join(sorted(sources)) or None, "images": images, "iterations": smallest("iterations"),
            "batch_size": smallest("batch_size")}


def decide(cells: pd.DataFrame, seeds_required: int = SEEDS_REQUIRED, margin: float = MARGIN,
           judged_before: Sequence[Iterable[str]] = ()) -> dict[str, Any]:
    """The verdict on one row per cell: arch, depth, variant, seed, status and MEASURE (optional: train_err, source,
    iterations, batch_size, train_size). Rows with a variant are left out; so are unknown architectures.
    `judged_before` are the seed sets (cell ids) this folder judged before: a superset of one is a later look.

    A diverged cell makes the verdict undecided rather than counting as its architecture's degradation:
    a NaN loss says the recipe is numerically unstable for that net (the paper needed a warm-up for
    ResNet-110), which is not the higher-but-finite training error Figure 6 is about — counting it
    either way would let one unstable run decide the answer. It is named so it can be rerun.

    `reproduced` is True only for a firm yes, False for a firm no, None when undecided.
    """
    base = cells[(cells.variant == "") & cells.arch.isin(ARCHS)]
    details = _per_depth(base)
    finished = base[(base.status == "finished") & base[MEASURE].notna()]
    images = _images(finished)
    seeds = _seeds(finished)
    outliers = find_outliers(seeds, images)
    notes = [note for note in [_budget_note(base[base.status == "finished"])] if note]
    notes += [_outlier_note(o) for o in outliers] + ([OUTLIER_POLICY] if outliers else [])
    verdict: dict[str, Any] = {"outcome": "undecided", "reason": "", "reproduced": None, "plain_degrades": None,
                               "residual_degrades": None, "label": None, "details": details, "cross": None,
                               "measure": MEASURE, "seeds_required": seeds_required, "margin": margin,
                               "alpha": ALPHA, "notes": notes, "rule": RULE, "residual_steps": [], "interaction": None,
                               "seeds": {f"{a}-{d}": {"arch": a, "depth": d, "seeds": list(v), "values": list(v.values())}
                                         for (a, d), v in seeds.items()},
                               "outliers": outliers, "looks": None, "seeds_needed": None,
                               "variance_floor": _variance_floor(seeds, images), "data": _data(finished, images)}
    verdict.update(_judge_cells(base, details, seeds_required, margin, images, judged_before))
    if verdict["looks"] and verdict["looks"]["look"] > 1:
        looks = verdict["looks"]
        notes.append(f"look {looks['look']} at this question in this folder: its seeds extend the seed set"
                     f"{'s' if looks['look'] > 2 else ''} judged before, so every test ran at α = {ALPHA}/{looks['look']} = "
                     f"{looks['alpha']:.3g} (Bonferroni over looks)")
    synthetic = "source" in base.columns and base.source.eq("synthetic").any()
    if synthetic:
        verdict.update(outcome="undecided", label="pipeline check",
                       reason=f"synthetic images check the pipeline, not the science (the numbers: {verdict['outcome']}, "
                              f"{verdict['reason']})")
    verdict["reproduced"] = {"reproduced": True, "not_reproduced": False}.get(verdict["outcome"])
    return verdict


def _judge_cells(base: pd.DataFrame, details: dict[str, dict[str, Any]], seeds_required: int, margin: float,
                 images: int, judged_before: Sequence[Iterable[str]]) -> dict[str, Any]:
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
        listed = ", ".join(f"{net_name(a, d)} ({n})" for (a, d), n in sorted(short.items()))
        if max(len(v) for v in values.values()) == 1:
            return {"label": "indicative (1 seed)",
                    "reason": f"indicative (1 seed): {_direction(values)}; a firm verdict needs {seeds_required} seeds per net."}
        return {"reason": f"fewer than {seeds_required} finished seeds at {listed}."}
    cell_ids = sorted(f"{a}-{d}-s{s}" for a, d, s in zip(base.arch, base.depth, base.seed))
    look, earlier = look_number(cell_ids, judged_before)
    alpha = ALPHA / look
    judged = judge(values, margin, alpha, images)
    for arch, trend in judged["trends"].items():
        details[arch].update({k: v for k, v in trend.items() if k != "span" and not k.startswith("refute")},
                             noise=trend["high"] - trend["gap"], threshold=margin)
    result = {"outcome": judged["outcome"], "reason": judged["reason"], "cross": judged["cross"],
              "plain_degrades": judged["trends"]["plain"]["degrades"],
              "residual_degrades": judged["trends"]["residual"]["degrades"],
              "residual_steps": judged["residual_steps"], "interaction": judged["interaction"],
              "looks": {"look": look, "alpha": alpha, "cells": cell_ids, "earlier": earlier, "recorded": None}}
    if judged["outcome"] == "undecided":
        plan = plan_seeds(values, margin, ALPHA / (look + 1), images, start=min(len(v) for v in values.values()) + 1)
        result["seeds_needed"] = plan
        result["reason"] += " " + _plan_sentence(plan, look + 1)
    return result
