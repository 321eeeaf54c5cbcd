"""Every PNG a person reads: one run's curves, a comparison of runs, and a study's curves and bars (given the study's
bands and summaries). One panel per question, bars for once-measured numbers, a gap view for close curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _colors(labels) -> dict[str, tuple]:
    """The same colour for a label in every panel."""
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _band_panel(axis, bands: dict, colors: dict, *, marker: str = "o") -> None:
    """One line per label (``bands[label]`` has ``x``, ``mean``, ``low``, ``high``) with a shaded band."""
    for label, band in bands.items():
        axis.plot(band.x, band.mean, marker=marker, markersize=3, color=colors[label], label=label)
        if any(lo != hi for lo, hi in zip(band.low, band.high, strict=True)):
            axis.fill_between(band.x, band.low, band.high, color=colors[label], alpha=0.15, linewidth=0)


def _bar_panel(axis, labels: list[str], means: list[float | None], errors: list[float | None], colors: dict,
               title: str, zero_line: bool = False) -> None:
    """A bar per label with error bars (``None`` values are left out, labelled ``n/a``)."""
    positions = range(len(labels))
    heights = [m if m is not None else 0.0 for m in means]
    yerr = [e if e is not None else 0.0 for e in errors]
    axis.bar(positions, heights, yerr=yerr, capsize=3, color=[colors[label] for label in labels])
    for x, m in zip(positions, means, strict=True):
        if m is None:
            axis.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7)
    axis.set_xticks(list(positions), labels, rotation=35, ha="right", fontsize=8)
    axis.set_title(title, fontsize=10)
    if zero_line:
        axis.axhline(0, color="black", linewidth=0.8)
    else:
        axis.set_ylim(bottom=0, top=max(axis.get_ylim()[1], 1e-3))
    axis.grid(axis="y", alpha=0.3)


def _finish(figure, path: str | Path) -> None:
    for axis in figure.axes:
        if axis.get_xlabel() == "round":
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@dataclass
class Line:
    """A single curve drawn like a study's band (no band): one seed."""

    x: list[float]
    mean: list[float]

    @property
    def low(self) -> list[float]:
        return self.mean

    @property
    def high(self) -> list[float]:
        return self.mean


