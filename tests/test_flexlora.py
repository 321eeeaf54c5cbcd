"""FlexLoRA end to end with clients above the global rank: each starts from its top-r_k components of the aggregate,
in the simulation and, identically, on Flower."""

from __future__ import annotations

import numpy as np
import torch

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.flower import make_client_app
from fedmomentum.methods.flexlora import FlexLoRA
from fedmomentum.records import read_metrics as rows
from flower_helpers import FLOWER, LocalGrid, assert_same_state, run_local

F32 = float(torch.finfo(torch.float32).eps)
MIXED = {**FLOWER, "method": "flexlora", "lora_r": 4, "client_ranks": "cycle:2,8", "rounds": 2}


def _spied(monkeypatch) -> tuple[list, list]:
    """Every aggregation's (updates, scaling) and every client start's (rank, start), in order."""
    aggregated, starts = [], []
    aggregate, client_start = FlexLoRA.aggregate, FlexLoRA.client_start

    def spy_aggregate(self, lora, updates, **kwargs):
        aggregated.append(([u.factors for u in updates], [u.scaling for u in updates],
                           self.client_weights(updates), kwargs["scaling"]))
        return aggregate(self, lora, updates, **kwargs)

    def spy_start(self, global_lora, **kwargs):
        start = client_start(self, global_lora, **kwargs)
        starts.append((kwargs.get("rank"), kwargs.get("scaling"), start))
        return start

    monkeypatch.setattr(FlexLoRA, "aggregate", spy_aggregate)
    monkeypatch.setattr(FlexLoRA, "client_start", spy_start)
    return aggregated, starts


def test_a_rank_8_client_starts_from_the_top_8_components_in_the_simulation(tmp_path, small_config, monkeypatch):
    """lora_r = 4, client ranks 2 and 8: in round 2 the rank-8 client's ``s_8 B A`` is the top-8 truncation of round
    1's ``Σ p_k s_k B_k A_k`` (float64 reference), not the global rank-4 model zero-padded; the global adapter and the
    exports stay at rank 4."""
    aggregated, starts = _spied(monkeypatch)
    config = small_config(tmp_path / "sim", **MIXED)
    simulation.run(config, quiet=True)
    state = checkpoint.load(tmp_path / "sim" / driver.CHECKPOINT)[0]
    assert {pair.rank for pair in state.lora.values()} == {4}
    assert {t.shape[0] for t in state.method["tail_A"].values()} == {4}
    factors, scalings, weights, _ = aggregated[0]
    wide = [(scaling, start) for rank, scaling, start in starts if rank == 8]
    assert len(wide) >= 2  # round 1's start and round 2's (later ones: the server's norms of round 2's update)
    s8, start = next((scaling, start) for scaling, start in wide if any(start[k].B[:, 4:].any() for k in start))
    checked = 0
    for layer, pair in start.items():
        M = sum(p * sk * factors_k[layer].B.double().numpy() @ factors_k[layer].A.double().numpy()
                for p, sk, factors_k in zip(weights, scalings, factors, strict=True))
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
        top8 = (U[:, :8] * S[:8]) @ Vh[:8]
        got = s8 * pair.B.double().numpy() @ pair.A.double().numpy()
        # float32 factors, an SVD in float32: error ∝ eps · σ_1 / (σ_8 − σ_9) relative to the top part
        bound = 100 * F32 * S[0] / (S[7] - S[8])
        assert np.linalg.norm(got - top8) <= bound * np.linalg.norm(top8), layer
        top4 = (U[:, :4] * S[:4]) @ Vh[:4]
        assert np.linalg.norm(got - top4) > 10 * bound * np.linalg.norm(top8)  # more than the global model's 4
        checked += 1
    assert checked == len(state.lora)


def test_clients_above_the_global_rank_on_flower_equal_the_simulation(tmp_path, small_config):
    """The same run on Flower (in process, Flower's wire format): the rank-8 node gets the state's components in its
    message (``method-state``) and every number is the simulation's, bit for bit."""
    reference = small_config(tmp_path / "sim", **MIXED)
    simulation.run(reference, quiet=True)
    config = small_config(tmp_path / "flower", **MIXED)
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=31))
    assert_same_state(tmp_path / "sim" / driver.CHECKPOINT, tmp_path / "flower" / driver.CHECKPOINT, atol=0.0)
    sim_rows, flower_rows = rows(tmp_path / "sim"), rows(tmp_path / "flower")
    assert [r["eval_loss"] for r in sim_rows] == [r["eval_loss"] for r in flower_rows]
    per_client = flower_rows[2]["downlink_bytes_per_client"]
    assert per_client["client-1"] > per_client["client-0"]  # the rank-8 client also gets the 4 extra components
