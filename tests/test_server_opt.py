"""Server optimizers (``server_opt``: avgm, adam, yogi, adagrad) on every method, against dense float64 references.

The reference is Reddi et al.'s rule written here in numpy, on the dense quantities: for the methods that average
factors, on the factors the server sends back; for the others, on the layer's effective weight ``W + s B A``.
The method's own proposal (``server_opt="none"``, tested in ``test_methods.py``) is its input.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fedmomentum as fm
from fedmomentum import checkpoint, driver, simulation
from fedmomentum.records import read_metrics
from fedmomentum.state import ServerState

SCALING = 1.5
OPTS = ["avgm", "adam", "yogi", "adagrad"]
SETTINGS = {"avgm": dict(server_lr=0.7, server_momentum=0.8),
            "adam": dict(server_lr=0.05, server_betas=[0.8, 0.95], server_eps=0.05),
            "yogi": dict(server_lr=0.05, server_betas=[0.8, 0.95], server_eps=0.05),
            "adagrad": dict(server_lr=0.05, server_betas=[0.5, 0.0], server_eps=0.05)}
FACTOR_METHODS = ["fedit", "ffa-lora", "rolora", "fedsa-lora"]
PRODUCT_METHODS = ["fedmomentum", "fedex-lora", "flora", "flexlora", "frlora"]
# small layers, where avgm's momentum soon fills the matrix (kept dense from then on), and a larger one, where it
# stays factored for a round or two
LAYERS = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (10, 14),
          "model.layers.1.self_attn.q_proj": (40, 30)}
EPS = {"float32": np.finfo(np.float32).eps, "float64": np.finfo(np.float64).eps}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def reference_step(kind: str, delta: np.ndarray, m, v, settings: dict):
    """Reddi et al. 2021, Algorithm 2 (and FedAvgM), in float64: ``(u, m, v)``, ``m_0 = 0``, ``v_0 = τ²``."""
    lr, beta = settings.get("server_lr"), settings.get("server_momentum", 0.9)
    beta1, beta2 = settings.get("server_betas", [0.9, 0.99])
    tau = settings.get("server_eps", 1e-3)
    m = np.zeros_like(delta) if m is None else m
    if kind == "avgm":
        m = beta * m + delta
        return lr * m, m, None
    v = np.full_like(delta, tau**2) if v is None else v
    m = beta1 * m + (1 - beta1) * delta
    if kind == "adam":
        v = beta2 * v + (1 - beta2) * delta**2
    elif kind == "yogi":
        v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
    else:
        v = v + delta**2
    return lr * m / (np.sqrt(v) + tau), m, v


def gain(kind: str, settings: dict) -> float:
    """How much the step amplifies an error in ``Δ`` (its conditioning): ``η/(1−β)`` for avgm, ``η(1−β₁)/τ`` for
    the adaptive ones (``∂u/∂Δ`` is largest where ``√v`` is smallest, ``τ`` at the first step)."""
    if kind == "avgm":
        return settings["server_lr"] / (1 - settings["server_momentum"])
    return settings["server_lr"] * (1 - settings["server_betas"][0]) / settings["server_eps"]


def random_pair(rng, d, k, r, dtype=torch.float32) -> fm.LoraPair:
    return fm.LoraPair(torch.tensor(rng.standard_normal((r, k)) / np.sqrt(k), dtype=dtype),
                       torch.tensor(0.3 * rng.standard_normal((d, r)), dtype=dtype))


def client_updates(rng, global_lora, method, t, sizes=(5, 9, 3)) -> list[fm.ClientUpdate]:
    """Clients that moved the trained factors of the global adapter by a little noise (the frozen ones stay)."""
    trained = method.trainable(t)
    updates = []
    for index, n in enumerate(sizes):
        layers = {}
        for name, pair in global_lora.items():
            A, B = pair.A.float(), pair.B.float()
            if trained["A"]:
                A = A + torch.tensor(0.2 * rng.standard_normal(A.shape), dtype=torch.float32)
            if trained["B"]:
                B = B + torch.tensor(0.2 * rng.standard_normal(B.shape), dtype=torch.float32)
            layers[name] = fm.LoraPair(A, B)
        updates.append(fm.ClientUpdate(layers, n, client_id=f"client-{index}"))
    return updates


# --- the methods that average factors: the step on the factors ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", OPTS)
@pytest.mark.parametrize("name", FACTOR_METHODS)
def test_factor_averaging_methods_step_on_the_shared_factors(name, kind, dtype):
    rng = np.random.default_rng(1)
    settings = SETTINGS[kind]
    method = fm.methods.create(name, dtype=dtype, server_opt=kind, **settings)
    proposer = fm.methods.create(name, dtype="float64")  # the method itself: what it would set
    start = {layer: random_pair(rng, d, k, 3) for layer, (d, k) in LAYERS.items()}
    tested, state = start, {}
    reference = {layer: {f: np64(getattr(p, f)) for f in "AB"} for layer, p in start.items()}
    moments: dict = {}
    plain = start
    for t in range(1, 5):
        updates = client_updates(rng, tested, method, t)
        result = method.aggregate(tested, updates, scaling=SCALING, t=t, state=state)
        proposal = proposer.aggregate({layer: fm.LoraPair(torch.tensor(x["A"]), torch.tensor(x["B"]))
                                       for layer, x in reference.items()}, updates, scaling=SCALING, t=t)
        plain = proposer.aggregate(plain, updates, scaling=SCALING, t=t).lora
        shared = method.shared(t)
        for layer, x in reference.items():
            for factor in "AB":
                proposed = np64(getattr(proposal.lora[layer], factor))
                if shared[factor]:
                    key = (layer, factor)
                    u, *moments[key] = reference_step(kind, proposed - x[factor], *moments.get(key, (None, None)),
                                                      settings)
                    x[factor] = x[factor] + u
                else:
                    x[factor] = proposed
        tested, state = result.lora, result.state
        slots = {f"opt_m_{f}" for f in "AB" if any(method.shared(s)[f] for s in range(1, t + 1))}
        if kind != "avgm":
            slots |= {s.replace("_m_", "_v_") for s in slots}
        assert set(state) == slots
    tol = 50 * EPS[dtype] * (1 + gain(kind, settings)) * 4  # four rounds
    moved = 0.0
    for layer, x in reference.items():
        for factor in "AB":
            got, want = np64(getattr(tested[layer], factor)), x[factor]
            assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), (layer, factor)
            moved = max(moved, np.linalg.norm(np64(getattr(plain[layer], factor)) - want) / np.linalg.norm(want))
    assert moved > 1e3 * tol  # the optimizer changed the trajectory: the test would see a no-op


# --- the methods whose result is a product: the step on W + s B A -------------------------------------------------


def backbone_weights(rng) -> dict[str, torch.Tensor]:
    """Full-rank "pre-trained" weights (FRLoRA starts from their top-r part)."""
    return {layer: torch.tensor(rng.standard_normal((d, k)), dtype=torch.float32) for layer, (d, k) in LAYERS.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", OPTS)
@pytest.mark.parametrize("name, options", [("fedmomentum", {}), ("fedmomentum", {"merge_every": 2}),
                                           ("fedex-lora", {}), ("flora", {}), ("flexlora", {}), ("frlora", {})])
def test_product_methods_step_on_the_effective_weight(name, options, kind, dtype):
    """The adapter is the method's own, round after round; the effective weight ``W + s B A`` moves by the
    optimizer's step of the pseudo-updates ``Δ_t = D_t + s (B'A' − BA)``, as a dense float64 replay says."""
    rng = np.random.default_rng(2)
    settings = SETTINGS[kind]
    method = fm.methods.create(name, dtype=dtype, server_opt=kind, **settings, **options)
    plain = fm.methods.create(name, dtype=dtype, **options)
    adapter = {layer: random_pair(rng, d, k, 3) for layer, (d, k) in LAYERS.items()}
    if name == "frlora":
        adapter = plain.start(adapter, backbone_weights(rng), scaling=SCALING).lora
    tested = {layer: np.zeros((d, k)) for layer, (d, k) in LAYERS.items()}  # the backbone's change, tested
    replay = {layer: np.zeros(shape) for layer, shape in LAYERS.items()}  # W + s B A − (W₀ + s B₀ A₀), float64
    moments: dict = {}
    state, plain_state = {}, {}
    paths = set()  # avgm: factored and dense momenta seen
    for t in range(1, 5):
        updates = client_updates(rng, adapter, method, t)
        result = method.aggregate(adapter, updates, scaling=SCALING, t=t, state=state)
        proposal = plain.aggregate(adapter, updates, scaling=SCALING, t=t, state=plain_state)
        for layer, pair in adapter.items():
            new = result.lora[layer]
            assert torch.equal(new.A, proposal.lora[layer].A) and torch.equal(new.B, proposal.lora[layer].B)
            change = SCALING * (np64(new.B) @ np64(new.A) - np64(pair.B) @ np64(pair.A))
            D = np64(proposal.backbone[layer].dense()) if layer in proposal.backbone else 0.0
            u, *moments[layer] = reference_step(kind, D + change, *moments.get(layer, (None, None)), settings)
            replay[layer] += u
            tested[layer] += change + (np64(result.backbone[layer].dense()) if layer in result.backbone else 0.0)
            if kind == "avgm":  # factored while its factors are smaller than the dense matrix, then dense
                m = moments[layer][0]
                q = np.linalg.matrix_rank(m, tol=1e3 * EPS[dtype] * np.linalg.norm(m))
                d, k = m.shape
                factored = layer in result.state.get("opt_m_left", {})
                assert factored == (layer not in result.state.get("opt_m", {}))
                paths.add(factored)
                if factored:
                    assert result.stats["layers"][layer]["momentum_rank"] == q and (d + k) * q < d * k
                else:
                    assert "momentum_rank" not in result.stats["layers"][layer] and (d + k) * q >= d * k
        held = {"held_left", "held_right"} & set(proposal.state)
        slots = set(result.state) - held
        assert slots <= ({"opt_m_left", "opt_m_right", "opt_m"} if kind == "avgm" else {"opt_m", "opt_v"}) and slots
        assert set(result.state) & held == held
        for slot in held:  # the method's own state is the method's
            assert all(torch.equal(result.state[slot][k], proposal.state[slot][k]) for k in proposal.state[slot])
        adapter, state, plain_state = result.lora, result.state, proposal.state
    tol = 50 * EPS[dtype] * max(max(shape) for shape in LAYERS.values()) * (1 + gain(kind, settings)) * 4
    for layer, want in replay.items():
        scale = max(np.linalg.norm(want), max(np.linalg.norm(m) for m in moments[layer] if m is not None))
        assert np.linalg.norm(tested[layer] - want) <= tol * scale, layer
    assert result.stats["residual_rank"] == sum(d.rank for d in result.backbone.values())
    if kind == "avgm":  # FRLoRA's updates all lie in the rows of its frozen A₀: its momentum stays of rank ≤ r
        assert paths == ({True} if name == "frlora" else {True, False})