def _loss_line(rows: list[dict]) -> Line:
    points = [(row["round"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    return Line([p[0] for p in points], [p[1] for p in points])


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> None:
    """One run: eval loss against rounds (and accuracy, where it was measured at two rounds or more)."""
    scored = [(row["round"], row["accuracy"]) for row in rows if "accuracy" in row]
    label = title or "run"
    colors = _colors([label])
    figure, axes = plt.subplots(1, 2 if len(scored) > 1 else 1, figsize=(11 if len(scored) > 1 else 6, 4),
                                squeeze=False)
    _band_panel(axes[0][0], {label: _loss_line(rows)}, colors)
    final = f" (final accuracy {scored[-1][1]:.3f})" if len(scored) == 1 else ""
    axes[0][0].set(xlabel="round", ylabel="held-out loss", title=f"{label}: eval loss{final}")
    axes[0][0].grid(alpha=0.3)
    if len(scored) > 1:
        axes[0][1].plot(*zip(*scored, strict=True), marker="o", color=colors[label])
        axes[0][1].set(xlabel="round", ylabel="exact match", title="accuracy")
        axes[0][1].grid(alpha=0.3)
    _finish(figure, path)


def plot_compare(runs: dict[str, list[dict]], path: str | Path, baseline: str | None = None) -> None:
    """Several runs (one seed each): eval loss against rounds, its gap to ``baseline`` (default: the first run)
    per round, where close curves can be told apart, and the final accuracy as bars."""
    labels = list(runs)
    baseline = baseline or labels[0]
    colors = _colors(labels)
    lines = {label: _loss_line(rows) for label, rows in runs.items()}
    reference = dict(zip(lines[baseline].x, lines[baseline].mean, strict=True))
    gaps = {}
    for label, line in lines.items():
        points = [(x, y - reference[x]) for x, y in zip(line.x, line.mean, strict=True) if x in reference]
        gaps[label] = Line([p[0] for p in points], [p[1] for p in points])
    accuracy = [next((row["accuracy"] for row in reversed(rows) if "accuracy" in row), None) for rows in runs.values()]
    panels = 3 if any(a is not None for a in accuracy) else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    _band_panel(axes[0], lines, colors)
    axes[0].set(xlabel="round", ylabel="held-out loss", title="eval loss")
    _band_panel(axes[1], gaps, colors)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set(xlabel="round", ylabel=f"eval loss − {baseline}", title=f"gap to {baseline} (below 0: lower loss)")
    for axis in axes[:2]:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if panels == 3:
        _bar_panel(axes[2], labels, accuracy, [None] * len(labels), colors, "final exact-match accuracy")
    _finish(figure, path)


def plot_study_rounds(losses: dict, gaps: dict, baseline: str, path: str | Path) -> None:
    """Eval loss against rounds (mean, min–max band over seeds) and the paired gap to the baseline per round
    (mean, 95 % t interval over seeds)."""
    colors = _colors(list(losses))
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    _band_panel(axes[0], losses, colors)
    axes[0].set(xlabel="round", ylabel="held-out loss", title="eval loss (mean over seeds, band: min–max)")
    _band_panel(axes[1], gaps, colors)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set(xlabel="round", ylabel=f"eval loss − {baseline} (same seed)",
                title=f"gap to {baseline} per round (mean, band: 95% interval)")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _finish(figure, path)


def plot_study_bytes(frontier: dict, path: str | Path) -> None:
    """Eval loss against the cumulative downlink per client: the communication–quality frontier."""
    colors = _colors(list(frontier))
    figure, axis = plt.subplots(figsize=(7, 5))
    _band_panel(axis, frontier, colors)
    axis.set_xscale("symlog", linthresh=1.0)
    axis.set(xlabel="cumulative downlink per client, MB (symlog)", ylabel="held-out loss",
             title="eval loss against bytes sent to a client (mean over seeds, band: min–max)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _finish(figure, path)


def plot_study_final(summaries: list, baseline: str, path: str | Path) -> None:
    """Once-measured numbers as bars: the final eval loss's paired difference to the baseline, the final
    accuracy (error bars: 95 % t intervals over seeds) and the downlink per round."""
    labels = [s.cell.label for s in summaries]
    colors = _colors(labels)
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    deltas = [s.paired["final_eval_loss"][1] for s in summaries]
    _bar_panel(axes[0], labels, [d.mean if d else None for d in deltas], [d.half if d else None for d in deltas],
               colors, f"final eval loss − {baseline} (same seed; below 0: lower)", zero_line=True)
    accuracy = [s.stats["final_accuracy"] for s in summaries]
    _bar_panel(axes[1], labels, [a.mean if a else None for a in accuracy], [a.half if a else None for a in accuracy],
               colors, "final exact-match accuracy")
    downlink = [s.stats["downlink_per_round"] for s in summaries]
    _bar_panel(axes[2], labels, [d.mean / 1e6 if d else None for d in downlink], [None] * len(labels), colors,
               "downlink per client per round, MB")
    _finish(figure, path)


@dataclass
class Point:
    """A cell in a scatter: its label, x, y and the half width of y's interval (None: no interval)."""

    label: str
    x: float
    y: float
    half: float | None


def plot_gap_vs_momentum(panels: dict[str, list[Point]], labels: list[str], baseline: str,
                         path: str | Path) -> None:
    """A panel per measure of the baseline (its title → the cells' points): x = the cell's baseline's mean of the
    measure, y = the cell's paired mean eval loss difference to that baseline with its 95 % interval; whether the
    gap grows with, say, the baseline's noise share across regimes."""
    colors = _colors(labels)
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for axis, (title, points) in zip(axes[0], panels.items(), strict=True):
        for p in points:
            axis.errorbar(p.x, p.y, yerr=p.half if p.half is not None else None, fmt="o", capsize=3,
                          color=colors[p.label])
            axis.annotate(p.label, (p.x, p.y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        if not points:
            axis.annotate("not measured", (0.5, 0.5), xycoords="axes fraction", ha="center")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.margins(x=0.25)  # room for the labels
        axis.xaxis.set_major_locator(MaxNLocator(5))
        axis.set(xlabel=f"{title} of {baseline} (mean over seeds)",
                 ylabel=f"mean eval loss − {baseline} (same seed)",
                 title=f"gap to {baseline} against its {title} (bars: 95% interval)")
        axis.grid(alpha=0.3)
    _finish(figure, path)
