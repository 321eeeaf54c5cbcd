"""The in-process engine with momentum measured every round (``fedmomentum.momentum``), as the driver will measure it
once it is wired in; and the script that made the tiny study fixture with it.

    python tests/momentum_helpers.py tests/fixtures/study-tiny     # remakes the fixture's runs/ and tables
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

from fedmomentum import driver
from fedmomentum.momentum import MomentumState, measure
from fedmomentum.simulation import InProcess
from fedmomentum.simulation import engine as build_engine


class Measuring(InProcess):
    """``InProcess`` that measures the momentum of each round in ``after_round``: the round's fields go into its
    ``metrics.jsonl`` line and the per-layer ones into ``aggregation.jsonl``."""

    def __init__(self, setup, client_data, ids=None):
        super().__init__(setup, client_data, ids)
        self.momentum = MomentumState()
        self.updates = []

    def train_round(self, round, global_lora, trainable, lr):
        trained = super().train_round(round, global_lora, trainable, lr)
        self.updates = trained.updates
        return trained

    def after_round(self, round, previous, result, record, out):
        values, self.momentum = measure(self.momentum, previous, result.lora, result.backbone, self.setup.scaling,
                                        [u.factors for u in self.updates],
                                        self.setup.method.client_weights(self.updates))
        record.update(values.record())
        for name, layer in values.layers.items():
            result.stats["layers"][name].update(layer)


def measured_run(config, model, tokenizer, engine_class=Measuring) -> tuple[dict, Measuring]:
    """Run ``config`` on a copy of ``model`` with momentum measured; the summary and the engine."""
    setup, plain = build_engine(config, copy.deepcopy(model), tokenizer)
    engine = engine_class(setup, plain.client_data, plain.ids)
    return driver.run(setup, engine, quiet=True), engine


def make_fixture(folder: Path) -> None:
    """Every run of ``folder/study.toml`` made afresh with momentum measured, keeping what ``docs/results`` keeps of a
    run, then the study's tables from those files (no plots: the test that reads the fixture compares ``study.md``)."""
    from fedmomentum import study as study_io
    from fedmomentum.models import tiny_model

    study = study_io.load(folder / "study.toml")
    model, tokenizer = tiny_model(0)
    shutil.rmtree(folder / "runs", ignore_errors=True)
    for cell in study.cells:
        for seed in study.seeds:
            run = study_io.run_folder(folder, cell, seed)
            measured_run(study.config(cell, seed, run), model, tokenizer)
            for extra in run.iterdir():
                if extra.name not in KEPT:
                    shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    study_io.write(study, study_io.read_back(study, folder), folder, draw=False)


KEPT = ("config.json", "metrics.jsonl", "summary.json")


if __name__ == "__main__":
    make_fixture(Path(sys.argv[1]))