def test_the_adaptive_moments_are_dense_and_a_large_step_fills_the_delta():
    rng = np.random.default_rng(3)
    adapter = {layer: random_pair(rng, d, k, 2) for layer, (d, k) in LAYERS.items()}
    result = fm.methods.create("fedmomentum", server_opt="adam").aggregate(
        adapter, client_updates(rng, adapter, fm.methods.create("fedmomentum"), 1), scaling=SCALING)
    for layer, (d, k) in LAYERS.items():
        assert result.state["opt_m"][layer].shape == result.state["opt_v"][layer].shape == (d, k)
        assert result.backbone[layer].rank == min(d, k)  # the elementwise step is not low rank


# --- avgm with β = 0, η = 1 is the method itself -----------------------------------------------------------------


@pytest.mark.parametrize("name, options", [(n, {}) for n in fm.methods.names()] + [
    ("fedmomentum", {"merge_every": 2}), ("fedmomentum", {"residual_energy": 0.9, "compress_residual": True})])
def test_avgm_without_momentum_is_the_method_bit_for_bit(name, options):
    rng = np.random.default_rng(4)
    plain = fm.methods.create(name, **options)
    method = fm.methods.create(name, server_opt="avgm", server_momentum=0.0, server_lr=1.0, **options)
    adapter = {layer: random_pair(rng, d, k, 3) for layer, (d, k) in LAYERS.items()}
    if name == "frlora":
        adapter = plain.start(adapter, backbone_weights(rng), scaling=SCALING).lora
    ours, theirs, state, plain_state = adapter, adapter, {}, {}
    for t in range(1, 4):
        updates = client_updates(rng, theirs, plain, t)
        a = method.aggregate(ours, updates, scaling=SCALING, t=t, state=state)
        b = plain.aggregate(theirs, updates, scaling=SCALING, t=t, state=plain_state)
        for layer in adapter:
            assert torch.equal(a.lora[layer].A, b.lora[layer].A) and torch.equal(a.lora[layer].B, b.lora[layer].B)
        assert a.backbone.keys() == b.backbone.keys()
        for layer, delta in b.backbone.items():
            assert torch.equal(a.backbone[layer].left, delta.left)
            assert torch.equal(a.backbone[layer].right, delta.right)
        assert {k: v for k, v in a.state.items() if not k.startswith("opt_")}.keys() == b.state.keys()
        ours, theirs, state, plain_state = a.lora, b.lora, a.state, b.state


