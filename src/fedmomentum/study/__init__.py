"""``fedmomentum study``: a grid of ordinary runs over cells and seeds, resumable, summarised against a baseline.

A study file (TOML or YAML) holds:

- ``[base]``: RunConfig keys shared by every run;
- ``[grid]``: RunConfig keys mapped to lists, crossed (``seed`` among them; a method option as
  ``method_options.<name> = [...]``, or ``method_options = [{...}, {...}]``, a list of option tables);
- ``[[cell]]`` (optional): tables of RunConfig keys, each one cell (``name`` labels it), crossed with ``[grid]``;
  for cells that differ in more than one key, e.g. FedIT beside FedMomentum variants;
- ``baseline``: the cell the others are compared with, as the values that pick it out (``{method = "fedit"}``)
  or a cell's name; values that pick out several cells give a baseline per group (each cell compared with the one
  that agrees with it on every other setting: FedIT per regime); ``target_loss`` (optional): for rounds to that eval
  loss; ``name`` (optional): a title.

Every cell × seed is a normal run folder ``runs/<cell>/seed-<k>`` made by ``simulation.run``; a finished run is
read back, never redone, and an interrupted one resumes from its checkpoint, so a study can be stopped and continued.
``read_back`` reads a study's finished runs from their files alone, so its tables can be recomputed from them.
``fedmomentum compare`` is a one-seed study of a cell per method (``of_methods``), its runs in ``OUT/<method>``.
"""

from .runner import RunResult, claim, execute, flat_folder, release, run_folder, state
from .spec import Cell, Study, StudyError, load, of_methods
from .summary import (
    Band,
    CellSummary,
    Interval,
    curves,
    detectable_difference,
    gap_vs_momentum,
    interval,
    read_back,
    run_metrics,
    summarize,
    write,
)

__all__ = ["Band", "Cell", "CellSummary", "Interval", "RunResult", "Study", "StudyError", "claim", "curves",
           "detectable_difference", "execute", "flat_folder", "gap_vs_momentum", "interval", "load", "of_methods",
           "read_back", "release", "run_folder", "run_metrics", "state", "summarize", "write"]
