"""The study file: its cells, seeds, baseline and target, checked before anything runs."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as config_io
from .. import methods
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
    baselines: dict[str, Cell] = field(default_factory=dict)  # cell label → the cell it is compared with
    target_loss: float | None = None

    def baseline_of(self, cell: Cell) -> Cell:
        """The cell ``cell`` is compared with, seed by seed (a baseline cell is its own)."""
        return self.baselines[cell.label]

    def baseline_cells(self) -> list[Cell]:
        """The cells the others are compared with, in the study's order: one, unless ``baseline`` picks out a
        baseline per group of cells."""
        return [cell for cell in self.cells if self.baseline_of(cell) is cell]

    @property
    def baseline(self) -> Cell:
        """The baseline of every cell, when there is one (else a ``StudyError``: ask ``baseline_of``)."""
        cells = self.baseline_cells()
        if len(cells) != 1:
            raise StudyError(f"{self.path}: {len(cells)} baseline cells, one per group: use baseline_of(cell)")
        return cells[0]

    def compared_with(self, quote: str = "") -> str:
        """What a cell is compared with, in words: the baseline's label (between ``quote``s), or "its baseline"."""
        cells = self.baseline_cells()
        return f"{quote}{cells[0].label}{quote}" if len(cells) == 1 else "its baseline"

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


def _varying(tables: list[dict]) -> set[str]:
    """The keys (``method_options`` spread) whose values are not the same in all ``tables``."""
    keys = {key for table in tables for key in _flat(table)}
    return {key for key in keys if len({repr(_flat(table).get(key)) for table in tables}) > 1}


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
    study = Study(path, str(spec.get("name", path.stem)), base, cells, list(seeds),
                  target_loss=_target(spec.get("target_loss"), path))
    _check_cells(study)
    study.baselines = _baselines(spec.get("baseline"), study)
    return study


def of_methods(names: list[str], base: RunConfig, target_loss: float | None = None,
               path: str | Path | None = None, shared: dict | None = None) -> Study:
    """The one-seed study ``fedmomentum compare`` runs: a cell per method on ``base`` (its seed, clients and data),
    the first method the baseline; ``base``'s method options go to its own method only, ``shared`` ones to every
    method (``-o server_opt=avgm``)."""
    values = {k: v for k, v in base.to_dict().items() if k not in ("out", "seed", "method", "method_options")}
    cells = [Cell(name, {"method": name, "method_options": {
        **(base.method_options if name == base.method else {}), **(shared or {})}}) for name in names]
    study = Study(Path(path or "compare"), "compare", values, cells, [base.seed],
                  target_loss=None if target_loss is None else _target(target_loss, Path(path or "--target-loss")))
    _check_cells(study)
    study.baselines = _baselines(None, study)
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
    varying = _varying([values for _, values, _, _ in drafts])
    namesakes = {name: _varying([t for t in tables if t.get("name") == name]) for name, _, _, _ in drafts}
    cells = [Cell(" ".join(filter(None, [str(name), _label(values, namesakes[name] - set(_flat(chosen))),
                                         _label(chosen, varying)])) if name is not None
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


def _baselines(spec, study: Study) -> dict[str, Cell]:
    """Each cell's baseline: the one cell ``spec`` names (its label, or values that match one cell; the first cell if
    none), or, where its values match several, the one of them that agrees with the cell on every other resolved
    setting (a regime sweep: FedIT at each ``clients_per_round``). A cell with none, or several, is an error."""
    resolved = {cell.label: study.config(cell, study.seeds[0]).to_dict() for cell in study.cells}
    found, keys = _matches(spec, study, resolved)
    if len(found) == 1:
        return {cell.label: found[0] for cell in study.cells}
    baselines = {}
    for cell in study.cells:
        differing = {b.label: _differences(resolved[cell.label], resolved[b.label], keys) for b in found}
        same = [cell] if cell in found else [b for b in found if not differing[b.label]]
        if len(same) != 1:
            raise StudyError(_unpaired(study, cell, found, same, keys, differing))
        baselines[cell.label] = same[0]
    return baselines


def _matches(spec, study: Study, resolved: dict[str, dict]) -> tuple[list[Cell], tuple[str, ...]]:
    """The cells ``spec`` picks out (some, not all) and the keys it picks them by; ``resolved``: each cell's
    resolved run config."""
    where = f"{study.path}: baseline"
    if spec is None:
        return [study.cells[0]], ()
    if isinstance(spec, str):
        found, keys = [c for c in study.cells if c.label == spec], ()
    elif isinstance(spec, dict) and spec:
        wanted = _axes({k: [v] for k, v in spec.items()}, lambda key: f"{where} {key}")
        found = [c for c in study.cells if all(_lookup(resolved[c.label], key) == choice[0]
                                               for key, choice in wanted.items())]
        keys = tuple(wanted)
    else:
        raise StudyError(f"{where}: must be a cell's name or a table of values, got {spec!r}")
    if not found or len(found) == len(study.cells) > 1:
        raise StudyError(f"{where}: {spec!r} matches {len(found)} cells "
                         f"({', '.join(c.label for c in found) or 'none'}); it must pick out one of: "
                         f"{', '.join(c.label for c in study.cells)}, or one per group of cells")
    return found, keys


def _differences(mine: dict, base: dict, keys: tuple[str, ...]) -> list[str]:
    """The resolved settings in which a cell differs from a baseline cell: all but the seed, the out folder, the
    baseline's ``keys`` and the method options the baseline's method does not take (FedMomentum's
    ``residual_energy`` beside FedIT)."""
    takes = {f"{OPTIONS}.{name}" for name in methods.options(base["method"])} if OPTIONS not in keys else set()
    mine, base = _flat(mine), _flat(base)
    return sorted(k for k in {*mine, *base} if k not in ("seed", "out", *keys)
                  and (k in takes or not k.startswith(OPTIONS + ".")) and mine.get(k) != base.get(k))


def _unpaired(study: Study, cell: Cell, found: list[Cell], same: list[Cell], keys: tuple[str, ...],
              differing: dict[str, list[str]]) -> str:
    """Why ``cell`` has no single baseline among the ``found`` cells: it agrees with several (``same``) or none."""
    head = (f"{study.path}: baseline: cell {cell.label!r} must agree with exactly one of the baseline cells "
            f"({', '.join(b.label for b in found)}) on everything but {', '.join(keys)}")
    if same:
        return f"{head}; it agrees with {len(same)}: {', '.join(b.label for b in same)}"
    return f"{head}; it agrees with none: " + "; ".join(
        f"{b.label!r} differs in {', '.join(differing[b.label])}" for b in found)


def _lookup(values: dict, key: str):
    if key.startswith(OPTIONS + "."):
        return values[OPTIONS].get(key.split(".", 1)[1])
    return values.get(key)