# --- options, state, resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"server_opt": "sgd"}, "server_opt = 'sgd': expected one of 'none', 'avgm', 'adam', 'yogi', 'adagrad'"),
    ({"server_lr": 0.0}, "server_lr must be > 0"),
    ({"server_momentum": 1.0}, r"server_momentum must be in \[0, 1\)"),
    ({"server_betas": [0.9]}, "server_betas must be two numbers"),
    ({"server_betas": [0.9, 1.0]}, "server_betas must be two numbers"),
    ({"server_eps": 0.0}, "server_eps must be > 0"),
    ({"server_lr": "fast"}, "server_lr"),
])
def test_server_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        fm.methods.create("fedit", **options)


def test_server_options_from_text_and_their_defaults():
    parsed = fm.methods.parse_options("fedmomentum", {"server_opt": "yogi", "server_betas": "0.8,0.9",
                                                      "server_lr": "none", "server_eps": "1e-4"})
    assert parsed == {"server_opt": "yogi", "server_betas": [0.8, 0.9], "server_lr": None, "server_eps": 1e-4}
    opt = fm.methods.create("fedmomentum", **parsed).server_opt
    assert (opt.kind, opt.lr, opt.betas, opt.eps) == ("yogi", 1e-3, (0.8, 0.9), 1e-4)  # lr: yogi's default
    assert fm.methods.create("fedit", server_opt="avgm").server_opt.lr == 1.0
    assert fm.methods.create("fedit").server_opt is None
    for name in fm.methods.names():  # every method has them
        assert {"server_opt", "server_lr", "server_momentum", "server_betas", "server_eps"} <= set(
            fm.methods.options(name))


