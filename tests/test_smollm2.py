"""End to end on the real SmolLM2-135M-Instruct (the embedded default), kept small."""

from __future__ import annotations

import pytest

from fedmomentum import driver, simulation
from fedmomentum.config import RunConfig
from fedmomentum.peft_io import get_backbone
from fedmomentum.records import read_metrics


@pytest.mark.slow
def test_two_rounds_on_smollm2_lower_the_loss_and_move_the_backbone(tmp_path):
    config = RunConfig(rounds=2, clients=2, clients_per_round=2, families=["basic_arithmetic", "chain_sum"],
                       train_per_family=16, eval_per_family=3, max_length=80, local_steps=2, batch_size=2, lr=2e-3,
                       accuracy_per_family=1, max_new_tokens=8, out=str(tmp_path / "run"))
    setup, engine = simulation.engine(config)
    assert setup.model.get_base_model().config.num_hidden_layers == 30  # the real model, not a stand-in
    before = get_backbone(setup.model)
    summary = driver.run(setup, engine, quiet=True)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    rows = read_metrics(tmp_path / "run")
    assert all(row["residual_rank"] > 0 for row in rows[1:])  # FedMomentum merged a residual every round
    after = get_backbone(setup.model)
    assert any(not (after[name] == before[name]).all() for name in before)
