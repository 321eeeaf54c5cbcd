"""Update norms and clipping (``robust.py``) against dense float64 references, and the driver's one call.

Each reference forms the dense ``s(B_i A_i − B⁰ A⁰)`` in float64 numpy from the same factors. The Gram route
computes the same quantity in float64; its rounding error is at most a few ``(d + k + r) · eps64`` relative to
``‖X‖²_F ‖Y‖²_F`` (the factors' sizes), which the tolerances below are derived from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedmomentum as fm
from fedmomentum import driver, robust, simulation
from fedmomentum.config import RunConfig
from fedmomentum.driver import ClientRound
from fedmomentum.peft_io import get_lora
from fedmomentum.records import read_metrics

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (16, 24)}


def pair(rng, d, k, r, scale=1.0) -> fm.LoraPair:
    return fm.LoraPair(torch.tensor(rng.standard_normal((r, k)) * scale / math.sqrt(k), dtype=torch.float32),
                       torch.tensor(rng.standard_normal((d, r)) * scale, dtype=torch.float32))


def dense(p: fm.LoraPair) -> np.ndarray:
    return p.B.double().numpy() @ p.A.double().numpy()


def dense_norm(start: dict, trained: dict, s: float) -> float:
    return math.sqrt(sum(np.linalg.norm(s * (dense(trained[n]) - dense(start[n]))) ** 2 for n in start))


def tolerance(start: dict, trained: dict, s: float) -> float:
    """An absolute bound on the Gram route's float64 error for ``‖u‖``: ``(d+k+r)·eps·‖X‖‖Y‖`` per layer."""
    bound = 0.0
    for n, p in start.items():
        q = trained[n]
        X = np.hstack([q.B.double().numpy() - p.B.double().numpy(), p.B.double().numpy()])
        Y = np.vstack([q.A.double().numpy(), q.A.double().numpy() - p.A.double().numpy()])
        bound += 8 * sum(X.shape + Y.shape[1:]) * EPS64 * (np.linalg.norm(X) * np.linalg.norm(Y)) ** 2
    return abs(s) * math.sqrt(bound) + 1e-300


def make(seed: int, r: int = 4, spread: float = 0.1) -> tuple[dict, dict]:
    """A start and a trained adapter ``spread`` away from it."""
    rng = np.random.default_rng(seed)
    start = {n: pair(rng, d, k, r) for n, (d, k) in SHAPES.items()}
    trained = {n: fm.LoraPair(p.A + pair(rng, *SHAPES[n], r, spread).A, p.B + pair(rng, *SHAPES[n], r, spread).B)
               for n, p in start.items()}
    return start, trained


@pytest.mark.parametrize("seed, spread", [(0, 0.1), (1, 1.0), (2, 1e3), (3, 1e-4)])
def test_update_norm_is_the_dense_frobenius_norm(seed, spread):
    start, trained = make(seed, spread=spread)
    s = 1.7
    got = robust.update_norm(start, trained, s)
    assert got == pytest.approx(dense_norm(start, trained, s), abs=tolerance(start, trained, s))


@pytest.mark.parametrize("seed, spread", [(4, 0.3), (5, 40.0)])
def test_the_quartic_gives_the_mixture_norm_and_the_clip_fraction_hits_the_threshold(seed, spread):
    start, trained = make(seed, spread=spread)
    s = 0.5
    coefficients = robust.quartic(start, trained, s)
    a, b, q = coefficients
    for c in (0.0, 0.25, 0.5, 1.0):
        mixed = robust.mixture(start, trained, c)
        expected = dense_norm(start, {n: fm.LoraPair(p.A.double(), p.B.double()) for n, p in mixed.items()}, s)
        # ``mixture`` rounds its factors to float32 (relative eps32 each); the quartic is exact in c
        float32_rounding = 2 * EPS32 * s * math.sqrt(sum((p.A.norm() * p.B.norm()).item() ** 2
                                                         for p in mixed.values()))
        assert math.sqrt(max(c * c * (a + c * (2 * b + c * q)), 0)) == pytest.approx(expected, abs=float32_rounding)
    norm = robust.update_norm(start, trained, s)
    threshold = norm / 7
    c = robust.clip_fraction(coefficients, threshold)
    assert 0 < c < 1
    f = c * c * (a + c * (2 * b + c * q))
    assert f <= threshold**2 and f == pytest.approx(threshold**2, rel=1e-12)
    assert robust.clip_fraction(coefficients, 2 * norm) == 1.0


