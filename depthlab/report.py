"""The report of a sweep: per-depth results over seeds, the Figure-6 verdict, a table and the figure.

It reads only what the sweep leaves on disk (sweep.yaml and cells/<id>/), so it can be run at
any time, also while the sweep still trains: unfinished cells are listed, never averaged in, and
so are damaged ones (a file that does not read back whole), in the table and the figure alike.
The verdict (verdict.py) asks the question of He et al. 2015, Fig. 6: does the training error rise
with depth for plain nets, and not for ResNets? Its answer is reproduced, not reproduced or undecided.
"""

from __future__ import annotations

import io
import json
import math
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import files
from .ablation import ABLATION_FIGURE, ablation_figure, ablation_markdown, judge_ablations
from .config import Cell, parse_config
from .errors import ConfigError, ReportError
from .results_folder import DYNAMICS_FIGURE, FIGURE, VERDICT_FIGURE, CellFolder, CellRecord, CellState, ResultsFolder, cell_identity, read_cell
from .options import ARCHS
from .paper import CITATION, paper_test_error
from .results import provenance, provenance_line, write_tables
from .verdict import decide, mean_interval

ARCH_LABELS = {"plain": "plain", "residual": "ResNet"}
KEYS = ["arch", "depth", "variant"]
ERRORS = ("train_err", "clean_train_err", "test_err", "val_err")
CURVE_MEASURES = KEYS + ["epoch", "iteration", "train_err", "test_err"]
CURVE_COLUMNS = CURVE_MEASURES + ["train_err_min", "train_err_max", "test_err_min", "test_err_max", "n"]
FIGURE_FORMATS = ("png", "svg", "pdf")
# One colour per depth in every figure of every report (a depth's place in a list would change it from one sweep to
# the next); depths not listed take a colour from their size.
DEPTH_COLOURS = {8: "#1f77b4", 14: "#17becf", 20: "#2ca02c", 26: "#bcbd22", 32: "#ff7f0e", 44: "#d62728",
                 56: "#9467bd", 110: "#8c564b", 1202: "#000000"}


@dataclass
class Report:
    """A sweep's results: `rows` per (arch, depth, variant), the verdict, unfinished cells and mean curves."""

    name: str
    rows: pd.DataFrame
    verdict: dict[str, Any]
    missing: list[dict[str, Any]]
    curves: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # what the report could not read and what it did instead
    ran: list[dict[str, Any]] = field(default_factory=list)  # how the ended cells ran: device, precision, memory format, execution
    dynamics: pd.DataFrame = field(default_factory=pd.DataFrame)  # per (arch, depth, variant, epoch): mean of dynamics.csv
    ablations: list[dict[str, Any]] = field(default_factory=list)  # per variant: its depth effect against its baseline's (ablation.py)
    provenance: dict[str, Any] = field(default_factory=dict)  # commit, versions, device, times: results.provenance


# ----------------------------------------------------------------------------- reading the folder


def _expected_cells(results: ResultsFolder) -> tuple[Optional[str], dict[str, Cell], list[str]]:
    """The sweep's name and cells from its sweep.yaml, or (None, {}) when there is none; and a note when it is unreadable."""
    path = results.sweep_file
    if not path.is_file():
        return None, {}, []
    try:
        config = parse_config(yaml.safe_load(path.read_text()), source=str(path))
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        return None, {}, [f"{path} does not read back ({first_line}); reporting the cells in {results.cells_dir} "
                          "without checking them against it"]
    return config.name, {cell.id: cell for cell in config.cells}, []


def _read_dynamics(folder: CellFolder) -> Optional[pd.DataFrame]:
    """dynamics.csv, or None when it is absent or does not read back (it is optional: the verdict never needs it)."""
    try:
        frame = pd.read_csv(folder.dynamics)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return frame if "epoch" in frame and len(frame) else None


def _read_cells(results: ResultsFolder, expected: dict[str, Cell]) -> list[CellRecord]:
    """Every cell on disk plus every expected cell, in the sweep's order, then the others by name."""
    if not results.cells_dir.is_dir():
        raise ReportError(f"{results.path}: no '{results.cells_dir.name}' folder, so no results yet; run `depthlab sweep CONFIG` first")
    on_disk = {folder.id: folder for folder in results.cells_on_disk()}
    if not on_disk and not expected:
        raise ReportError(f"{results.cells_dir} is empty: no results yet; run `depthlab sweep CONFIG` first")
    order = list(expected) + [name for name in on_disk if name not in expected]
    return [read_cell(on_disk[name], expected[name].fingerprint() if name in expected else None) if name in on_disk
            else CellRecord(name, CellState.PENDING) for name in order]


