"""Simulated sweeps that test the verdict where it can fail: each boundary of the claim, unequal variances,
a bimodal seed distribution, seeds added a few at a time, and the CPU demo's own means and spreads.

    python -m depthlab.verdict_simulation --sweeps 4000 > table.md

Every row draws per-seed clean training errors for a grid of nets and hands them to verdict.judge, the
same function the report uses. At a boundary the truth sits exactly on one of the claim's thresholds
with every other part of the claim holding clearly — the worst case for a false "reproduced", which the
rule promises to keep at ALPHA or below. docs/statistics.md holds the full table and what it shows.
Needs numpy (a pandas dependency), not torch.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import yaml

from .results_folder import ResultsFolder
from .verdict import ALPHA, MARGIN, MEASURE, PAPER_TRAIN_SIZE, find_outliers, judge, net_name

Key = tuple[str, int]
SEED_COUNTS = (2, 3, 4, 5)
DEMO_IMAGES = 8000  # configs/cpu.yaml's training subset: the clean error's binomial floor is measured on it
DEMO = "plain-8=44.1:1.5,plain-20=51.4:2.8,residual-8=44.7:1.2,residual-20=41.6:1.4"  # docs/examples cpu + cpu-other-seeds + cpu-other-seeds-b, 15 seeds per net, pooled
DEMO_SEEDS = (4, 5)


@dataclass(frozen=True)
class Scenario:
    """A true state of the world: per-net mean and s.d. of the clean training error (%), and optionally a second mode."""

    name: str
    means: dict[Key, float]
    sd: float | dict[Key, float] = 1.0
    second_mode: Optional[tuple[Key, float, float]] = None  # (net, share of its seeds, how much worse)
    images: int = PAPER_TRAIN_SIZE

    def draw(self, rng: np.random.Generator, seeds: int) -> dict[Key, list[float]]:
        values = {}
        for key, mean in self.means.items():
            sd = self.sd[key] if isinstance(self.sd, dict) else self.sd
            draws = rng.normal(mean, sd, seeds)
            if self.second_mode and self.second_mode[0] == key:
                _, share, shift = self.second_mode
                draws += shift * (rng.random(seeds) < share)
            values[key] = draws.tolist()
        return values


@dataclass(frozen=True)
class MeasuredSeeds:
    """The demo as it ran: every finished seed's clean training error per net, pooled over results folders. A
    simulated sweep draws its seeds from these with replacement (a bootstrap), so no normal shape is assumed: a
    seed that landed far off is drawn as often as it was seen."""

    name: str
    values: dict[Key, list[float]]
    images: int = PAPER_TRAIN_SIZE

    def draw(self, rng: np.random.Generator, seeds: int) -> dict[Key, list[float]]:
        return {key: rng.choice(pool, seeds, replace=True).tolist() for key, pool in self.values.items()}


def read_measured(folders: Sequence[Path]) -> MeasuredSeeds:
    """The plain and residual seeds of the report folders' cells.csv (variants left out), and the training-subset
    size of their sweep.yaml (they must agree: the binomial floor is measured on it)."""
    values: dict[Key, list[float]] = {}
    sizes = set()
    for folder in folders:
        results = ResultsFolder(Path(folder))
        table, sweep = results.cells_table, results.sweep_file
        if not table.is_file():
            raise SystemExit(f"--demo-runs: {table} not found (run `depthlab report {folder}` first)")
        config = (yaml.safe_load(sweep.read_text()) or {}) if sweep.is_file() else {}
        sizes.add((config.get("data") or {}).get("train_size", PAPER_TRAIN_SIZE))
        with table.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("state") == "finished" and not row.get("variant") and row.get(MEASURE):
                    values.setdefault((row["arch"], int(row["depth"])), []).append(float(row[MEASURE]))
    if len(sizes) > 1:
        raise SystemExit(f"--demo-runs: the folders trained on different subsets ({sorted(sizes)} images); pool like with like")
    if len(values) < 4 or min(map(len, values.values())) < 2:
        found = ", ".join(f"{a}-{d}: {len(v)}" for (a, d), v in values.items()) or "none"
        raise SystemExit(f"--demo-runs: need at least 2 finished seeds of plain and residual nets at 2 depths; found {found}")
    return MeasuredSeeds(", ".join(str(f) for f in folders), dict(sorted(values.items())), images=sizes.pop())


def grid(plain: Sequence[float], residual: Sequence[float], depths: Sequence[int] = (8, 20)) -> dict[Key, float]:
    return {**{("plain", d): m for d, m in zip(depths, plain)}, **{("residual", d): m for d, m in zip(depths, residual)}}


FOUR = (20, 32, 44, 56)
M = MARGIN
# Each boundary with the rest of the claim clear: plain 45 → 53, ResNets falling, plain deepest well above ResNet deepest.
BOUNDARIES = [
    Scenario(f"ResNet rise at the margin (+{M:g})", grid((45, 53), (46, 46 + M))),
    Scenario(f"a middle ResNet step at the margin (20/32/44/56: ResNet-32 +{M:g}, then falling)",
             grid((45, 48, 51, 54), (46, 46 + M, 45, 44), FOUR)),
    Scenario(f"plain rise at the margin (+{M:g}), ResNets −5", grid((45, 45 + M), (46, 41))),
    Scenario("plain deepest = ResNet deepest (cross at 0)", grid((40, 50), (55, 50))),
    Scenario(f"interaction at 0: both rise +{M:g}", grid((50, 50 + M), (45, 45 + M))),
    Scenario(f"unequal s.d.s: ResNet at the margin, ResNet-20 s.d. 3, the rest 0.5", grid((45, 53), (46, 46 + M)),
             sd={**{k: 0.5 for k in grid((0, 0), (0, 0))}, ("residual", 20): 3.0}),
    Scenario(f"unequal s.d.s: plain at the margin, plain-20 s.d. 3, the rest 0.5", grid((45, 45 + M), (46, 41)),
             sd={**{k: 0.5 for k in grid((0, 0), (0, 0))}, ("plain", 20): 3.0}),
    Scenario(f"bimodal: 20 % of ResNet-20 seeds 10 pp worse, mean rise at the margin", grid((45, 53), (46, 46 + M - 2)),
             second_mode=(("residual", 20), 0.2, 10.0)),
]
SEQUENTIAL = [BOUNDARIES[0], BOUNDARIES[2]]  # seeds added one at a time at the ResNet and the plain boundary
CLAIM_TRUE = [
    Scenario("ResNets truly +0.5 (within the margin), plain +8", grid((45, 53), (46, 46.5))),
    Scenario(f"ResNets truly at the margin (+{M:g}), plain +8", grid((45, 53), (46, 46 + M))),
    Scenario(f"plain truly at the margin (+{M:g}), ResNets −5", grid((45, 45 + M), (46, 41))),
    Scenario("a clear Figure 6: plain +8, ResNets −2", grid((45, 53), (46, 44))),
]


def rates(scenario: Scenario, seeds: int, sweeps: int, rng: np.random.Generator) -> dict[str, float]:
    """Shares of `sweeps` simulated grids judged reproduced / not_reproduced / undecided, and with an outlier named."""
    counts = {"reproduced": 0, "not_reproduced": 0, "undecided": 0, "outlier": 0}
    for _ in range(sweeps):
        values = scenario.draw(rng, seeds)
        counts[judge(values, images=scenario.images)["outcome"]] += 1
        seeded = {key: dict(enumerate(v)) for key, v in values.items()}
        counts["outlier"] += bool(find_outliers(seeded, scenario.images))
    return {k: v / sweeps for k, v in counts.items()}


def sequential_rate(scenario: Scenario, last: int, sweeps: int, rng: np.random.Generator, corrected: bool) -> float:
    """The share of grids that some look says 'reproduced' when seeds are added one at a time from 2 up to `last`,
    stopping at the first firm answer; look k tests at ALPHA / k when `corrected`, at ALPHA otherwise."""
    hits = 0
    for _ in range(sweeps):
        values = scenario.draw(rng, last)
        for look, seeds in enumerate(range(2, last + 1), start=1):
            outcome = judge({k: v[:seeds] for k, v in values.items()}, alpha=ALPHA / look if corrected else ALPHA,
                            images=scenario.images)["outcome"]
            if outcome != "undecided":
                hits += outcome == "reproduced"
                break
    return hits / sweeps


def parse_demo(text: str) -> Scenario:
    """'plain-8=45.5:1.1,plain-20=53.2:1.2,...' (net=mean:s.d.) into a scenario on the demo's training subset."""
    means, sds = {}, {}
    for part in text.split(","):
        try:
            net, numbers = part.strip().split("=")
            arch, depth = net.rsplit("-", 1)
            mean, sd = (float(x) for x in numbers.split(":"))
            key = (arch, int(depth))
        except ValueError:
            raise SystemExit(f"--demo: {part.strip()!r} is not NET-DEPTH=MEAN:SD (e.g. plain-8=45.5:1.1)") from None
        if arch not in ("plain", "residual"):
            raise SystemExit(f"--demo: {arch!r} is not an architecture; allowed: plain, residual")
        means[key], sds[key] = mean, sd
    return Scenario("demo", means, sds, images=DEMO_IMAGES)


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f} %"