def round_of(seed: int, attack: float | None = None, r: int = 4):
    """A global adapter and four updates trained from it (small random changes); client-3's change ×``attack``."""
    rng = np.random.default_rng(seed)
    global_lora = {n: pair(rng, d, k, r) for n, (d, k) in SHAPES.items()}
    updates = []
    for index in range(4):
        factor = attack if attack is not None and index == 3 else 1.0
        layers = {n: fm.LoraPair(p.A + factor * pair(rng, *SHAPES[n], r, 0.05).A,
                                 p.B + factor * pair(rng, *SHAPES[n], r, 0.05).B) for n, p in global_lora.items()}
        updates.append(fm.ClientUpdate(layers, 10, client_id=f"client-{index}", scaling=2.0))
    return global_lora, updates


def test_bound_updates_clips_only_the_outlier_to_k_times_the_median():
    global_lora, updates = round_of(0, attack=300.0)
    method = fm.methods.create("fedmomentum")
    bounded, record = robust.bound_updates(method, global_lora, {}, updates, scaling=2.0, t=1, clip="median", k=2.0)
    norms = [dense_norm(global_lora, u.factors, 2.0) for u in updates]
    assert list(record["update_norms"].values()) == pytest.approx(norms, rel=1e-9)
    threshold = 2.0 * float(np.median(norms))
    assert record["clip_threshold"] == pytest.approx(threshold, rel=1e-9)
    assert set(record["clipped"]) == {"client-3"} and 0 < record["clipped"]["client-3"] < 1e-2
    assert all(bounded[i] is updates[i] for i in range(3))
    clipped = dense_norm(global_lora, {n: fm.LoraPair(p.A.double(), p.B.double())
                                       for n, p in bounded[3].factors.items()}, 2.0)
    assert clipped == pytest.approx(threshold, rel=1e-4)  # the mixture is rounded to float32
    assert bounded[3].num_examples == 10 and bounded[3].client_id == "client-3"
    unclipped, plain = robust.bound_updates(method, global_lora, {}, updates, scaling=2.0, t=1, clip="none")
    assert unclipped is updates and plain["clip_threshold"] is None and plain["clipped"] == {}


def test_a_method_training_one_factor_sees_exactly_c_times_the_update():
    """FFA-LoRA keeps A: the clipped client's update is exactly ``c · s(B_i − B)A`` with ``c = τ / ‖u‖``."""
    global_lora, updates = round_of(1, attack=50.0)
    updates = [fm.ClientUpdate({n: fm.LoraPair(global_lora[n].A.clone(), p.B) for n, p in u.factors.items()},
                               u.num_examples, u.client_id) for u in updates]
    method = fm.methods.create("ffa-lora")
    bounded, record = robust.bound_updates(method, global_lora, {}, updates, scaling=1.0, t=1, k=1.5)
    c = record["clipped"]["client-3"]
    norm = record["update_norms"]["client-3"]
    assert c == pytest.approx(record["clip_threshold"] / norm, rel=1e-9)
    for n, p in bounded[3].factors.items():
        assert torch.equal(p.A, global_lora[n].A)
        expected = c * (dense(updates[3].factors[n]) - dense(global_lora[n]))
        np.testing.assert_allclose(dense(p) - dense(global_lora[n]), expected,
                                   atol=16 * EPS32 * np.abs(dense(updates[3].factors[n])).max())


