"""A study's tables: ``study.csv`` (a row per cell), ``runs.csv`` (a row per run) and ``study.md``, from the cells'
summaries (``summary.CellSummary``)."""

from __future__ import annotations

import csv
from pathlib import Path

# the once-measured numbers per run (``summary.run_metrics``), in study.csv as mean and std over seeds
CSV_STATS = ("final_eval_loss", "mean_eval_loss", "best_eval_loss", "final_accuracy", "rounds_to_target",
             "bytes_to_target", "uplink_per_round", "downlink_per_round", "uplink_bytes", "downlink_bytes", "seconds",
             "mean_update_alignment", "mean_subspace_overlap", "final_path_efficiency", "mean_noise_share")
# the momentum columns of study.md: run metric → title
MOMENTUM = {"mean_update_alignment": "update alignment", "mean_subspace_overlap": "subspace overlap",
            "final_path_efficiency": "path efficiency (last round)", "mean_noise_share": "noise share"}
# the paired comparisons of study.md: run metric → (title, lower is better)
PAIRED = {"final_eval_loss": ("final eval loss", True), "mean_eval_loss": ("mean eval loss over rounds", True),
          "best_eval_loss": ("best eval loss", True), "final_accuracy": ("final accuracy", False)}


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


def _detectable(stat) -> str:
    value = None if stat is None else stat.detectable
    return "-" if value is None else f"{value:.4f}"


def _several_baselines(summaries: list) -> bool:
    """Whether the cells are compared with more than one baseline (one per group of cells)."""
    return len({s.baseline.label for s in summaries}) > 1


def write_study_csv(summaries: list, path: str | Path) -> Path:
    """One row per cell: seeds, failures, mean and std of each metric, the paired difference to its baseline (mean,
    95 % interval's half width, the smallest difference detectable at 80 % power); the baseline named in a column
    of its own where there are several."""
    rows, several = [], _several_baselines(summaries)
    for s in summaries:
        row = {"cell": s.cell.label, **({"baseline": s.baseline.label} if several else {}),
               "seeds": len(s.per_seed), "failed": len(s.failed), "reached_target": s.reached_target}
        for metric in CSV_STATS:
            stat = s.stats[metric]
            row[f"{metric}_mean"] = stat.mean if stat else None
            row[f"{metric}_std"] = stat.std if stat else None
        for metric, (_, stat) in s.paired.items():
            row[f"delta_{metric}_mean"] = stat.mean if stat else None
            row[f"delta_{metric}_ci95"] = stat.half if stat else None
            row[f"delta_{metric}_detectable80"] = stat.detectable if stat else None
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