@pytest.mark.parametrize("name, kind", [("fedit", "adam"), ("fedmomentum", "avgm"), ("flora", "yogi")])
def test_the_moments_survive_a_checkpoint(name, kind, tmp_path):
    """Rounds 1–2, the state written and read back, round 3: the same as three rounds in one go."""
    rng = np.random.default_rng(5)
    method = fm.methods.create(name, server_opt=kind)
    adapter = {layer: random_pair(rng, d, k, 3) for layer, (d, k) in LAYERS.items()}
    rounds = [client_updates(rng, adapter, method, t) for t in range(1, 4)]
    lora, state = adapter, {}
    for t, updates in enumerate(rounds[:2], 1):
        result = method.aggregate(lora, updates, scaling=SCALING, t=t, state=state)
        lora, state = result.lora, result.state
    checkpoint.save(tmp_path / "state.safetensors", ServerState(2, lora, method=state), {})
    saved, _ = checkpoint.load(tmp_path / "state.safetensors")
    again = method.aggregate(saved.lora, rounds[2], scaling=SCALING, t=3, state=saved.method)
    once = method.aggregate(lora, rounds[2], scaling=SCALING, t=3, state=state)
    for layer in adapter:
        assert torch.equal(again.lora[layer].A, once.lora[layer].A)
        assert torch.equal(again.lora[layer].B, once.lora[layer].B)
    assert again.backbone.keys() == once.backbone.keys()
    for layer, delta in once.backbone.items():
        assert torch.equal(again.backbone[layer].dense(), delta.dense())