# ----------------------------------------------------------------------------- aggregation


def _variant(summary: dict[str, Any]) -> str:
    """What sets this cell apart from the 2015 net (shortcut B, ablation options, grid tags): '' for none."""
    return cell_identity(summary["id"], summary)["variant"]


def _cell_frame(records: list[CellRecord]) -> pd.DataFrame:
    """One row per cell that ended (finished or diverged), with its final numbers."""
    rows = []
    for rec in records:
        if not rec.state.ended:
            continue
        s = rec.summary
        final = s.get("final", {})
        rows.append({"arch": s["arch"], "depth": s["depth"], "variant": _variant(s), "seed": s["seed"],
                     "status": rec.state.value, "params": s.get("params"), "epochs": s.get("epochs"),
                     "iterations": s.get("iterations"), **{e: final.get(e) for e in ERRORS},
                     "source": s.get("data", {}).get("source"), "train_size": s.get("data", {}).get("train_size"),
                     "batch_size": s.get("train", {}).get("batch_size"), "paper_test_err": paper_test_error(s)})
    columns = KEYS + ["seed", "status", "params", "epochs", "iterations", *ERRORS, "source", "train_size", "batch_size",
                      "paper_test_err"]
    return pd.DataFrame(rows, columns=columns).astype({e: float for e in ERRORS})


