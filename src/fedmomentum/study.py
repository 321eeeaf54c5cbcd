"""``fedmomentum study``: a grid of ordinary runs over cells and seeds, resumable, summarised against a baseline.

A study file (TOML or YAML) holds:

- ``[base]``: RunConfig keys shared by every run;
- ``[grid]``: RunConfig keys mapped to lists, crossed (``seed`` among them; a method option as
  ``method_options.<name> = [...]``, or ``method_options = [{...}, {...}]``, a list of option tables);
- ``[[cell]]`` (optional): tables of RunConfig keys, each one cell (``name`` labels it), crossed with ``[grid]``;
  for cells that differ in more than one key, e.g. FedIT beside FedMomentum variants;
- ``baseline``: the cell the others are compared with, as the values that pick it out (``{method = "fedit"}``)
  or a cell's name; ``target_loss`` (optional): for rounds to that eval loss; ``name`` (optional): a title.

Every cell × seed is a normal run folder ``runs/<cell>/seed-<k>`` made by ``simulation.run``; a finished run is
read back, never redone, and an interrupted one resumes from its checkpoint, so a study can be stopped and continued.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_io
from .config import RunConfig
from .records import read_metrics

TOP_KEYS = ("name", "baseline", "target_loss", "base", "grid", "cell")
OPTIONS = "method_options"


@dataclass
class Cell:
    """One point of the grid (everything but the seed): its label and its values on top of ``[base]``."""

    label: str
    values: dict  # RunConfig keys (method options merged into ``method_options``)

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.label).strip("_") or "base"


@dataclass
class Study:
    """A parsed study file: the runs it asks for and how to compare them."""

    path: Path
    name: str
    base: dict
    cells: list[Cell]
    seeds: list[int]
    baseline: Cell
    target_loss: float | None = None

    def config(self, cell: Cell, seed: int, out: Path | None = None) -> RunConfig:
        """The run config of ``cell`` at ``seed`` (writing to ``out`` when given)."""
        values = config_io.merge(self.base, {**cell.values, "seed": seed})
        if out is not None:
            values["out"] = str(out)
        return config_io.from_dict(values)


@dataclass
class RunResult:
    """A finished (or failed) run of a study: its summary and per-round rows, or the error."""

    cell: Cell
    seed: int
    folder: Path
    summary: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    redone: bool = False  # trained (or resumed) in this call, not read back


class StudyError(ValueError):
    """A study file that cannot be used: the message names the file and the key."""


# --- reading the study file ---------------------------------------------------------------------------------------

def _axes(grid: dict, where: Callable[[str], str]) -> dict[str, list]:
    """The grid's keys and their values; ``method_options.x`` (dotted or nested) becomes a key of its own."""
    axes: dict[str, list] = {}
    for key, values in grid.items():
        if key == OPTIONS and isinstance(values, dict):  # TOML `method_options.x = [...]` nests
            for option, choices in values.items():
                axes[f"{OPTIONS}.{option}"] = choices
        else:
            axes[key] = values
    for key, values in axes.items():
        name = key.split(".", 1)[0]
        if name not in config_io.FIELDS:
            raise StudyError(f"{where(key)}: unknown config key {name!r}")
        if key == "out":
            raise StudyError(f"{where(key)}: a study sets each run's out itself")
        if not isinstance(values, list) or not values:
            raise StudyError(f"{where(key)}: must be a non-empty list of values, got {values!r}")
        if key == OPTIONS and not all(isinstance(v, dict) for v in values):
            raise StudyError(f"{where(key)}: must be a list of option tables")
    return axes


def _cell_values(axes: dict[str, list], choice: tuple) -> dict:
    values: dict = {}
    for key, value in zip(axes, choice, strict=True):
        if key.startswith(OPTIONS + "."):
            values.setdefault(OPTIONS, {})[key.split(".", 1)[1]] = value
        elif key == OPTIONS:
            values[OPTIONS] = {**values.get(OPTIONS, {}), **value}
        else:
            values[key] = value
    return values


def _flat(values: dict) -> dict:
    """``method_options`` spread into ``method_options.<name>`` keys."""
    flat = {k: v for k, v in values.items() if k != OPTIONS}
    flat.update({f"{OPTIONS}.{k}": v for k, v in (values.get(OPTIONS) or {}).items()})
    return flat


def _label(values: dict, varying: set[str]) -> str:
    """The values that tell cells apart: the method bare, the rest as ``key=value`` (options by their own name)."""
    parts = []
    for key, value in _flat(values).items():
        if key not in varying:
            continue
        parts.append(str(value) if key == "method" else f"{key.removeprefix(OPTIONS + '.')}={value}")
    return " ".join(parts)


