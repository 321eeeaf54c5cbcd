"""Summarising a study: per-cell statistics over seeds, paired differences to the baseline with 95 % t intervals,
the curves, and the files (``study.csv``, ``runs.csv``, ``study.md``, plots)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .runner import RunResult
from .spec import Cell, Study

METRICS = ("final_eval_loss", "best_eval_loss", "final_accuracy", "rounds_to_target", "uplink_per_round",
           "downlink_per_round", "uplink_bytes", "downlink_bytes", "seconds")
PAIRED = ("final_eval_loss", "best_eval_loss", "final_accuracy")


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


def run_metrics(result: RunResult, target_loss: float | None) -> dict:
    """The once-measured numbers of a finished run (bytes per round are per client)."""
    from ..report import rounds_to_target

    trained = [row for row in result.rows if row["round"] > 0]
    per_round = {k: sum(row[k] for row in trained) / len(trained) if trained else None
                 for k in ("uplink_bytes", "downlink_bytes")}
    return {
        **{k: result.summary.get(k) for k in ("final_eval_loss", "best_eval_loss", "final_accuracy",
                                               "uplink_bytes", "downlink_bytes", "seconds")},
        "rounds_to_target": rounds_to_target(result.rows, target_loss),
        "uplink_per_round": per_round["uplink_bytes"],
        "downlink_per_round": per_round["downlink_bytes"],
    }


@dataclass
class CellSummary:
    """A cell over its seeds: per-seed metrics, their intervals, the paired differences to the baseline."""

    cell: Cell
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
    """One ``CellSummary`` per cell, in the study's order."""
    by_cell: dict[str, dict[int, dict]] = {c.label: {} for c in study.cells}
    failed: dict[str, dict[int, str]] = {c.label: {} for c in study.cells}
    for r in results:
        if r.error is None:
            by_cell[r.cell.label][r.seed] = run_metrics(r, study.target_loss)
        else:
            failed[r.cell.label][r.seed] = r.error
    base = by_cell[study.baseline.label]
    summaries = []
    for cell in study.cells:
        mine = by_cell[cell.label]
        stats = {m: interval([v[m] for v in mine.values()]) for m in METRICS}
        paired = {m: _paired(mine, base, m) for m in PAIRED}
        reached = sum(v["rounds_to_target"] is not None for v in mine.values())
        summaries.append(CellSummary(cell, mine, failed[cell.label], stats, paired, reached))
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
    """Per cell: eval loss per round (mean, min–max band over seeds); the paired gap to the baseline per round
    (mean, 95 % interval); eval loss against cumulative downlink MB per client (mean over seeds)."""
    done = [r for r in results if r.error is None]
    base = {r.seed: _eval_losses(r) for r in done if r.cell.label == study.baseline.label}
    losses, gaps, frontier = {}, {}, {}
    for cell in study.cells:
        runs = [r for r in done if r.cell.label == cell.label]
        if not runs:
            continue
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


def write(study: Study, results: list[RunResult], out: str | Path, wall_seconds: float | None = None) -> list[Path]:
    """``study.csv``, ``runs.csv``, ``study.md`` and the plots in ``out``; returns their paths."""
    from .. import report

    out = Path(out)
    summaries = summarize(study, results)
    written = [report.write_study_csv(summaries, out / "study.csv"),
               report.write_runs_csv(summaries, out / "runs.csv")]
    losses, gaps, frontier = curves(study, results)
    plots = {"loss_vs_rounds.png": lambda p: report.plot_study_rounds(losses, gaps, study.baseline.label, p),
             "loss_vs_bytes.png": lambda p: report.plot_study_bytes(frontier, p),
             "final.png": lambda p: report.plot_study_final(summaries, study.baseline.label, p)}
    if any(losses.values()):
        for name, draw in plots.items():
            draw(out / name)
            written.append(out / name)
    text = report.study_markdown(study, summaries, [p.name for p in written if p.suffix == ".png"], wall_seconds)
    (out / "study.md").write_text(text)
    written.insert(1, out / "study.md")
    return written