def _aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1) over finished seeds per (arch, depth, variant); diverged seeds are only counted."""
    errors = [e for e in ERRORS if e != "val_err" or cells.loc[cells.status == "finished", e].notna().any()]
    flagged = cells.assign(finished=cells.status.eq("finished"), diverged=cells.status.eq("diverged"))
    counts = flagged.groupby(KEYS).agg(n_seeds=("finished", "sum"), n_diverged=("diverged", "sum"), params=("params", "first"),
                                       paper_test_err=("paper_test_err", "first"))
    stats_spec: dict[str, tuple[str, str]] = {"epochs": ("epochs", "max"), "iterations": ("iterations", "max")}
    for e in errors:
        stats_spec[e], stats_spec[f"{e}_std"] = (e, "mean"), (e, "std")
    stats = flagged[flagged.finished].groupby(KEYS).agg(**stats_spec)
    rows = counts.join(stats).reset_index()
    rows = rows.astype({"depth": int, "n_seeds": int, "n_diverged": int})
    order = {arch: i for i, arch in enumerate(ARCHS)}
    return rows.sort_values(["arch", "variant", "depth"], key=lambda c: c.map(order) if c.name == "arch" else c,
                            ignore_index=True)


def _curves(records: list[CellRecord]) -> pd.DataFrame:
    """Per (arch, depth, variant, epoch): the mean over finished seeds of iteration and errors, the seeds' lowest and
    highest error (`*_min`, `*_max`: the band a figure draws) and how many seeds (`n`)."""
    frames = [pd.DataFrame(rec.metrics).assign(arch=rec.summary["arch"], depth=rec.summary["depth"], variant=_variant(rec.summary))
              for rec in records if rec.state is CellState.FINISHED and rec.metrics is not None]
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    grouped = pd.concat(frames)[CURVE_MEASURES].groupby(KEYS + ["epoch"])
    means = grouped[["iteration", "train_err", "test_err"]].mean()
    spread = grouped[["train_err", "test_err"]].agg(["min", "max"])
    spread.columns = [f"{measure}_{stat}" for measure, stat in spread.columns]
    return means.join(spread).join(grouped.size().rename("n")).reset_index()


RAN_KEYS = ("device_name", "device", "precision", "memory_format", "execution")


def _how_it_ran(records: list[CellRecord]) -> list[dict[str, Any]]:
    """The ended cells grouped by how they ran, with their count and median images/s.

    Summaries written before these were recorded ran in the precision their recipe named (it had
    no `auto` then); their memory format and execution are reported as `unrecorded`.
    """
    groups: dict[tuple, list[float]] = {}
    for rec in records:
        if not rec.state.ended:
            continue
        s = rec.summary
        defaults = {"precision": s.get("train", {}).get("precision", "fp32")}
        key = tuple(str(s.get(k, defaults.get(k, "unrecorded"))) for k in RAN_KEYS)
        groups.setdefault(key, []).append(float(s.get("images_per_second") or float("nan")))
    return [{**dict(zip(RAN_KEYS, key)), "cells": len(rates), "images_per_second": float(np.nanmedian(rates))
             if not all(math.isnan(r) for r in rates) else None} for key, rates in sorted(groups.items())]


def _ran_line(entry: dict[str, Any]) -> str:
    rate = f", {entry['images_per_second']:,.0f} images/s (median)" if entry.get("images_per_second") else ""
    precision = "bf16 autocast" if entry["precision"] == "bf16" else entry["precision"]
    cells = f"{entry['cells']} cell{'s' if entry['cells'] > 1 else ''}"
    return f"{cells} on {entry['device_name']} ({entry['device']}): {precision}, {entry['memory_format']}, {entry['execution']}{rate}"


def _dynamics(records: list[CellRecord], results: ResultsFolder) -> pd.DataFrame:
    """Per (arch, depth, variant, epoch): the mean over finished seeds of each recorded gradient norm and branch ratio."""
    read = [(rec, _read_dynamics(results.cell(rec.id))) for rec in records if rec.state is CellState.FINISHED]
    frames = [dynamics.assign(arch=rec.summary["arch"], depth=rec.summary["depth"], variant=_variant(rec.summary))
              for rec, dynamics in read if dynamics is not None]
    if not frames:
        return pd.DataFrame()
    joined = pd.concat(frames, ignore_index=True)
    values = [c for c in joined.columns if c not in KEYS and c != "epoch"]
    return joined.groupby(KEYS + ["epoch"])[values].mean().reset_index()


def _missing(records: list[CellRecord], expected: dict[str, Cell]) -> list[dict[str, Any]]:
    """Cells the means leave out and why, with their progress where it is known."""
    out = []
    for rec in records:
        if rec.state is CellState.FINISHED:
            continue
        entry: dict[str, Any] = {"id": rec.id, "status": rec.state.report_status, "state": rec.state.value}
        if rec.state in (CellState.PARTIAL, CellState.FAILED):
            entry["epochs_done"] = 0 if rec.metrics is None else len(rec.metrics)
            total = rec.config.get("run_length", {}).get("epochs")
            if total is None and rec.id in expected:  # not started yet: a recipe in epochs still says how long it will be
                total = expected[rec.id].train.epochs
            entry["epochs_total"] = total
        elif rec.state is CellState.DIVERGED:
            entry["epochs_done"] = rec.summary.get("epochs")
        elif rec.state is CellState.DAMAGED:
            entry["reason"] = rec.damage.reason
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- the verdict


def _verdict_cells(records: list[CellRecord], expected: dict[str, Cell]) -> pd.DataFrame:
    """Every cell the verdict must see: those that ended with their numbers, the others with their status."""
    described = {rec.id: rec.config or (expected[rec.id].to_record() if rec.id in expected else {}) for rec in records}
    unended = [(rec, cell_identity(rec.id, described[rec.id])) for rec in records if not rec.state.ended]
    pending = [{**{k: who[k] for k in ("arch", "depth", "variant", "seed")}, "status": rec.state.report_status}
               for rec, who in unended if who["variant"] == "" and who["arch"] in ARCHS]
    ended = _cell_frame(records)
    if not pending:
        return ended
    waiting = pd.DataFrame(pending, columns=ended.columns).astype({e: float for e in ERRORS})
    return pd.concat([ended, waiting], ignore_index=True) if len(ended) else waiting


def compute_verdict(cells: pd.DataFrame, judged_before: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The Figure-6 verdict on one row per cell (see verdict.decide for the columns and the rule), knowing the seed
    sets judged before in the same folder (entries of verdict_looks.jsonl)."""
    verdict = decide(cells, judged_before=[entry["cells"] for entry in judged_before])
    if verdict["looks"]:
        verdict["looks"]["earlier"] = [{k: judged_before[i].get(k) for k in ("look", "outcome", "alpha", "judged_at")}
                                       | {"cells": len(judged_before[i]["cells"])} for i in verdict["looks"]["earlier"]]
    return verdict


def _judged_before(results: ResultsFolder) -> tuple[list[dict[str, Any]], list[str]]:
    """The seed sets judged before in this folder, and a note per line of verdict_looks.jsonl that does not read back."""
    path = results.verdict_looks
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"{path} does not read back ({err}); earlier looks are not counted"]
    entries, notes = [], []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            valid = isinstance(entry, dict) and isinstance(entry.get("cells"), list) and all(isinstance(c, str) for c in entry["cells"])
        except ValueError:
            valid = False
        if valid:
            entries.append(entry)
        elif line.strip():
            notes.append(f"{path.name} line {number} is not a judged seed set; it is left out of the look count")
    return entries, notes