def test_a_failed_aggregation_leaves_the_moments_alone():
    rng = np.random.default_rng(6)
    method = fm.methods.create("fedit", server_opt="adam")
    adapter = {layer: random_pair(rng, d, k, 3) for layer, (d, k) in LAYERS.items()}
    first = method.aggregate(adapter, client_updates(rng, adapter, method, 1), scaling=SCALING)
    kept = {slot: {k: v.clone() for k, v in layers.items()} for slot, layers in first.state.items()}
    bad = client_updates(rng, first.lora, method, 2)
    layer = next(iter(LAYERS))
    bad[0].factors[layer] = fm.LoraPair(bad[0].factors[layer].A, torch.full_like(bad[0].factors[layer].B, 1e38))
    with pytest.raises(fm.UpdateError, match="overflows float32"):
        method.aggregate(first.lora, bad, scaling=SCALING, t=2, state=first.state)
    assert all(torch.equal(first.state[s][k], kept[s][k]) for s in kept for k in kept[s])


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, kind", [(name, OPTS[i % len(OPTS)]) for i, name in enumerate(fm.methods.names())])
def test_every_method_runs_with_a_server_optimizer(method, kind, tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method=method, method_options={"server_opt": kind}, accuracy_per_family=0)
    summary = simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    state, _ = checkpoint.load(tmp_path / "run" / driver.CHECKPOINT)
    assert summary["rounds"] == 2 and np.isfinite(summary["final_eval_loss"])
    assert any(slot.startswith("opt_m") for slot in state.method)


class Crash(RuntimeError):
    pass


class CrashInRound(simulation.InProcess):
    def __init__(self, engine: simulation.InProcess, t: int):
        super().__init__(engine.setup, engine.client_data)
        self.crash_round = t

    def train_round(self, t, *args):
        if t == self.crash_round:
            raise Crash("power cut")
        return super().train_round(t, *args)


@pytest.mark.parametrize("method, options", [("fedit", {"server_opt": "avgm"}),
                                             ("fedmomentum", {"server_opt": "adam", "server_lr": 1e-3})])
def test_a_resumed_run_continues_with_the_same_moments(method, options, tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "full", method=method, rounds=3, method_options=options, accuracy_per_family=0)
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    full, _ = checkpoint.load(tmp_path / "full" / driver.CHECKPOINT)
    assert any(slot.startswith("opt_m") for slot in full.method)

    crashing = config.replace(out=str(tmp_path / "crashed"))
    setup, engine = simulation.engine(crashing, copy.deepcopy(tiny_model[0]), tiny_model[1])
    with pytest.raises(Crash):
        driver.run(setup, CrashInRound(engine, 3), quiet=True)
    simulation.run(crashing, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
    resumed, _ = checkpoint.load(tmp_path / "crashed" / driver.CHECKPOINT)
    for name in full.lora:
        assert torch.equal(resumed.lora[name].A, full.lora[name].A)
        assert torch.equal(resumed.lora[name].B, full.lora[name].B)
        assert torch.equal(resumed.backbone[name], full.backbone[name])
    for slot, layers in full.method.items():
        assert all(torch.equal(resumed.method[slot][k], v) for k, v in layers.items())
    assert [r["eval_loss"] for r in read_metrics(tmp_path / "crashed")] == [
        r["eval_loss"] for r in read_metrics(tmp_path / "full")]
