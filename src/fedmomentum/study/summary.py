"""Summarising a study: per-cell statistics over seeds, paired differences to the baseline with 95 % t intervals and
the smallest difference detectable at 80 % power, the curves, and the files (``study.csv``, ``runs.csv``,
``study.md``, plots), from the runs' results or read back from their files alone (``read_back``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .. import outcomes, plots
from ..records import read_metrics
from . import tables
from .runner import RunResult, run_folder, state
from .spec import Cell, Study

METRICS = tables.CSV_STATS
PAIRED = tuple(tables.PAIRED)
ALPHA, POWER = 0.05, 0.8  # the paired t test the detectable differences are for: two-sided, α = 0.05, 80 % power


@dataclass
class Interval:
    """Mean, standard deviation and the half width of a 95 % t interval of ``n`` values (none for ``n < 2``)."""

    mean: float
    std: float
    half: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half or 0.0)

    @property
    def detectable(self) -> float | None:
        """The smallest true mean that a two-sided t test of these ``n`` values (paired differences) at α = 0.05
        finds with 80 % power, at their standard deviation (``detectable_difference``)."""
        return detectable_difference(self.std, self.n)


def interval(values: list[float]) -> Interval | None:
    """``Interval`` of the finite values (``None`` when there are none)."""
    from scipy import stats

    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else None
    return Interval(mean, std, half, n)


def detectable_difference(std: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true mean difference ``δ`` that a two-sided one-sample (paired) t test of ``n`` differences with
    standard deviation ``std`` rejects at level ``alpha`` with probability ``power``: the noncentrality
    ``λ = δ√n / std`` solves ``P(|T| > t_{1−α/2, n−1}) = power`` for ``T`` noncentral t with ``n − 1`` degrees of
    freedom. None for ``n < 2`` (no std); 0 for ``std = 0``."""
    from scipy import optimize, stats

    if n < 2 or not math.isfinite(std):
        return None
    if std == 0:
        return 0.0
    df = n - 1
    critical = float(stats.t.ppf(1 - alpha / 2, df))

    def missing(noncentrality: float) -> float:  # P(T < −c) as P(T' > c) of −λ: scipy's nct.cdf there is NaN for
        # large λ at df = 1
        return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality)) - power

    high = 2 * critical + 4.0  # the power rises with λ from α at 0; double until it passes ``power``
    while missing(high) < 0:
        high *= 2
    return optimize.brentq(missing, 0.0, high, xtol=1e-12, rtol=1e-12) * std / math.sqrt(n)


def run_metrics(result: RunResult, target_loss: float | None) -> dict:
    """The once-measured numbers of a finished run (bytes per round and to target are per client), with its
    momentum numbers (``outcomes.momentum``: None for runs recorded without them)."""
    trained = [row for row in result.rows if row["round"] > 0]
    per_round = {k: sum(row[k] for row in trained) / len(trained) if trained else None
                 for k in ("uplink_bytes", "downlink_bytes")}
    return {
        **{k: result.summary.get(k) for k in ("final_eval_loss", "best_eval_loss", "final_accuracy",
                                               "uplink_bytes", "downlink_bytes", "seconds")},
        "mean_eval_loss": outcomes.mean_eval_loss(result.rows),
        "rounds_to_target": outcomes.rounds_to_target(result.rows, target_loss),
        "bytes_to_target": outcomes.bytes_to_target(result.rows, target_loss),
        "uplink_per_round": per_round["uplink_bytes"],
        "downlink_per_round": per_round["downlink_bytes"],
        **outcomes.momentum(result.rows),
    }


@dataclass
class CellSummary:
    """A cell over its seeds: per-seed metrics, their intervals, the paired differences to its baseline."""

    cell: Cell
    baseline: Cell  # the cell it is compared with (itself for a baseline cell)
    per_seed: dict[int, dict]  # seed → run_metrics
    failed: dict[int, str]  # seed → error
    stats: dict[str, Interval | None]
    paired: dict[str, tuple[dict[int, float], Interval | None]]  # metric → (seed → cell − baseline, interval)
    reached_target: int  # seeds that reached target_loss