@dataclass
class Tables:
    """The markdown of every table, built row by row."""

    lines: list[str] = field(default_factory=list)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]


POWER_HEADER = ["seeds per net", "reproduced", "undecided", "not reproduced", "outlier named"]


def _power(demo: Union[Scenario, MeasuredSeeds], demo_seeds: Sequence[int], sweeps: int,
           rng: np.random.Generator) -> list[list[str]]:
    """One POWER_HEADER row per seed count: the shares of simulated sweeps of `demo` with each outcome."""
    rows = []
    for n in demo_seeds:
        r = rates(demo, n, sweeps, rng)
        rows.append([str(n), _pct(r["reproduced"]), _pct(r["undecided"]), _pct(r["not_reproduced"]), _pct(r["outlier"])])
    return rows


def simulate(sweeps: int, seed_counts: Sequence[int], demo: Scenario, demo_seeds: Sequence[int], seed: int = 0,
             progress: Callable[[str], None] = lambda _: None, measured: Optional[MeasuredSeeds] = None,
             demo_only: bool = False) -> str:
    """Every table as markdown (only the demo's with `demo_only`)."""
    rng = np.random.default_rng(seed)
    out = Tables()
    columns = [f"{n} seeds" for n in seed_counts]
    if not demo_only:
        rows = []
        for scenario in BOUNDARIES:
            progress(scenario.name)
            rows.append([scenario.name, *(_pct(rates(scenario, n, sweeps, rng)["reproduced"]) for n in seed_counts)])
        for scenario in SEQUENTIAL:
            for corrected in (False, True):
                progress(f"sequential {scenario.name}")
                label = f"seeds added one at a time from 2, stopping when firm, {'α/k at look k' if corrected else 'α at every look'}: {scenario.name}"
                rows.append([label, *(_pct(sequential_rate(scenario, n, sweeps, rng, corrected)) for n in seed_counts)])
        out.table(f"False \"reproduced\" (should be ≤ {ALPHA:.0%}), {sweeps:,} sweeps per cell", ["truth", *columns], rows)
        rows = []
        for scenario in CLAIM_TRUE:
            progress(scenario.name)
            measured_rates = [rates(scenario, n, sweeps, rng) for n in seed_counts]
            rows.append([scenario.name, *(f"{_pct(r['not_reproduced'])} / {_pct(r['reproduced'])} / {_pct(r['outlier'])}"
                                          for r in measured_rates)])
        out.table("When the claim holds: false \"not reproduced\" / \"reproduced\" / grids with an outlier named", ["truth", *columns], rows)
    progress("demo")
    nets = ", ".join(f"{net_name(a, d)} {m:g} ± {demo.sd[(a, d)]:g}" for (a, d), m in demo.means.items())
    out.table(f"The demo's power ({nets}; normal seeds, {demo.images:,} images)", POWER_HEADER,
              _power(demo, demo_seeds, sweeps, rng))
    if measured is not None:
        progress("measured seeds")
        pools = ", ".join(f"{net_name(a, d)} {len(v)}" for (a, d), v in measured.values.items())
        out.table(f"The demo's power, resampling its measured seeds (seeds pooled: {pools}; from {measured.name}; "
                  f"{measured.images:,} images)", POWER_HEADER, _power(measured, demo_seeds, sweeps, rng))
    return "\n".join(out.lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=4000, help="simulated grids per table cell (default 4000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEED_COUNTS), help="seeds per net, the columns")
    parser.add_argument("--demo", default=DEMO, help="the demo's nets as NET-DEPTH=MEAN:SD,... (default: the CPU demo, pooled)")
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=list(DEMO_SEEDS), help="seeds per net for the demo's power")
    parser.add_argument("--demo-runs", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="results folders of the demo (with a report's cells.csv): its power by resampling their seeds")
    parser.add_argument("--demo-only", action="store_true", help="only the demo's tables, not the boundaries")
    parser.add_argument("--rng-seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sweeps < 1 or min(args.seeds + args.demo_seeds) < 2:
        parser.error("--sweeps must be at least 1 and every seed count at least 2")
    command = "python -m depthlab.verdict_simulation " + " ".join(argv if argv is not None else sys.argv[1:])
    measured = read_measured(args.demo_runs) if args.demo_runs else None
    text = simulate(args.sweeps, args.seeds, parse_demo(args.demo), args.demo_seeds, args.rng_seed,
                    progress=lambda name: print(f"… {name}", file=sys.stderr), measured=measured, demo_only=args.demo_only)
    se = math.sqrt(ALPHA * (1 - ALPHA) / args.sweeps)
    print(f"`{command.strip()}` — a rate of {ALPHA:.0%} is measured to ± {100 * se:.1f} pp (one s.e.).\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
