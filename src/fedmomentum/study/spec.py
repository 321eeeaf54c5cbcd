"""The study file: its cells, seeds, baseline and target, checked before anything runs."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import config as config_io
from ..config import RunConfig

TOP_KEYS = ("name", "baseline", "target_loss", "base", "grid", "cell")
OPTIONS = "method_options"


@dataclass
class Cell:
    """One point of the grid (everything but the seed): its label and its values on top of ``[base]``."""

    label: str
    values: dict  # RunConfig keys (method options merged into ``method_options``)
    seeds: list[int] | None = None  # its own seeds (``seeds = [...]`` in its ``[[cell]]``); None: the grid's

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

    def seeds_of(self, cell: Cell) -> list[int]:
        """The seeds ``cell`` runs on: its own, else the grid's."""
        return self.seeds if cell.seeds is None else cell.seeds

    def runs(self) -> list[tuple[Cell, int]]:
        """Every run of the study, seed by seed (every cell of a seed, then the next seed), so that a study stopped
        part way holds whole paired sets of seeds."""
        return [(cell, seed) for seed in self.all_seeds() for cell in self.cells if seed in self.seeds_of(cell)]

    def all_seeds(self) -> list[int]:
        """Every seed some cell runs on: the grid's, then the cells' own in order."""
        return list(dict.fromkeys([*self.seeds, *sorted({s for c in self.cells for s in self.seeds_of(c)})]))

    def config(self, cell: Cell, seed: int, out: Path | None = None) -> RunConfig:
        """The run config of ``cell`` at ``seed`` (writing to ``out`` when given)."""
        values = config_io.merge(self.base, {**cell.values, "seed": seed})
        if out is not None:
            values["out"] = str(out)
        return config_io.from_dict(values)


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


def load(path: str | Path, overrides: dict | None = None) -> Study:
    """Read and check a study file; every error names the file and the key. ``overrides`` (config keys, e.g. from
    ``--set``) are laid over its ``[base]``."""
    path = Path(path)
    spec = config_io.read(path)
    unknown = [key for key in spec if key not in TOP_KEYS]
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a study has "
                         f"{', '.join(TOP_KEYS)} (RunConfig keys go in [base])")
    base = spec.get("base", {})
    if not isinstance(base, dict):
        raise StudyError(f"{path}: [base] must be a table of RunConfig keys")
    if "out" in base or "out" in (overrides or {}):
        raise StudyError(f"{path}: [base] out: a study sets each run's out itself (use --out for the study)")
    base = config_io.merge(base, overrides or {})
    try:
        config_io.from_dict(base)
    except (ValueError, TypeError) as error:
        raise StudyError(f"{path}: [base]: {error}") from None
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        raise StudyError(f"{path}: [grid] must be a table of keys mapped to lists")
    axes = _axes(grid, lambda key: f"{path}: [grid] {key}")
    seeds = _seeds(axes.pop("seed", [base.get("seed", 0)]), f"{path}: [grid] seed")

    cells = _cells(spec.get("cell", [{}]), axes, path)
    study = Study(path, str(spec.get("name", path.stem)), base, cells, list(seeds), cells[0],
                  _target(spec.get("target_loss"), path))
    _check_cells(study)
    study.baseline = _baseline(spec.get("baseline"), study)
    return study


def of_methods(names: list[str], base: RunConfig, target_loss: float | None = None,
               path: str | Path | None = None, shared: dict | None = None) -> Study:
    """The one-seed study ``fedmomentum compare`` runs: a cell per method on ``base`` (its seed, clients and data),
    the first method the baseline; ``base``'s method options go to its own method only, ``shared`` ones to every
    method (``-o server_opt=avgm``)."""
    values = {k: v for k, v in base.to_dict().items() if k not in ("out", "seed", "method", "method_options")}
    cells = [Cell(name, {"method": name, "method_options": {
        **(base.method_options if name == base.method else {}), **(shared or {})}}) for name in names]
    study = Study(Path(path or "compare"), "compare", values, cells, [base.seed], cells[0],
                  None if target_loss is None else _target(target_loss, Path(path or "--target-loss")))
    _check_cells(study)
    return study


def _check_cells(study: Study) -> None:
    """Every run must be a valid config: the error names the cell (and the config key)."""
    for cell in study.cells:
        try:
            study.config(cell, study.seeds[0]).validate()
        except (ValueError, TypeError) as error:
            raise StudyError(f"{study.path}: cell {cell.label!r}: {error}") from None


def _cells(tables, axes: dict[str, list], path: Path) -> list[Cell]:
    """Every ``[[cell]]`` table crossed with the grid's axes, labelled by what tells the cells apart."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables) or not tables:
        raise StudyError(f"{path}: cell must be a list of tables ([[cell]] in TOML)")
    drafts = []  # (name, values, grid values, own seeds) of every cell
    for index, table in enumerate(tables):
        own = {k: v for k, v in table.items() if k not in ("name", "seeds")}
        where = f"{path}: cell {table.get('name', index + 1)!r}"
        bad = [k for k in own if k not in config_io.FIELDS or k in ("seed", "out")]
        if bad:
            raise StudyError(f"{where}: key {bad[0]!r} is not a RunConfig key a cell may set (seed goes in [grid], "
                             "or seeds = [...] in the cell; out is the study's)")
        seeds = _seeds(table["seeds"], f"{where}: seeds") if "seeds" in table else None
        for choice in itertools.product(*axes.values()):
            chosen = _cell_values(axes, choice)
            drafts.append((table.get("name"), config_io.merge(own, chosen), chosen, seeds))
    keys = {key for _, values, _, _ in drafts for key in _flat(values)}
    varying = {key for key in keys if len({repr(_flat(v).get(key)) for _, v, _, _ in drafts}) > 1}
    cells = [Cell(" ".join(filter(None, [str(name), _label(chosen, varying)])) if name is not None
                  else _label(values, varying) or "default", values, seeds) for name, values, chosen, seeds in drafts]
    labels = [c.label for c in cells]
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise StudyError(f"{path}: cells {twice} share a label; give [[cell]] tables distinct names")
    if len({c.folder for c in cells}) != len(cells):
        raise StudyError(f"{path}: two cells would share a run folder; give [[cell]] tables distinct names")
    return cells


def _seeds(seeds, where: str) -> list[int]:
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"{where}: must be a list of distinct integers, got {seeds!r}")
    return seeds


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