def _paired(mine: dict[int, dict], base: dict[int, dict], metric: str) -> tuple[dict[int, float], Interval | None]:
    diffs = {seed: mine[seed][metric] - base[seed][metric] for seed in mine
             if seed in base and mine[seed][metric] is not None and base[seed][metric] is not None}
    return diffs, interval(list(diffs.values()))


def summarize(study: Study, results: list[RunResult]) -> list[CellSummary]:
    """One ``CellSummary`` per cell, in the study's order, each compared with its own baseline."""
    by_cell: dict[str, dict[int, dict]] = {c.label: {} for c in study.cells}
    failed: dict[str, dict[int, str]] = {c.label: {} for c in study.cells}
    for r in results:
        if r.error is None:
            by_cell[r.cell.label][r.seed] = run_metrics(r, study.target_loss)
        else:
            failed[r.cell.label][r.seed] = r.error
    summaries = []
    for cell in study.cells:
        mine, baseline = by_cell[cell.label], study.baseline_of(cell)
        stats = {m: interval([v[m] for v in mine.values()]) for m in METRICS}
        paired = {m: _paired(mine, by_cell[baseline.label], m) for m in PAIRED}
        reached = sum(v["rounds_to_target"] is not None for v in mine.values())
        summaries.append(CellSummary(cell, baseline, mine, failed[cell.label], stats, paired, reached))
    return summaries


@dataclass
class Band:
    """A curve over seeds: x, the mean, and a band (``low``..``high``) around it."""

    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def _eval_losses(result: RunResult) -> dict[int, float]:
    return {row["round"]: row["eval_loss"] for row in result.rows if "eval_loss" in row}


def curves(study: Study, results: list[RunResult]) -> tuple[dict[str, Band], dict[str, Band], dict[str, Band]]:
    """Per cell: eval loss per round (mean, min–max band over seeds); the paired gap to its baseline per round
    (mean, 95 % interval); eval loss against cumulative downlink MB per client (mean over seeds)."""
    done = [r for r in results if r.error is None]
    losses, gaps, frontier = {}, {}, {}
    for cell in study.cells:
        runs = [r for r in done if r.cell.label == cell.label]
        if not runs:
            continue
        base = {r.seed: _eval_losses(r) for r in done if r.cell.label == study.baseline_of(cell).label}
        per_seed = {r.seed: _eval_losses(r) for r in runs}
        rounds = sorted(set.intersection(*(set(v) for v in per_seed.values())))
        values = [[per_seed[s][t] for s in per_seed] for t in rounds]
        losses[cell.label] = Band(rounds, [sum(v) / len(v) for v in values], [min(v) for v in values],
                                  [max(v) for v in values])
        gap_rounds, gap_stats = [], []
        for t in rounds:
            diffs = [per_seed[s][t] - base[s][t] for s in per_seed if s in base and t in base[s]]
            if diffs:
                gap_rounds.append(t)
                gap_stats.append(interval(diffs))
        if gap_rounds:
            gaps[cell.label] = Band(gap_rounds, [g.mean for g in gap_stats], [g.low for g in gap_stats],
                                    [g.high for g in gap_stats])
        sent = {}
        for r in runs:
            total = 0.0
            sent[r.seed] = {0: 0.0}
            for row in sorted(r.rows, key=lambda row: row["round"]):
                if row["round"] > 0:
                    total += row["downlink_bytes"] / 1e6
                    sent[r.seed][row["round"]] = total
        mb = [sum(sent[s].get(t, math.nan) for s in per_seed) / len(per_seed) for t in rounds]
        frontier[cell.label] = Band(mb, losses[cell.label].mean, losses[cell.label].low, losses[cell.label].high)
    return losses, gaps, frontier


# the baseline's momentum measures the paired gap is set against (``gap_vs_momentum.png``): run metric → title
GAP_AGAINST = {"mean_noise_share": tables.MOMENTUM["mean_noise_share"],
               "mean_update_alignment": tables.MOMENTUM["mean_update_alignment"]}


