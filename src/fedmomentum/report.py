"""What a person reads: per-round lines, run summaries, comparison tables and PNG curves."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def round_line(record: dict) -> str:
    parts = [f"round {record['round']:>3}", f"train_loss {record['train_loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "accuracy" in record:
        parts.append(f"accuracy {record['accuracy']:.3f}")
    if "personal_eval_loss" in record:
        parts.append(f"personal {record['personal_eval_loss']:.4f}")
    if record.get("noise_norm") is not None:
        parts.append(f"noise {record['noise_norm']:.3g}")
    seconds = f"{record['round_seconds']:.1f}s"  # the whole round: training, aggregation and any evaluation
    if "eval_seconds" in record:
        seconds += f" (eval {record['eval_seconds']:.1f}s)"
    parts += [f"residual_rank {record.get('residual_rank', 0)}", seconds]
    return " | ".join(parts)


def rounds_to_target(rows: list[dict], target: float | None) -> int | None:
    if target is None:
        return None
    return next((row["round"] for row in rows if row.get("eval_loss", float("inf")) <= target), None)


def summarize(rows: list[dict], config, seconds: float, peak_rss_mb: float, target_loss: float | None = None) -> dict:
    """Final and best eval loss, accuracy, communication and cost of a run."""
    evaluated = [row for row in rows if "eval_loss" in row]
    scored = [row for row in rows if "accuracy" in row]
    trained = [row for row in rows if row["round"] > 0]
    personal = [row for row in evaluated if "personal_eval_loss" in row]
    return {
        "method": config.method,
        "rounds": len(trained),
        "initial_eval_loss": evaluated[0]["eval_loss"] if evaluated and evaluated[0]["round"] == 0 else None,
        "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
        "best_eval_loss": min(row["eval_loss"] for row in evaluated) if evaluated else None,
        "final_accuracy": scored[-1]["accuracy"] if scored else None,
        "best_accuracy": max(row["accuracy"] for row in scored) if scored else None,
        "rounds_to_target": rounds_to_target(rows, target_loss),
        "target_loss": target_loss,
        "uplink_bytes": sum(row["uplink_bytes"] * row["clients"] for row in trained),
        "downlink_bytes": sum(row["downlink_bytes"] * row["clients"] for row in trained),
        "aggregation_seconds": sum(row["aggregation_seconds"] for row in trained),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        **({"final_personal_eval_loss": personal[-1]["personal_eval_loss"]} if personal else {}),
    }


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def compare_table(summaries: list[dict]) -> str:
    """A Markdown table, one row per method."""
    header = ("| method | final eval loss | best eval loss | accuracy | rounds to target | "
              "uplink MB | downlink MB | time s |")
    lines = [header, "|" + "---|" * 8]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {_fmt(s['final_eval_loss'])} | {_fmt(s['best_eval_loss'])} | "
            f"{_fmt(s['final_accuracy'], '.3f')} | {_fmt(s['rounds_to_target'], 'd')} | "
            f"{s['uplink_bytes'] / 1e6:.2f} | {s['downlink_bytes'] / 1e6:.2f} | {s['seconds']:.0f} |")
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------------------------

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


# --- study tables ---------------------------------------------------------------------------------------------------

def _pm(stat, spec: str = ".4f", scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    return format(stat.mean * scale, spec) + (f" ± {stat.std * scale:{spec}}" if stat.n > 1 else "")


def _ci(stat, spec: str = "+.4f") -> str:
    if stat is None:
        return "-"
    if stat.half is None:
        return format(stat.mean, spec)
    return f"{stat.mean:{spec}} [{stat.low:{spec}}, {stat.high:{spec}}]"


def _reading(stat, lower_is_better: bool) -> str:
    if stat is None:
        return "-"
    if stat.half is None:
        return "one seed: no interval"
    if stat.low > 0:
        return "higher (worse)" if lower_is_better else "higher (better)"
    if stat.high < 0:
        return "lower (better)" if lower_is_better else "lower (worse)"
    return "no clear difference"


CSV_STATS = ("final_eval_loss", "best_eval_loss", "final_accuracy", "rounds_to_target", "uplink_per_round",
             "downlink_per_round", "uplink_bytes", "downlink_bytes", "seconds")


def write_study_csv(summaries: list, path: str | Path) -> Path:
    """One row per cell: seeds, failures, mean and std of each metric, the paired difference to the baseline."""
    rows = []
    for s in summaries:
        row = {"cell": s.cell.label, "seeds": len(s.per_seed), "failed": len(s.failed),
               "reached_target": s.reached_target}
        for metric in CSV_STATS:
            stat = s.stats[metric]
            row[f"{metric}_mean"] = stat.mean if stat else None
            row[f"{metric}_std"] = stat.std if stat else None
        for metric, (_, stat) in s.paired.items():
            row[f"delta_{metric}_mean"] = stat.mean if stat else None
            row[f"delta_{metric}_ci95"] = stat.half if stat else None
        rows.append(row)
    return _write_csv(rows, path)


def write_runs_csv(summaries: list, path: str | Path) -> Path:
    """One row per finished run (cell, seed and its numbers)."""
    rows = [{"cell": s.cell.label, "seed": seed, **metrics} for s in summaries for seed, metrics in s.per_seed.items()]
    return _write_csv(rows, path)


def _write_csv(rows: list[dict], path: str | Path) -> Path:
    with Path(path).open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def study_markdown(study, summaries: list, plots: list[str], wall_seconds: float | None = None) -> str:
    """The study as Markdown: setup, one row per cell (mean ± std over seeds), paired differences to the
    baseline per seed with a 95 % t interval, failures, and the plots."""
    baseline = study.baseline.label
    base_summary = next(s for s in summaries if s.cell.label == baseline)
    base_down = base_summary.stats["downlink_per_round"]
    seeds = study.seeds
    lines = [f"# Study: {study.name}", "",
             f"From `{study.path.name}`: {len(study.cells)} cells × {len(seeds)} seeds "
             f"({', '.join(map(str, seeds))}); baseline `{baseline}`."
             + (f" Target eval loss {study.target_loss}." if study.target_loss else ""), "",
             "Shared settings (`[base]`): "
             + (", ".join(f"`{k} = {v}`" for k, v in study.base.items()) or "defaults") + ".", ""]
    run_seconds = [v["seconds"] for s in summaries for v in s.per_seed.values() if v["seconds"] is not None]
    if run_seconds:
        lines += [f"Time: {sum(run_seconds) / 60:.1f} min of runs in all ({sum(run_seconds) / len(run_seconds):.0f} s "
                  f"per run on average)" + (f"; {wall_seconds / 60:.1f} min wall for this call" if wall_seconds else "")
                  + ".", ""]
    lines += ["## Cells (mean ± std over seeds)", "",
              "| cell | seeds | final eval loss | best eval loss | accuracy | rounds to target | uplink MB/round | "
              "downlink MB/round | downlink × baseline | s per run |", "|" + "---|" * 10]
    for s in summaries:
        down = s.stats["downlink_per_round"]
        ratio = f"{down.mean / base_down.mean:.2f}" if down and base_down and base_down.mean else "-"
        reached = (f"{_pm(s.stats['rounds_to_target'], '.1f')} ({s.reached_target}/{len(s.per_seed)})"
                   if study.target_loss is not None else "-")
        lines.append(f"| {s.cell.label} | {len(s.per_seed)}{f' ({len(s.failed)} failed)' if s.failed else ''} | "
                     f"{_pm(s.stats['final_eval_loss'])} | {_pm(s.stats['best_eval_loss'])} | "
                     f"{_pm(s.stats['final_accuracy'], '.3f')} | {reached} | "
                     f"{_pm(s.stats['uplink_per_round'], '.2f', 1e-6)} | {_pm(down, '.2f', 1e-6)} | {ratio} | "
                     f"{_pm(s.stats['seconds'], '.0f')} |")
    for metric, title, lower in (("final_eval_loss", "final eval loss", True),
                                 ("best_eval_loss", "best eval loss", True),
                                 ("final_accuracy", "final accuracy", False)):
        lines += ["", f"## Paired differences in {title}: cell − `{baseline}`, same seed", "",
                  "| cell | " + " | ".join(f"seed {k}" for k in seeds) + " | mean [95% interval] | reading |",
                  "|" + "---|" * (len(seeds) + 3)]
        for s in summaries:
            if s.cell.label == baseline:
                continue
            diffs, stat = s.paired[metric]
            per_seed = " | ".join(f"{diffs[k]:+.4f}" if k in diffs else "-" for k in seeds)
            lines.append(f"| {s.cell.label} | {per_seed} | {_ci(stat)} | {_reading(stat, lower)} |")
    lines += ["", "Intervals are t intervals over seeds (n − 1 degrees of freedom) of the paired differences; "
              "'no clear difference' means the interval contains 0."]
    failures = [(s.cell.label, seed, error) for s in summaries for seed, error in s.failed.items()]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {label} seed {seed}: {error}" for label, seed, error in failures]
    missing = [f"{s.cell.label} seed {seed}" for s in summaries for seed in seeds
               if seed not in s.per_seed and seed not in s.failed]
    if missing:
        lines += ["", f"Not finished yet (running in another process): {', '.join(missing)}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