def test_the_start_is_the_clients_own_rank_and_kept_factors():
    """A client of another rank is measured from the global adapter at its rank (``s_k B⁰A⁰ = s B A`` when it is
    larger), and a FedSA-LoRA client from its own kept ``B``."""
    rng = np.random.default_rng(3)
    global_lora = {n: pair(rng, d, k, 4) for n, (d, k) in SHAPES.items()}
    method = fm.methods.create("fedmomentum")
    factors = {n: pair(rng, d, k, 6) for n, (d, k) in SHAPES.items()}
    update = fm.ClientUpdate(factors, 5, "client-0", scaling=8 / 6)
    _, record = robust.bound_updates(method, global_lora, {}, [update], scaling=2.0, t=1)
    expected = math.sqrt(sum(np.linalg.norm(8 / 6 * dense(factors[n]) - 2.0 * dense(global_lora[n])) ** 2
                             for n in SHAPES))
    assert record["update_norms"]["client-0"] == pytest.approx(expected, rel=1e-5)  # float32 start (at_rank)
    fedsa = fm.methods.create("fedsa-lora")
    own = {"B": {n: pair(rng, d, k, 4).B for n, (d, k) in SHAPES.items()}}
    trained = {n: pair(rng, d, k, 4) for n, (d, k) in SHAPES.items()}
    _, record = robust.bound_updates(fedsa, global_lora, {"client-0": own}, [fm.ClientUpdate(trained, 5, "client-0")],
                                     scaling=2.0, t=2)
    start = {n: fm.LoraPair(global_lora[n].A, own["B"][n]) for n in SHAPES}
    assert record["update_norms"]["client-0"] == pytest.approx(dense_norm(start, trained, 2.0), rel=1e-9)


def test_bad_clip_option_is_refused():
    global_lora, updates = round_of(2)
    with pytest.raises(ValueError, match="clip must be one of"):
        robust.bound_updates(fm.methods.create("fedit"), global_lora, {}, updates, scaling=1.0, t=1, clip="mean")
    with pytest.raises(ValueError, match="config key clip = 'mean': expected one of 'none', 'median'"):
        RunConfig(clip="mean").validate()
    with pytest.raises(ValueError, match="clip_k must be ≥ 1, got 0.5"):
        RunConfig(clip_k=0.5).validate()


class Poisoning(simulation.InProcess):
    """The in-process engine with client-1's update multiplied by ``factor`` (its change from the start ×factor)."""

    def __init__(self, engine: simulation.InProcess, factor: float):
        super().__init__(engine.setup, engine.client_data)
        self.factor, self.sent = factor, []

    def train_round(self, t, state, trainable, lr):
        trained = super().train_round(t, state, trainable, lr)
        updates = []
        for u in trained.updates:
            if u.client_id == "client-1":
                u = fm.ClientUpdate({n: fm.LoraPair(state.lora[n].A + self.factor * (p.A - state.lora[n].A),
                                                    state.lora[n].B + self.factor * (p.B - state.lora[n].B))
                                     for n, p in u.factors.items()}, u.num_examples, u.client_id, u.scaling)
            updates.append(u)
        self.sent.append(updates)
        return ClientRound(updates, trained.losses, trained.record)


def test_the_driver_records_every_norm_and_clips_before_the_method(tmp_path, fresh_tiny, small_config):
    """One call in ``driver.run_round``: the round's record holds each client's norm (the same as recomputed from
    the updates the engine returned), and an update ×30 is clipped to k × the median before the method sees it."""
    config = small_config(tmp_path / "run", rounds=1, clients=4, clients_per_round=4, accuracy_per_family=0,
                          clip_k=2.0)
    setup, engine = simulation.engine(config, *fresh_tiny, quiet=True)
    engine = Poisoning(engine, 30.0)
    before = get_lora(setup.model)
    seen = []
    aggregate = setup.method.aggregate
    setup.method.aggregate = lambda lora, updates, **kw: seen.extend(updates) or aggregate(lora, updates, **kw)
    driver.run(setup, engine, quiet=True)
    record = read_metrics(config.out)[1]
    sent = engine.sent[0]
    norms = {u.client_id: dense_norm(before, u.factors, u.scaling) for u in sent}
    assert record["update_norms"] == pytest.approx(norms, rel=1e-6)
    median = float(np.median(list(norms.values())))
    assert record["clip_threshold"] == pytest.approx(2.0 * median, rel=1e-6)
    assert set(record["clipped"]) == {"client-1"}
    clipped = next(u for u in seen if u.client_id == "client-1")
    assert dense_norm(before, clipped.factors, clipped.scaling) == pytest.approx(2.0 * median, rel=1e-4)
    assert [u.factors for u in seen if u.client_id != "client-1"] == [u.factors for u in sent
                                                                       if u.client_id != "client-1"]