def study_markdown(study, summaries: list, plots: list[str]) -> str:
    """The study as Markdown: setup; one row per cell (mean ± std over seeds); the momentum measures (mean and 95 %
    interval over seeds) where the runs recorded them; per compared metric, the paired differences to each cell's
    baseline per seed with a 95 % t interval and the smallest difference detectable at 80 % power; failures; the plots.
    Everything in it is computed from the runs' files, so it can be recomputed from them."""
    stats = {s.cell.label: s.stats for s in summaries}
    several = _several_baselines(summaries)
    baselines = ", ".join(f"`{c.label}`" for c in study.baseline_cells())
    seeds = study.all_seeds()
    grid = (f"{len(study.cells)} cells × {len(seeds)} seeds ({', '.join(map(str, seeds))})"
            if all(c.seeds is None for c in study.cells) else
            f"{len(study.cells)} cells, {len(study.runs())} runs: seeds {', '.join(map(str, study.seeds))}, or the "
            "cell's own (its row's seed count)")
    lines = [f"# Study: {study.name}", "",
             f"From `{study.path.name}`: {grid}; "
             + (f"baselines {baselines}: each cell is compared with the one that shares its other settings (the "
                "`baseline` column below)."
                if several else f"baseline {baselines}.")
             + (f" Target eval loss {study.target_loss}." if study.target_loss else ""), "",
             "Shared settings (`[base]`): "
             + (", ".join(f"`{k} = {v}`" for k, v in study.base.items()) or "defaults") + ".", ""]
    run_seconds = [v["seconds"] for s in summaries for v in s.per_seed.values() if v["seconds"] is not None]
    if run_seconds:
        lines += [f"Time: {sum(run_seconds) / 60:.1f} min of runs in all ({sum(run_seconds) / len(run_seconds):.0f} s "
                  "per run on average).", ""]
    lines += ["## Cells (mean ± std over seeds)", "",
              "| cell | seeds | final eval loss | mean eval loss | best eval loss | accuracy | rounds to target | "
              "MB to target | uplink MB/round | downlink MB/round | downlink × baseline | s per run |",
              "|" + "---|" * 12]
    for s in summaries:
        down, base_down = s.stats["downlink_per_round"], stats[s.baseline.label]["downlink_per_round"]
        ratio = f"{down.mean / base_down.mean:.2f}" if down and base_down and base_down.mean else "-"
        reached = f" ({s.reached_target}/{len(s.per_seed)})"
        to_target = ((f"{_pm(s.stats['rounds_to_target'], '.1f')}{reached}", _pm(s.stats["bytes_to_target"], ".2f",
                                                                                  1e-6))
                     if study.target_loss is not None else ("-", "-"))
        lines.append(f"| {s.cell.label} | {len(s.per_seed)}{f' ({len(s.failed)} failed)' if s.failed else ''} | "
                     f"{_pm(s.stats['final_eval_loss'])} | {_pm(s.stats['mean_eval_loss'])} | "
                     f"{_pm(s.stats['best_eval_loss'])} | {_pm(s.stats['final_accuracy'], '.3f')} | "
                     f"{to_target[0]} | {to_target[1]} | "
                     f"{_pm(s.stats['uplink_per_round'], '.2f', 1e-6)} | {_pm(down, '.2f', 1e-6)} | {ratio} | "
                     f"{_pm(s.stats['seconds'], '.0f')} |")
    lines += ["", "Mean eval loss: over the evaluated rounds after round 0. Rounds and MB to target: over the seeds "
              "that reached it (how many, in brackets); MB: uplink + downlink per client up to that round."]
    if any(s.stats[metric] is not None for s in summaries for metric in MOMENTUM):
        lines += ["", "## Momentum (per run: mean over rounds; mean [95% interval] over seeds)", "",
                  "| cell | " + " | ".join(MOMENTUM.values()) + " |", "|" + "---|" * (len(MOMENTUM) + 1)]
        lines += [f"| {s.cell.label} | " + " | ".join(_ci(s.stats[metric], ".3f") for metric in MOMENTUM) + " |"
                  for s in summaries]
        lines += ["", "Update alignment: cosine between consecutive rounds' changes of the effective weights; "
                  "subspace overlap: mean cos² of the principal angles between the adapter's column spaces before "
                  "and after a round; path efficiency: ‖W_T − W_0‖ / Σ‖ΔW_t‖; noise share: "
                  "‖Σp_iB_iA_i − B̄Ā‖ / ‖Σp_iB_iA_i‖ (see docs/studies.md)."]
    for metric, (title, lower) in PAIRED.items():
        lines += ["", f"## Paired differences in {title}: cell − {study.compared_with('`')}, same seed", "",
                  "| cell | " + ("baseline | " if several else "") + " | ".join(f"seed {k}" for k in seeds)
                  + " | mean [95% interval] | reading | detectable at 80% power |",
                  "|" + "---|" * (len(seeds) + 4 + int(several))]
        for s in summaries:
            if s.cell.label == s.baseline.label:
                continue
            diffs, stat = s.paired[metric]
            per_seed = " | ".join(f"{diffs[k]:+.4f}" if k in diffs else "-" for k in seeds)
            named = f"{s.baseline.label} | " if several else ""
            lines.append(f"| {s.cell.label} | {named}{per_seed} | {_ci(stat)} | {_reading(stat, lower)} | "
                         f"{_detectable(stat)} |")
    lines += ["", "Intervals are t intervals over seeds (n − 1 degrees of freedom) of the paired differences; "
              "'no clear difference' means the interval contains 0. 'Detectable at 80% power': the smallest true "
              "difference that a two-sided paired t test at α = 0.05 over these seeds finds 80% of the time, "
              "given the paired differences' standard deviation; a smaller one can go unseen."]
    failures = [(s.cell.label, seed, error) for s in summaries for seed, error in s.failed.items()]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {label} seed {seed}: {error}" for label, seed, error in failures]
    missing = [f"{s.cell.label} seed {seed}" for s in summaries for seed in study.seeds_of(s.cell)
               if seed not in s.per_seed and seed not in s.failed]
    if missing:
        lines += ["", f"Not finished yet (still running, or stopped part way): {', '.join(missing)}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