def load(path: str | Path) -> Study:
    """Read and check a study file; every error names the file and the key."""
    path = Path(path)
    spec = config_io.read(path)
    unknown = [key for key in spec if key not in TOP_KEYS]
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a study has "
                         f"{', '.join(TOP_KEYS)} (RunConfig keys go in [base])")
    base = spec.get("base", {})
    if not isinstance(base, dict):
        raise StudyError(f"{path}: [base] must be a table of RunConfig keys")
    if "out" in base:
        raise StudyError(f"{path}: [base] out: a study sets each run's out itself (use --out for the study)")
    try:
        config_io.from_dict(base)
    except (ValueError, TypeError) as error:
        raise StudyError(f"{path}: [base]: {error}") from None
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        raise StudyError(f"{path}: [grid] must be a table of keys mapped to lists")
    axes = _axes(grid, lambda key: f"{path}: [grid] {key}")
    seeds = axes.pop("seed", [base.get("seed", 0)])
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: [grid] seed: must be distinct integers, got {seeds!r}")

    cells = _cells(spec.get("cell", [{}]), axes, path)
    study = Study(path, str(spec.get("name", path.stem)), base, cells, list(seeds), cells[0],
                  _target(spec.get("target_loss"), path))
    for cell in cells:  # every run must be a valid config: the error names the cell (and the config key)
        try:
            study.config(cell, seeds[0]).validate()
        except (ValueError, TypeError) as error:
            raise StudyError(f"{path}: cell {cell.label!r}: {error}") from None
    study.baseline = _baseline(spec.get("baseline"), study)
    return study