def gap_vs_momentum(summaries: list[CellSummary]) -> dict[str, list[plots.Point]]:
    """Per measure of ``GAP_AGAINST`` (its title), a point per non-baseline cell: x = its baseline's mean of the
    measure over seeds, y = the paired mean eval loss difference to that baseline (95 % interval). Does the gap
    FedMomentum closes grow with the noise of averaging factors, or with how consistently the baseline moved?"""
    stats = {s.cell.label: s.stats for s in summaries}
    points: dict[str, list[plots.Point]] = {title: [] for title in GAP_AGAINST.values()}
    for s in summaries:
        gap = s.paired["mean_eval_loss"][1]
        if s.baseline.label == s.cell.label or gap is None:
            continue
        for metric, title in GAP_AGAINST.items():
            x = stats[s.baseline.label][metric]
            if x is not None:
                points[title].append(plots.Point(s.cell.label, x.mean, gap.mean, gap.half))
    return points


def write(study: Study, results: list[RunResult], out: str | Path, draw: bool = True) -> list[Path]:
    """``study.csv``, ``runs.csv``, ``study.md`` and (``draw``) the plots in ``out``; returns their paths."""
    out = Path(out)
    summaries = summarize(study, results)
    written = [tables.write_study_csv(summaries, out / "study.csv"),
               tables.write_runs_csv(summaries, out / "runs.csv")]
    losses, gaps, frontier = curves(study, results)
    versus, points = study.compared_with(), gap_vs_momentum(summaries)
    figures = {"loss_vs_rounds.png": lambda p: plots.plot_study_rounds(losses, gaps, versus, p),
               "loss_vs_bytes.png": lambda p: plots.plot_study_bytes(frontier, p),
               "final.png": lambda p: plots.plot_study_final(summaries, versus, p)}
    if len(study.baseline_cells()) > 1 and any(points.values()):  # with one baseline every point has one x
        figures["gap_vs_momentum.png"] = lambda p: plots.plot_gap_vs_momentum(
            points, [s.cell.label for s in summaries], versus, p)
    if draw and any(losses.values()):
        for name, figure in figures.items():
            figure(out / name)
            written.append(out / name)
    text = tables.study_markdown(study, summaries, [p.name for p in written if p.suffix == ".png"])
    (out / "study.md").write_text(text, encoding="utf-8")
    written.insert(1, out / "study.md")
    return written


def read_back(study: Study, out: str | Path) -> list[RunResult]:
    """The finished runs of ``study`` in ``out`` from their files alone (``summary.json`` of all their rounds and
    ``metrics.jsonl``), nothing trained: what recomputing a committed study's tables needs. A folder holding a run
    of other settings is an error (``runner.state``), and so is a number of the wrong type; an unfinished run is left
    out."""
    results = []
    for cell, seed in study.runs():
        folder = run_folder(Path(out), cell, seed)
        if state(folder, study.config(cell, seed, folder)) != "done":
            continue
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        rows = read_metrics(folder)
        _check_numbers(folder / "summary.json", [summary], SUMMARY_NUMBERS)
        _check_numbers(folder / "metrics.jsonl", rows, ROW_NUMBERS)
        if any(row.get(key) is None for row in rows if row["round"] > 0 for key in ("uplink_bytes",
                                                                                    "downlink_bytes")):
            raise ValueError(f"{folder / 'metrics.jsonl'}: a trained round without its uplink or downlink bytes")
        results.append(RunResult(cell, seed, folder, summary, rows))
    return results


SUMMARY_NUMBERS = ("final_eval_loss", "best_eval_loss", "final_accuracy", "uplink_bytes", "downlink_bytes", "seconds")
ROW_NUMBERS = ("eval_loss", "uplink_bytes", "downlink_bytes", *outcomes.MOMENTUM)


def _check_numbers(path: Path, records: list, keys: tuple[str, ...]) -> None:
    """Every record a JSON object whose ``keys``, where present, are null or finite numbers."""
    for record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}: not a run's record (a JSON object)")
        for key in keys:
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise ValueError(f"{path}: {key} must be a finite number or null, got {value!r}")
