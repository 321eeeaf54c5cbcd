"""FedProx (``prox_mu``) and SCAFFOLD (``scaffold``): the maths against numpy, local training against a reference
loop written here, and whole runs (the server variate is the mean of all clients' variates; resume is exact)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedmomentum import checkpoint, corrections, driver, simulation
from fedmomentum.client import TrainConfig, batches, response_loss, train_client, train_round
from fedmomentum.config import RunConfig
from fedmomentum.data import Example, collate, encode
from fedmomentum.methods import create
from fedmomentum.peft_io import add_lora, get_lora, lora_layers, set_lora, set_trainable
from fedmomentum.records import read_metrics
from fedmomentum.types import ClientUpdate, LoraPair

EPS32 = float(np.finfo(np.float32).eps)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def pairs(rng, layers=("a", "b")) -> dict[str, LoraPair]:
    return {name: LoraPair(torch.tensor(rng.standard_normal((2, 5)), dtype=torch.float32),
                           torch.tensor(rng.standard_normal((4, 2)), dtype=torch.float32)) for name in layers}


def variate(rng, layers=("a", "b"), factors="AB", prefix="") -> dict:
    return {prefix + f: {name: torch.tensor(rng.standard_normal((2, 5) if f == "A" else (4, 2)), dtype=torch.float32)
                         for name in layers} for f in factors}


# --- the maths -------------------------------------------------------------------------------------------------


def test_client_variate_is_option_ii():
    """``c_i⁺ = c_i − c + (x − y)/(K η)`` for the trained factors; an untrained factor keeps its variate."""
    rng = np.random.default_rng(0)
    start, trained = pairs(rng), pairs(rng)
    control, own = variate(rng), {**variate(rng, prefix="control_"), "B": {"a": torch.ones(4, 2)}}
    got = corrections.client_variate(start, trained, control, own, {"A": True, "B": False}, steps=3, lr=0.01)
    assert set(got) == {"control_A", "control_B"}
    for name in start:
        want = (np64(own["control_A"][name]) - np64(control["A"][name])
                + (np64(start[name].A) - np64(trained[name].A)) / (3 * 0.01))
        np.testing.assert_allclose(np64(got["control_A"][name]), want, rtol=0, atol=10 * EPS32 * np.abs(want).max())
        assert torch.equal(got["control_B"][name], own["control_B"][name])
    first = corrections.client_variate(start, trained, None, None, {"A": False, "B": True}, steps=2, lr=0.5)
    assert set(first) == {"control_B"}  # no variates yet: c = c_i = 0
    for name in start:
        want = (np64(start[name].B) - np64(trained[name].B)) / (2 * 0.5)
        np.testing.assert_allclose(np64(first["control_B"][name]), want, rtol=0, atol=10 * EPS32 * np.abs(want).max())


def test_server_variate_adds_the_mean_change_over_all_clients():
    """``c ← c + (1/N) Σ_{i ∈ round} (c_i⁺ − c_i)``, N = all clients; a client without a variate had zero."""
    rng = np.random.default_rng(1)
    control = variate(rng)
    before = {"client-0": variate(rng, prefix="control_"), "client-2": {"B": variate(rng)["B"]}}
    after = {"client-0": variate(rng, prefix="control_"), "client-2": {"B": before["client-2"]["B"],
                                                                      **variate(rng, prefix="control_")}}
    got = corrections.server_variate(control, before, after, clients=5)
    for factor in "AB":
        for name in ("a", "b"):
            change = sum(np64(after[c][f"control_{factor}"][name])
                         - (np64(before[c][f"control_{factor}"][name]) if f"control_{factor}" in before[c] else 0)
                         for c in after)
            want = np64(control[factor][name]) + change / 5
            np.testing.assert_allclose(np64(got[factor][name]), want, rtol=0, atol=10 * EPS32 * np.abs(want).max())
    assert corrections.server_variate({}, {}, {"client-1": {"B": {"a": torch.ones(1, 1)}}}, 3) == {}  # no variate


def test_prox_gradients_are_the_gradient_of_the_proximal_term():
    rng = np.random.default_rng(2)
    w = torch.nn.Parameter(torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float64))
    w0 = torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float64)
    (0.35 / 2 * ((w - w0) ** 2).sum()).backward()
    expected = w.grad.clone()
    w.grad = None
    corrections.prox_gradients([w], [w0], 0.35)
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=10 * float(np.finfo(np.float64).eps))


# --- local training against a reference loop ----------------------------------------------------------------


def reference_training(model, data, start, trainable, cfg, *, lr, seed, mu=0.0, shift=None):
    """The client's round written out: AdamW on the loss plus ``μ/2 ‖w − w₀‖²`` (autograd), and after each step
    ``w ← w − lr (c − c_i)``."""
    set_lora(model, start)
    params = set_trainable(model, trainable)
    names = [(f, n) for n in lora_layers(model) for f in "AB" if trainable[f]]
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    for index in batches(len(data), cfg, generator):
        loss = response_loss(model, collate([data[i] for i in index], 0))
        loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if shift is not None:
            with torch.no_grad():
                for p, (factor, name) in zip(params, names, strict=True):
                    p -= lr * shift[factor][name]
    model.eval()
    set_trainable(model, {"A": False, "B": False})
    return get_lora(model)


def tiny_client(fresh_tiny):
    model, tokenizer = fresh_tiny
    model = add_lora(model, r=2, alpha=4, seed=3)
    data = [encode(Example(f"What is {a} + {b}?", str(a + b), "x", str(a + b)), tokenizer, 48)
            for a, b in [(2, 3), (7, 1), (4, 4), (9, 5), (6, 2)]]
    rng = np.random.default_rng(4)
    start = {name: LoraPair(pair.A, torch.tensor(0.05 * rng.standard_normal(pair.B.shape), dtype=torch.float32))
             for name, pair in get_lora(model).items()}  # B ≠ 0, so both factors get gradients
    return model, data, start


@pytest.mark.parametrize("trainable", [{"A": True, "B": True}, {"A": False, "B": True}])
def test_fedprox_training_equals_the_loss_with_the_proximal_term(trainable, fresh_tiny):
    model, data, start = tiny_client(fresh_tiny)
    cfg = TrainConfig(local_steps=4, batch_size=2, prox_mu=3.0)
    update, _ = train_client(model, data, start, trainable, cfg, lr=0.05, seed=7)
    want = reference_training(model, data, start, trainable, cfg, lr=0.05, seed=7, mu=3.0)
    plain, _ = train_client(model, data, start, trainable, TrainConfig(local_steps=4, batch_size=2), lr=0.05, seed=7)
    moved, plain_moved = 0.0, 0.0
    for name, pair in start.items():
        for factor in "AB":
            got, ref = getattr(update.factors[name], factor), getattr(want[name], factor)
            step = np64(ref) - np64(getattr(pair, factor))
            scale = 4 * 0.05  # AdamW moves an entry by at most about lr a step
            np.testing.assert_allclose(np64(got), np64(ref), rtol=0, atol=100 * EPS32 * scale)
            if trainable[factor]:
                moved += np.linalg.norm(step) ** 2
                plain_moved += np.linalg.norm(np64(getattr(plain.factors[name], factor))
                                              - np64(getattr(pair, factor))) ** 2
            else:
                assert torch.equal(got, getattr(pair, factor))
    assert moved < 0.9 * plain_moved  # the proximal term held the factors nearer their start


def test_scaffold_training_shifts_every_step_by_the_correction(fresh_tiny):
    model, data, start = tiny_client(fresh_tiny)
    rng = np.random.default_rng(5)
    shift = {f: {name: torch.tensor(0.3 * rng.standard_normal(getattr(pair, f).shape), dtype=torch.float32)
                 for name, pair in start.items()} for f in "AB"}
    cfg = TrainConfig(local_steps=3, batch_size=2, scaffold=True)
    update, _ = train_client(model, data, start, {"A": True, "B": True}, cfg, lr=0.02, seed=8, correction=shift)
    want = reference_training(model, data, start, {"A": True, "B": True}, cfg, lr=0.02, seed=8, shift=shift)
    for name in start:
        for factor in "AB":
            np.testing.assert_allclose(np64(getattr(update.factors[name], factor)), np64(getattr(want[name], factor)),
                                       rtol=0, atol=100 * EPS32 * 3 * 0.02)


def test_a_client_round_keeps_its_variate_beside_the_methods_factors(fresh_tiny):
    """FedSA-LoRA with SCAFFOLD: the client starts from its own B (not its variates), is corrected by ``c − c_i``,
    and keeps its B and its new variate ``c_i⁺``, which a server holding the same tensors computes alike."""
    model, data, start = tiny_client(fresh_tiny)
    method = create("fedsa-lora")
    rng = np.random.default_rng(6)
    own = {"B": {name: pair.B for name, pair in start.items()},
           **{f"control_{f}": {name: torch.tensor(rng.standard_normal(getattr(pair, f).shape), dtype=torch.float32)
                               for name, pair in start.items()} for f in "AB"}}
    control = {f: {name: torch.zeros_like(getattr(p, f)) for name, p in start.items()} for f in "AB"}
    cfg = TrainConfig(local_steps=2, batch_size=2, scaffold=True)
    global_lora = {name: LoraPair(pair.A, torch.zeros_like(pair.B)) for name, pair in start.items()}
    update, _ = train_round(model, method, data, global_lora, {"A": True, "B": True}, cfg, rank=2, own=own,
                            control=control, lr=0.02, seed=9)
    assert set(update.keep) == {"B", "control_A", "control_B"}
    x = method.client_start(global_lora, own=corrections.method_part(own))
    assert all(torch.equal(x[name].B, start[name].B) for name in start)  # its own B, not the global zeros
    server_copy = corrections.client_variate(x, update.factors, control, own, {"A": True, "B": True}, 2, 0.02)
    for slot in ("control_A", "control_B"):
        assert all(torch.equal(update.keep[slot][n], server_copy[slot][n]) for n in start)


# --- whole runs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedit", "rolora", "fedsa-lora", "fedmomentum"])
def test_a_scaffold_run_keeps_the_server_variate_the_mean_of_all_clients(method, tmp_path, fresh_tiny, small_config):
    """With every variate starting at zero, ``c = (1/N) Σ_i c_i`` over all N clients after every round; clients that
    never trained hold none; RoLoRA's clients keep the variate of the factor they did not train this round."""
    config = small_config(tmp_path / "run", method=method, rounds=3, clients=3, clients_per_round=2, scaffold=True,
                          prox_mu=0.01, accuracy_per_family=0)
    simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    state, _ = checkpoint.load(tmp_path / "run" / driver.CHECKPOINT)
    trained = {cid for row in read_metrics(tmp_path / "run") for cid in row.get("client_ids", [])}
    assert set(state.clients) == trained
    assert set(state.control) == {"A", "B"}  # RoLoRA too: rounds 1–3 train B, A, B
    for factor in "AB":
        for name, c in state.control[factor].items():
            mean = sum(np64(kept[f"control_{factor}"][name]) for kept in state.clients.values()
                       if f"control_{factor}" in kept) / config.clients
            scale = max(np.abs(np64(kept[f"control_{factor}"][name])).max() for kept in state.clients.values()
                        if f"control_{factor}" in kept)
            np.testing.assert_allclose(np64(c), mean, rtol=0, atol=10 * config.rounds * EPS32 * scale)
            assert np.abs(np64(c)).max() > 0