def _cells(tables, axes: dict[str, list], path: Path) -> list[Cell]:
    """Every ``[[cell]]`` table crossed with the grid's axes, labelled by what tells the cells apart."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables) or not tables:
        raise StudyError(f"{path}: cell must be a list of tables ([[cell]] in TOML)")
    drafts = []  # (name, values, grid values) of every cell
    for index, table in enumerate(tables):
        own = {k: v for k, v in table.items() if k != "name"}
        bad = [k for k in own if k not in config_io.FIELDS or k in ("seed", "out")]
        if bad:
            raise StudyError(f"{path}: cell {table.get('name', index + 1)!r}: key {bad[0]!r} is not a RunConfig key "
                             "a cell may set (seed goes in [grid], out is the study's)")
        for choice in itertools.product(*axes.values()):
            chosen = _cell_values(axes, choice)
            drafts.append((table.get("name"), config_io.merge(own, chosen), chosen))
    keys = {key for _, values, _ in drafts for key in _flat(values)}
    varying = {key for key in keys if len({repr(_flat(v).get(key)) for _, v, _ in drafts}) > 1}
    cells = [Cell(" ".join(filter(None, [str(name), _label(chosen, varying)])) if name is not None
                  else _label(values, varying) or "default", values) for name, values, chosen in drafts]
    labels = [c.label for c in cells]
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise StudyError(f"{path}: cells {twice} share a label; give [[cell]] tables distinct names")
    if len({c.folder for c in cells}) != len(cells):
        raise StudyError(f"{path}: two cells would share a run folder; give [[cell]] tables distinct names")
    return cells


def _target(value, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StudyError(f"{path}: target_loss must be a number, got {value!r}")
    return float(value)


def _baseline(spec, study: Study) -> Cell:
    """The cell named by ``spec`` (its label, or values that match exactly one cell); the first cell if none."""
    where = f"{study.path}: baseline"
    if spec is None:
        return study.cells[0]
    if isinstance(spec, str):
        found = [c for c in study.cells if c.label == spec]
    elif isinstance(spec, dict):
        wanted = _axes({k: [v] for k, v in spec.items()}, lambda key: f"{where} {key}")
        resolved = [(c, study.config(c, study.seeds[0]).to_dict()) for c in study.cells]
        found = [c for c, values in resolved
                 if all(_lookup(values, key) == choice[0] for key, choice in wanted.items())]
    else:
        raise StudyError(f"{where}: must be a cell's name or a table of values, got {spec!r}")
    if len(found) != 1:
        raise StudyError(f"{where}: {spec!r} matches {len(found)} cells "
                         f"({', '.join(c.label for c in found) or 'none'}); it must pick out one of: "
                         f"{', '.join(c.label for c in study.cells)}")
    return found[0]


def _lookup(values: dict, key: str):
    if key.startswith(OPTIONS + "."):
        return values[OPTIONS].get(key.split(".", 1)[1])
    return values.get(key)


# --- running --------------------------------------------------------------------------------------------------------

def run_folder(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / cell.folder / f"seed-{seed}"


def claim(folder: Path) -> bool:
    """Take the run in ``folder`` for this process (a ``seed-<k>.lock`` file beside it holding our pid); ``False``
    when another live process holds it. So the same study started twice uses two cores without running a run twice;
    a lock left by a process that died is taken over."""
    import os

    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text(encoding="utf-8").strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner > 0 and owner != os.getpid() and _alive(owner):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(str(os.getpid()))
        return True
    return False


def release(folder: Path) -> None:
    folder.with_name(folder.name + ".lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state(folder: Path, config: RunConfig) -> str:
    """``"done"`` (a summary of all its rounds), ``"partial"`` (a checkpoint to resume from), ``"started"`` (stopped
    before its first checkpoint: ``driver.run`` asked to resume starts it over) or ``"new"``.

    A folder holding a run of other settings is an error rather than silently redone or mixed in.
    """
    from . import rundir
    from .driver import CHECKPOINT

    saved = folder / rundir.CONFIG
    if not saved.is_file():
        return "new"
    try:  # through from_dict, so keys added to RunConfig since the run was written read as their defaults
        old = config_io.from_dict({**json.loads(saved.read_text(encoding="utf-8")), "out": str(folder)})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{saved} cannot be read ({error}); move the folder away to redo the run") from None
    changed = config_io.differences(old.to_dict(), config.to_dict())
    if changed:
        raise ValueError(f"{folder} holds a run with other settings: {', '.join(changed)}; move it away or use "
                         "another --out")
    summary = folder / "summary.json"
    if summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("rounds") == config.rounds:
        return "done"
    return "partial" if (folder / CHECKPOINT).is_file() else "started"


def execute(study: Study, out: str | Path, log: Callable[[str], None] = print,
            verbose: bool = False) -> list[RunResult]:
    """Run every cell × seed that is not finished in ``out``; a failed run is reported and the grid goes on.

    A run that another live process is running (the same study started twice) is skipped and left out of the
    results; run the study again once both have finished for the complete tables.
    """
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    models: dict[tuple, tuple] = {}  # (model, device) → the loaded base model, copied for every run
    results: list[RunResult] = []
    total = len(study.cells) * len(study.seeds)
    started = time.perf_counter()
    for index, (cell, seed) in enumerate(itertools.product(study.cells, study.seeds), 1):
        result = RunResult(cell, seed, run_folder(out, cell, seed))
        where = f"[{index}/{total}] {cell.label} seed {seed}"
        try:
            config = study.config(cell, seed, result.folder)
            if state(result.folder, config) != "done":
                if not claim(result.folder):
                    log(f"{where}: running in another process, skipped")
                    continue
                try:
                    status = state(result.folder, config)  # again: it may have finished before we claimed it
                    if status != "done":
                        doing = {"partial": "resuming", "started": "starting over"}.get(status, "starting")
                        log(f"{where}: {doing} ({config.rounds} rounds)")
                        seconds = _train(config, status != "new", models, verbose)
                        result.redone = True
                        log(f"{where}: finished in {seconds:.0f} s (study {time.perf_counter() - started:.0f} s "
                            "so far)")
                finally:
                    release(result.folder)
            else:
                log(f"{where}: already finished, read back")
            result.summary = json.loads((result.folder / "summary.json").read_text(encoding="utf-8"))
            result.rows = read_metrics(result.folder)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - one failed run must not stop the grid
            result.error = f"{type(error).__name__}: {error}".splitlines()[0]
            log(f"{where}: FAILED: {result.error}")
        results.append(result)
    return results


def _train(config: RunConfig, resume: bool, models: dict, verbose: bool) -> float:
    """Run (or resume) one run with the shared run loop, on a fresh copy of the base model; the seconds it took."""
    from .models import load_model
    from .simulation import run as run_simulation

    key = (config.model, config.device)
    if key not in models:
        models[key] = load_model(config.model, device=config.device)
    model, tokenizer = models[key]
    started = time.perf_counter()
    run_simulation(config, model=copy.deepcopy(model), tokenizer=tokenizer, resume=resume, quiet=not verbose)
    return time.perf_counter() - started


# --- summarising -----------------------------------------------------------------------------------------------------

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
    from .report import rounds_to_target

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
    from . import report

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