def _record_look(results: ResultsFolder, verdict: dict[str, Any], judged_before: list[dict[str, Any]]) -> None:
    """Append this seed set to verdict_looks.jsonl the first time a complete grid of it is judged.

    A folder that cannot be written still gets its report: the verdict then says that this look is not on record.
    """
    looks = verdict["looks"]
    if looks is None:
        return
    if any(set(entry["cells"]) == set(looks["cells"]) for entry in judged_before):
        looks["recorded"] = True
        return
    path = results.verdict_looks
    entry = {"look": looks["look"], "cells": looks["cells"], "outcome": verdict["outcome"], "alpha": looks["alpha"],
             "judged_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        earlier = path.read_text() if path.is_file() else ""
        files.write_text(path, earlier + ("" if not earlier or earlier.endswith("\n") else "\n") + json.dumps(entry) + "\n")
        looks["recorded"] = True
    except OSError as err:
        looks["recorded"] = False
        verdict["notes"].append(f"this look could not be recorded in {path.name} ({err.strerror or err}): "
                                f"a later verdict on more seeds will not know it came after this one")


def build_report(results_dir: Path) -> Report:
    """Read a sweep's results folder into a Report; ReportError when there is nothing to read."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no such folder; run `depthlab sweep CONFIG` first")
    results = ResultsFolder(results_dir)
    name, expected, notes = _expected_cells(results)
    records = _read_cells(results, expected)
    cells = _cell_frame(records)
    judged_before, look_notes = _judged_before(results)
    verdict = compute_verdict(_verdict_cells(records, expected), judged_before)
    _record_look(results, verdict, judged_before)
    notes += look_notes
    return Report(name=name or results_dir.name, rows=_aggregate(cells), verdict=verdict,
                  missing=_missing(records, expected), curves=_curves(records), notes=notes, ran=_how_it_ran(records),
                  dynamics=_dynamics(records, results), ablations=judge_ablations(cells), provenance=provenance(results_dir))


# ----------------------------------------------------------------------------- words and tables


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _mean_std(row: pd.Series, column: str) -> str:
    """'7.10 ± 0.21' (no ± with one seed)."""
    std = row[f"{column}_std"]
    return f"{row[column]:.2f}" if pd.isna(std) else f"{row[column]:.2f} ± {std:.2f}"


def _table(rows: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the side-by-side table: one line per depth (and variant), plain left, ResNet right."""
    header = ["depth"]
    for arch in ARCHS:
        label = ARCH_LABELS[arch]
        header += [f"{label} train err % (n)", f"{label} clean train %", f"{label} test err %"]
    lines = []
    for (variant, depth), group in rows.groupby(["variant", "depth"], sort=True):
        line = [f"{depth} [{variant}]" if variant else str(depth)]
        for arch in ARCHS:
            match = group[group.arch == arch]
            line += _arch_cells(match.iloc[0]) if len(match) else ["–", "–", "–"]
        lines.append(line)
    return header, lines


def _arch_cells(row: pd.Series) -> list[str]:
    """The three cells of one (arch, depth) in the table, noting diverged seeds."""
    diverged = f", {row.n_diverged} diverged" if row.n_diverged else ""
    if row.n_seeds == 0:
        return [f"diverged ({row.n_diverged})", "–", "–"]
    paper = f" (paper {row.paper_test_err:.2f})" if pd.notna(row.get("paper_test_err")) else ""
    return [f"{_mean_std(row, 'train_err')} (n={row.n_seeds}{diverged})",
            _mean_std(row, "clean_train_err"), _mean_std(row, "test_err") + paper]


def _paper_note(rows: pd.DataFrame) -> Optional[str]:
    """Where the '(paper …)' numbers come from, when the table shows any."""
    if "paper_test_err" not in rows or not rows.paper_test_err.notna().any():
        return None
    return (f"(paper …): test error of {CITATION}, shown where a cell's recipe is the paper's; "
            "the paper gives plain nets only as the curves of its Fig. 6, so they have no number here.")


def verdict_headline(verdict: dict[str, Any]) -> str:
    """One sentence: reproduced, not reproduced or undecided, and why."""
    word = {"reproduced": "Reproduced", "not_reproduced": "Not reproduced", "undecided": "Undecided"}[verdict["outcome"]]
    return f"{word}: {verdict['reason']}"


def _shown_interval(low: float, high: float) -> str:
    """A 95 % interval of an error rate, clipped to [0, 100] for display: the t interval of two seeds can reach past both."""
    return f"[{_fmt(max(low, 0.0))}, {_fmt(min(high, 100.0))}]"


def _depth_value(depth: int, mean: float, interval: list[Optional[float]], n_seeds: int) -> str:
    """'20: 5.10 [4.20, 6.00] (n=3)'; no interval with one seed."""
    low, high = interval
    spread = f" {_shown_interval(low, high)}" if low is not None and math.isfinite(low) else ""
    return f"{depth}: {_fmt(mean)}{spread} (n={n_seeds})"


def _bounds(entry: dict[str, Any]) -> str:
    return f"{entry['gap']:+.2f} pp, one-sided bounds [{entry['low']:+.2f}, {entry['high']:+.2f}] (Welch df {entry['df']:.1f})"


def _trend_line(arch: str, trend: dict[str, Any]) -> str:
    """One architecture's numbers behind the verdict: per-depth means with 95 % intervals, then the difference."""
    per_depth = ", ".join(_depth_value(*values) for values in
                          zip(trend["depths"], trend["err"], trend["err_ci"], trend["n_seeds"]))
    line = f"{ARCH_LABELS[arch]}: clean training error % by depth {per_depth or 'none'}"
    if trend["gap"] is None or arch != "plain":
        return line + "."
    return f"{line}; deepest − shallowest {_bounds(trend)}."


def _seed_line(name: str, cell: dict[str, Any], outliers: list[dict[str, Any]]) -> str:
    """'ResNet-20 seeds: 44.10 (s0), 45.00 (s1), 54.30 (s2, outlier)' — every seed's clean training error."""
    marked = {o["seed"] for o in outliers if o["cell"] == name}
    label = f"{ARCH_LABELS[cell['arch']]}-{cell['depth']}"
    pair = None in marked
    values = ", ".join(f"{value:.2f} (s{seed}{', outlier' if seed in marked else ''})"
                       for seed, value in zip(cell["seeds"], cell["values"]))
    return f"{label} seeds: {values}" + (" — far apart (outlier pair)" if pair else "")


def _verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """The lines under the headline: each architecture, every ResNet step, the interaction, plain vs ResNet at the
    deepest common depth, every seed's value, the notes."""
    lines = [_trend_line(arch, verdict["details"][arch]) for arch in ARCHS]
    lines += [f"{step['span']}: {_bounds(step)}." for step in verdict.get("residual_steps", [])]
    interaction = verdict.get("interaction")
    if interaction:
        (p_lo, p_hi), (r_lo, r_hi) = interaction["plain_span"], interaction["residual_span"]
        lines.append(f"interaction (plain-{p_lo}→{p_hi} rise − ResNet-{r_lo}→{r_hi} rise): {_bounds(interaction)}.")
    cross = verdict["cross"]
    if cross:
        lines.append(f"plain-{cross['depth']} − ResNet-{cross['depth']}: {cross['gap']:+.2f} pp, one-sided bounds "
                     f"[{cross['low']:+.2f}, {cross['high']:+.2f}].")
    lines += [_seed_line(name, cell, verdict.get("outliers", [])) for name, cell in verdict.get("seeds", {}).items()]
    lines += [f"Note — {note}." for note in verdict["notes"]]
    return lines


def _missing_line(entry: dict[str, Any]) -> str:
    """'plain-56-s1: running (12/160 epochs)'."""
    status = entry["status"]
    if status == "running":
        total = entry.get("epochs_total")
        status += f" or interrupted ({entry['epochs_done']}/{total if total is not None else '?'} epochs)"
    elif status == "diverged":
        status += f" after {entry['epochs_done']} epochs"
    elif status == "failed":
        status += f" after {entry['epochs_done']} epochs (see {ResultsFolder(Path('.')).cell(entry['id']).error_log})"
    elif status == "stale":
        status += " (trained under another configuration than sweep.yaml; `depthlab sweep --force` retrains it)"
    elif status == "damaged":
        status += f": {entry['reason']} (`depthlab sweep` moves it aside and trains it again)"
    return f"{entry['id']}: {status}"


# ----------------------------------------------------------------------------- outputs


def _json_safe(value: Any) -> Any:
    """Plain JSON types: NaN becomes None, numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_json(report: Report) -> dict[str, Any]:
    """The report as JSON-able data (json.dumps works on it with allow_nan=False)."""
    return _json_safe({"name": report.name, "rows": report.rows.to_dict(orient="records"),
                       "verdict": report.verdict, "missing": report.missing, "notes": report.notes, "ran": report.ran,
                       "ablations": report.ablations, "provenance": report.provenance})


def report_markdown(report: Report) -> str:
    """report.md's text: the table, the verdict, the missing cells and the figure's link."""
    header, lines = _table(report.rows)
    text = [f"# {report.name}: plain vs residual nets of growing depth (He et al. 2015, Fig. 6)", "",
            "Final-epoch errors in %, mean ± std over finished seeds. *Train err* is the running error over the "
            "last epoch's augmented mini-batches (what Figure 6 plots); *clean train* is the eval-mode error on "
            "the whole training set, and what the verdict decides on.", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(line) + " |" for line in lines]
    if (paper := _paper_note(report.rows)) is not None:
        text += ["", paper]
    verdict = report.verdict
    text += ["", "## Verdict", "", f"**{verdict_headline(verdict)}**", ""]
    text += [f"- {line}" for line in _verdict_lines(verdict)]
    text += ["", f"Rule: {verdict['rule']}", ""]
    if report.ablations:  # ablation.py: each variant against its baseline
        text += ["## Ablations", "", ablation_markdown(report.ablations), f"![Ablations: shallowest vs deepest]({ABLATION_FIGURE})", ""]
    if report.missing:
        text += ["## Missing", "", "Not in the means above:", ""]
        text += [f"- {_missing_line(entry)}" for entry in report.missing] + [""]
    if report.notes:
        text += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    if report.ran:
        text += ["## How it ran", ""] + [f"- {_ran_line(entry)}" for entry in report.ran] + [""]
    if (origin := provenance_line(report.provenance)) is not None:
        text += ["## Provenance", "", origin, ""]
    text += ["## Figure", "", f"![Figure 6: error vs iterations, plain (left) and ResNet (right)]({FIGURE})", ""]
    if report.verdict.get("seeds"):
        text += [f"![The verdict's numbers: clean training error vs depth, every seed a dot]({VERDICT_FIGURE})", ""]
    if _has_dynamics(report):
        text += [f"![Gradients reaching stage 1 and branch sizes per epoch]({DYNAMICS_FIGURE})", ""]
    return "\n".join(text)


def depth_colour(depth: int) -> Any:
    """The colour of a depth in every figure: fixed for the common depths, else from a colour map by log-depth."""
    if depth in DEPTH_COLOURS:
        return DEPTH_COLOURS[depth]
    from matplotlib import colormaps
    return colormaps["viridis"](min(1.0, math.log(depth / 8) / math.log(1202 / 8)))


def _y_limits(values: np.ndarray) -> tuple[float, float]:
    """Error limits fitted to the plotted values with a margin, kept inside 0–100 %."""
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 100.0
    low, high = float(values.min()), float(values.max())
    pad = max(1.0, 0.06 * (high - low))
    return max(0.0, math.floor(low - pad)), min(100.0, math.ceil(high + pad))


def _x_unit(last_iteration: float) -> tuple[float, str]:
    """The x axis' unit for a run of this many iterations: the paper's 1e4 for long runs, so that ticks read 0–6."""
    for unit, label in ((1e4, "iter. (1e4)"), (1e3, "iter. (1e3)")):
        if last_iteration >= 2 * unit:
            return unit, label
    return 1.0, "iterations"


def figure6(report: Report) -> Figure:
    """Figure-6-style panels: error vs iterations per depth — dashed = training (running), bold = test, each the mean
    over seeds with the seeds' range as a band; one colour per depth in every figure."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    curves = report.curves[report.curves.variant == ""]
    unit, unit_label = _x_unit(float(curves.iteration.max()) if len(curves) else 0.0)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    handles: dict[str, Any] = {}
    for ax, arch in zip(axes, ARCHS):
        label = ARCH_LABELS[arch]
        ax.set_title("plain networks" if arch == "plain" else "residual networks (ResNet)")
        ax.set_xlabel(unit_label)
        ax.grid(alpha=0.3)
        data = curves[curves.arch == arch]
        if data.empty:
            ax.text(0.5, 0.5, f"no finished {label} cells", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        for depth, run in sorted(data.groupby("depth"), reverse=True):
            run, colour = run.sort_values("epoch"), depth_colour(int(depth))
            x = run.iteration / unit
            for measure, style, width in (("train_err", "--", 0.9), ("test_err", "-", 2.2)):
                ax.plot(x, run[measure], style, lw=width, color=colour)
                if f"{measure}_min" in run and (run[f"{measure}_max"] > run[f"{measure}_min"]).any():
                    ax.fill_between(x, run[f"{measure}_min"], run[f"{measure}_max"], color=colour, alpha=0.12, lw=0)
            seeds = int(run["n"].min()) if "n" in run else 0
            handles.setdefault(f"{depth:>5}", Line2D([], [], color=colour, lw=2.2, label=f"{depth} layers" + (f" (n={seeds})" if seeds else "")))
        ax.set_xlim(left=0)
    axes[0].set_ylabel("error (%)")
    plotted = [c for c in ("train_err", "test_err", "train_err_min", "train_err_max", "test_err_min", "test_err_max") if c in curves]
    axes[0].set_ylim(*_y_limits(curves[plotted].to_numpy(dtype=float).ravel()))
    styles = [Line2D([], [], color="grey", ls="--", lw=0.9, label="training error (running, augmented)"),
              Line2D([], [], color="grey", ls="-", lw=2.2, label="test error"),
              Patch(color="grey", alpha=0.25, label="band: lowest to highest seed")]
    legend = [handles[k] for k in sorted(handles)] + styles
    fig.legend(handles=legend, loc="outside lower center", ncol=min(len(legend), 4), fontsize=9, frameon=False)
    fig.suptitle(_title(report, "error vs iterations, mean over seeds"), fontsize=10)
    return fig


def _title(report: Report, what: str) -> str:
    """A figure's title: the sweep, what the figure shows, and its data, budget, seeds and outcome when known."""
    return f"{report.name}: {what}" + (f"\n{_verdict_title(report)}" if report.verdict.get("data") and report.verdict.get("seeds") else "")


TITLE_WIDTH = 100  # characters of a 9-pt title line across a 7-inch figure: 89 fit, the smoke sweep's 116 were cut off;
# a longer line puts the verdict on a line of its own


def _verdict_title(report: Report) -> str:
    """What the verdict figure shows: data, budget, seeds and outcome."""
    verdict = report.verdict
    data, counts = verdict["data"], sorted({len(cell["values"]) for cell in verdict["seeds"].values()})
    seeds = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}–{counts[-1]}"
    budget = (f", {data['iterations']:,} iterations × {data['batch_size']}"
              if data.get("iterations") and data.get("batch_size") else "")
    outcome = verdict["outcome"].replace("_", " ") + (f" ({verdict['label']})" if verdict.get("label") else "")
    what = (f"{data.get('source') or 'images'}, {data['images']:,} training images{budget}, "
            f"{seeds} seed{'s' if counts[-1] > 1 else ''} per net")
    verdict_part = f"verdict: {outcome}"
    separator = "; " if len(what) + 2 + len(verdict_part) <= TITLE_WIDTH else ";\n"
    return what + separator + verdict_part


def verdict_figure(report: Report) -> Optional[Figure]:
    """The numbers the verdict decides on: final clean training error vs depth per family — each seed a dot, the
    mean with its 95 % interval (clipped to [0, 100]), outlier seeds ringed. None when no cell has finished."""
    verdict = report.verdict
    cells = verdict.get("seeds") or {}
    if not cells:
        return None
    depths = sorted({cell["depth"] for cell in cells.values()})
    position = {d: i for i, d in enumerate(depths)}  # evenly spaced: 8 and 20 layers do not crowd each other
    outliers = {(o["cell"], o["seed"]) for o in verdict.get("outliers", [])}
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    for arch, shift, colour in (("plain", -0.07, "C3"), ("residual", 0.07, "C0")):  # each family's seeds on its outer side
        family = [cell for cell in cells.values() if cell["arch"] == arch]
        xs, means = [], []
        for cell in family:
            x, values = position[cell["depth"]] + shift, cell["values"]
            mean = float(np.mean(values))
            low, high = mean_interval(values)
            if math.isfinite(low):
                ax.errorbar([x], [mean], yerr=[[mean - max(low, 0.0)], [min(high, 100.0) - mean]], color=colour,
                            capsize=4, lw=1.5)
            ax.scatter([x + shift] * len(values), values, s=16, color=colour, alpha=0.6, zorder=3)
            ringed = [v for seed, v in zip(cell["seeds"], cell["values"])
                      if (f"{arch}-{cell['depth']}", seed) in outliers or (f"{arch}-{cell['depth']}", None) in outliers]
            if ringed:
                ax.scatter([x + shift] * len(ringed), ringed, s=90, facecolors="none", edgecolors="black", zorder=4,
                           label="outlier seed" if not any(t.get_label() == "outlier seed" for t in ax.collections) else None)
            xs.append(x)
            means.append(mean)
        if xs:
            ax.plot(xs, means, "o-", color=colour, lw=2, label=f"{ARCH_LABELS[arch]} (mean, 95 % interval)")
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlim(-0.5, len(depths) - 0.5)
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("final clean training error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(_title(report, "final clean training error vs depth"), fontsize=9)
    return fig


def _has_dynamics(report: Report) -> bool:
    data = report.dynamics
    return not data.empty and {"grad_norm/stage1", "grad_norm/classifier"} <= set(data.columns) and (data.variant == "").any()


def dynamics_figure(report: Report) -> Optional[Figure]:
    """Beside Figure 6, per epoch and depth: how much gradient reaches the first stage (relative to the
    classifier's), and the blocks' branch size RMS(F(x))/RMS(x) averaged over stages (→ 0: near the identity).
    None when no cell recorded them."""
    if not _has_dynamics(report):
        return None
    data = report.dynamics[report.dynamics.variant == ""]
    ratios = [c for c in data.columns if c.startswith("branch_ratio/")]
    depths = sorted(data.depth.unique())
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey="row")
    for column, arch in enumerate(ARCHS):
        top, bottom = axes[0][column], axes[1][column]
        top.set_title("plain networks" if arch == "plain" else "residual networks (ResNet)")
        for depth, run in sorted(data[data.arch == arch].groupby("depth")):
            run = run.sort_values("epoch")
            label = f"{ARCH_LABELS[arch]}-{depth}"
            top.plot(run.epoch, run["grad_norm/stage1"] / run["grad_norm/classifier"], color=depth_colour(int(depth)), label=label)
            if ratios:
                bottom.plot(run.epoch, run[ratios].mean(axis=1), color=depth_colour(int(depth)), label=label)
        bottom.set_xlabel("epoch")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if bottom.get_legend_handles_labels()[0]:  # a column without curves (one architecture ran) has nothing to list
            bottom.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(depths), 5), fontsize=9, frameon=False)
    _gradient_scale(axes[0][0], data["grad_norm/stage1"] / data["grad_norm/classifier"])
    axes[0][0].set_ylabel("‖∂L/∂W‖ stage 1 / classifier")
    axes[1][0].set_ylabel("branch RMS(F(x)) / RMS(x), mean over stages")
    fig.suptitle(_title(report, "gradients and blocks during training (one fixed batch per epoch, mean over seeds)"), fontsize=10)
    return fig


