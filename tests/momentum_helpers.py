"""The script that makes the tiny study fixture (``tests/fixtures/study-tiny``): its runs, keeping what
``docs/results`` keeps of a run, and its tables.

    python tests/momentum_helpers.py tests/fixtures/study-tiny     # remakes the fixture's runs/ and tables
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

from fedmomentum import simulation


def make_fixture(folder: Path) -> None:
    """Every run of ``folder/study.toml`` made afresh (momentum is measured in every run), keeping what
    ``docs/results`` keeps of a run, then the study's tables from those files (no plots: the test that reads the
    fixture compares ``study.md``)."""
    from fedmomentum import study as study_io
    from fedmomentum.models import tiny_model

    study = study_io.load(folder / "study.toml")
    model, tokenizer = tiny_model(0)
    shutil.rmtree(folder / "runs", ignore_errors=True)
    for cell in study.cells:
        for seed in study.seeds:
            run = study_io.run_folder(folder, cell, seed)
            simulation.run(study.config(cell, seed, run), model=copy.deepcopy(model), tokenizer=tokenizer,
                           quiet=True)
            for extra in run.iterdir():
                if extra.name not in KEPT:
                    shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    study_io.write(study, study_io.read_back(study, folder), folder, draw=False)


KEPT = ("config.json", "metrics.jsonl", "summary.json")


if __name__ == "__main__":
    make_fixture(Path(sys.argv[1]))