def test_scaffold_and_fedprox_change_the_training_and_resume_exactly(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "full", method="fedit", rounds=3, scaffold=True, prox_mu=0.1,
                          accuracy_per_family=0)
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    plain = config.replace(out=str(tmp_path / "plain"), scaffold=False, prox_mu=0.0)
    simulation.run(plain, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    full, _ = checkpoint.load(tmp_path / "full" / driver.CHECKPOINT)
    other, _ = checkpoint.load(tmp_path / "plain" / driver.CHECKPOINT)
    assert not other.control and not other.clients
    assert any(not torch.equal(full.lora[n].B, other.lora[n].B) for n in full.lora)

    class Crash(RuntimeError):
        pass

    class CrashInRound(simulation.InProcess):
        def train_round(self, t, *args):
            if t == 3:
                raise Crash("power cut")
            return super().train_round(t, *args)

    crashing = config.replace(out=str(tmp_path / "crashed"))
    setup, engine = simulation.engine(crashing, copy.deepcopy(tiny_model[0]), tiny_model[1])
    with pytest.raises(Crash):
        driver.run(setup, CrashInRound(setup, engine.client_data), quiet=True)
    simulation.run(crashing, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
    resumed, _ = checkpoint.load(tmp_path / "crashed" / driver.CHECKPOINT)
    for name in full.lora:
        assert torch.equal(resumed.lora[name].A, full.lora[name].A)
        assert torch.equal(resumed.lora[name].B, full.lora[name].B)
    for factor, layers in full.control.items():
        assert all(torch.equal(resumed.control[factor][n], v) for n, v in layers.items())


@pytest.mark.parametrize("changes, message", [
    ({"prox_mu": -0.1}, "prox_mu"),
    ({"scaffold": True, "client_ranks": [2, 4, 4], "method": "fedmomentum"}, "scaffold keeps one control variate"),
])
def test_bad_correction_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(model="tiny", clients=3, lora_r=4, **changes).validate()


def test_an_update_without_variates_keeps_none():
    update = ClientUpdate({"a": LoraPair(torch.ones(1, 2), torch.ones(2, 1))}, 3)
    assert corrections.method_part({"control_A": {}}) is None
    B = {"a": torch.ones(2, 1)}
    assert corrections.method_part({"B": B, "control_A": {}}) == {"B": B}
    assert create("fedit").local_state(update) == {}