def _gradient_scale(ax: Any, ratios: pd.Series) -> None:
    """A linear axis when the ratios span less than 10× (a log axis there shows two labelled ticks), else a log axis
    with a labelled tick at every 1-2-5 step."""
    values = ratios[np.isfinite(ratios) & (ratios > 0)]
    if len(values) and values.max() / values.min() >= 10:
        from matplotlib.ticker import LogLocator
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))


def _write_figure(path: Path, fig: Figure) -> None:
    """One figure in the format its file name says (png at 150 dpi; svg and pdf are vector), written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), dpi=150)
    files.write_bytes(path, buffer.getvalue())


def write_report(report: Report, results_dir: Path, figure_format: str = "png") -> list[Path]:
    """Write report.md, report.csv, figure6.png, verdict.png (when a cell finished), dynamics.png (when cells recorded
    it), ablation.png (when there are variants), cells.csv and curves.csv into `results_dir`; return their paths.

    With `figure_format` svg or pdf each figure is also written in that format beside its PNG (report.md shows
    the PNGs)."""
    if figure_format not in FIGURE_FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}; got {figure_format!r}")
    results = ResultsFolder(Path(results_dir))
    files.write_text(results.report_md, report_markdown(report))
    files.write_text(results.report_csv, report.rows.to_csv(index=False))
    written = [results.report_md, results.report_csv]
    figures = [(results.figure, figure6(report)), (results.verdict_figure, verdict_figure(report)),
               (results.dynamics_figure, dynamics_figure(report)),
               (Path(results_dir) / ABLATION_FIGURE, ablation_figure(report.ablations))]
    for path, fig in figures:
        if fig is None:
            continue
        for target in dict.fromkeys([path, path.with_suffix(f".{figure_format}")]):
            _write_figure(target, fig)
            written.append(target)
    written += write_tables(results.path)  # cells.csv and curves.csv: the data behind the report, to load
    return written


def print_report(report: Report, console: Console) -> None:
    """The side-by-side table, the verdict (green when reproduced, red when not, yellow when undecided) and the missing cells."""
    header, lines = _table(report.rows)
    table = Table(title=f"{escape(report.name)}: final errors in % (mean ± std over finished seeds)")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for line in lines:
        table.add_row(*line)
    console.print(table)
    if (paper := _paper_note(report.rows)) is not None:
        console.print(f"[dim]{escape(paper)}[/]")
    verdict = report.verdict
    style = {True: "bold green", False: "bold red", None: "bold yellow"}[verdict["reproduced"]]
    console.print(f"[{style}]{escape(verdict_headline(verdict))}[/]")
    for line in _verdict_lines(verdict):
        console.print(f"  {escape(line)}")
    console.print(f"  [dim]{escape(verdict['rule'])}[/]")
    if report.missing:
        count = len(report.missing)
        console.print(f"[bold]Missing[/] ({count} cell{'s' if count > 1 else ''}, not in the means):")
        for entry in report.missing:
            console.print(f"  {escape(_missing_line(entry))}")
    for row in report.ablations:
        console.print(f"ablation {ARCH_LABELS.get(row['arch'], row['arch'])} [{escape(row['variant'])}]: {escape(row['reading'])}")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for entry in report.ran:
        console.print(f"[dim]ran: {escape(_ran_line(entry))}[/]")
    if (origin := provenance_line(report.provenance)) is not None:
        console.print(f"[dim]provenance: {escape(origin)}[/]")
