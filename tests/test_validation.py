"""Server-side state across rounds (``merge_every``, checkpoints), bad inputs, and no in-place mutation."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import fedmomentum as fm

SCALING = 2.0
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 20), "model.layers.0.self_attn.o_proj": (20, 32)}


def initial_adapter(rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: fm.LoraPair(torch.randn(rank, k, generator=g) / k**0.5, torch.randn(d, rank, generator=g))
            for name, (d, k) in SHAPES.items()}


def clients_from(global_lora, round, n_clients=4, step=0.3):
    """Clients that start from the broadcast adapter and move it (seeded by round): feedback across rounds."""
    g = torch.Generator().manual_seed(1000 + round)
    updates = []
    for i in range(n_clients):
        layers = {name: fm.LoraPair(p.A + step * torch.randn(p.A.shape, generator=g),
                                    p.B + step * torch.randn(p.B.shape, generator=g))
                  for name, p in global_lora.items()}
        updates.append(fm.ClientUpdate(layers, num_examples=5 + 7 * i, client_id=f"site-{i}"))
    return updates


def dense(x) -> np.ndarray:
    if isinstance(x, fm.LowRank):
        return x.left.double().numpy() @ x.right.double().numpy()
    return x.B.double().numpy() @ x.A.double().numpy()


def target(updates, name) -> np.ndarray:
    n = np.array([u.num_examples for u in updates], float)
    return SCALING * sum(w * dense(u.factors[name]) for w, u in zip(n / n.sum(), updates, strict=True))


def run(method, rounds, start=0, global_lora=None, state=None):
    """``rounds`` rounds after round ``start``, feeding each new adapter (and the method's state) back; the
    aggregates and inputs."""
    global_lora = global_lora or initial_adapter()
    history = []
    for index in range(start, start + rounds):
        updates = clients_from(global_lora, index)
        agg = method.aggregate(global_lora, updates, scaling=SCALING, t=index + 1, state=state)
        history.append((global_lora, updates, agg))
        global_lora, state = agg.lora, agg.state
    return history


def assert_same_aggregate(a: fm.Aggregate, b: fm.Aggregate):
    assert a.lora.keys() == b.lora.keys() and a.backbone.keys() == b.backbone.keys()
    for name in a.lora:
        assert torch.equal(a.lora[name].A, b.lora[name].A) and torch.equal(a.lora[name].B, b.lora[name].B)
    for name in a.backbone:
        assert torch.equal(a.backbone[name].left, b.backbone[name].left)
        assert torch.equal(a.backbone[name].right, b.backbone[name].right)


# --- merge_every and the method's state -----------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_held_residual_is_released_every_k_rounds(k):
    method = fm.methods.create("fedmomentum", merge_every=k)
    assert not method.exact
    history = run(method, 2 * k)
    for t, (_, _, agg) in enumerate(history, start=1):
        held = agg.state.get("held_left", {})
        if t % k:
            assert not agg.backbone
            assert all(s["held_rank"] > 0 for s in agg.stats["layers"].values())
            assert set(held) == set(SHAPES)  # the state to carry on travels with the result
            assert all(held[n].shape[1] == s["held_rank"] for n, s in agg.stats["layers"].items())
        else:
            assert set(agg.backbone) == set(SHAPES)
            assert all("held_rank" not in s for s in agg.stats["layers"].values()) and not agg.state
    assert vars(method) == vars(fm.methods.create("fedmomentum", merge_every=k))  # the method never changed


@pytest.mark.parametrize("k", [1, 3])
def test_a_release_cycle_is_exact(k):
    """Over a cycle of k rounds: Σ backbone deltas + s·(final adapter) = s·(initial adapter) + Σ_t (what the
    clients' average moved the model in round t), i.e. Σ_t (s Σ p_i B_i A_i − s·(adapter broadcast in t))."""
    method = fm.methods.create("fedmomentum", merge_every=k)
    history = run(method, 2 * k)
    for cycle in (history[:k], history[k:]):
        start = cycle[0][0]
        for name in SHAPES:
            expected = SCALING * dense(start[name])
            for global_lora, updates, _ in cycle:
                expected += target(updates, name) - SCALING * dense(global_lora[name])
            got = sum(dense(agg.backbone[name]) for *_, agg in cycle if name in agg.backbone)
            got = got + SCALING * dense(cycle[-1][2].lora[name])
            assert np.linalg.norm(got - expected) <= 2e-5 * np.linalg.norm(expected)
            # and the held residual is really held: without it the sum falls short
            held = sum(dense(agg.backbone[name]) for *_, agg in cycle if name in agg.backbone)
            assert np.linalg.norm(held) > 1e-3 * np.linalg.norm(expected)


def test_merge_every_only_delays_the_residual():
    """Same client updates: merge_every=3 gives the same adapters as merge_every=1 each round, and its one
    release equals the sum of the three per-round residuals."""
    history = run(fm.methods.create("fedmomentum", merge_every=1), 3)
    delayed = fm.methods.create("fedmomentum", merge_every=3)
    released, state = None, {}
    for t, (global_lora, updates, agg) in enumerate(history, start=1):
        late = delayed.aggregate(global_lora, updates, scaling=SCALING, t=t, state=state)
        for name in SHAPES:
            assert torch.equal(late.lora[name].A, agg.lora[name].A)
            assert torch.equal(late.lora[name].B, agg.lora[name].B)
        released, state = late.backbone, late.state
    for name in SHAPES:
        expected = sum(dense(agg.backbone[name]) for *_, agg in history)
        np.testing.assert_allclose(dense(released[name]), expected, rtol=0, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("save_after", [1, 2])
def test_the_state_round_trips_through_safetensors_mid_cycle(save_after):
    """The state after round ``save_after``, written and read back as a checkpoint holds it, continues the run
    exactly; without it, the held residual is lost."""
    method = fm.methods.create("fedmomentum", merge_every=3)
    history = run(method, 3)
    state = history[save_after - 1][2].state
    assert state and all(isinstance(v, torch.Tensor) for layers in state.values() for v in layers.values())
    flat = load_safetensors(save_safetensors({f"{slot}/{name}": v.contiguous() for slot, layers in state.items()
                                              for name, v in layers.items()}))
    restored = {}
    for key, value in flat.items():
        slot, name = key.split("/")
        restored.setdefault(slot, {})[name] = value
    for t in range(save_after + 1, 4):
        global_lora, updates, expected = history[t - 1]
        resumed = method.aggregate(global_lora, updates, scaling=SCALING, t=t, state=restored)
        assert_same_aggregate(resumed, expected)
        lost = method.aggregate(global_lora, updates, scaling=SCALING, t=t)
        restored = resumed.state
    name = next(iter(SHAPES))
    assert not np.allclose(dense(lost.backbone[name]), dense(history[2][2].backbone[name]))  # state matters


def test_a_failed_aggregation_changes_nothing():
    """An aggregation that raises (a NaN update in round 2) leaves the method and the state given to it as they
    were: the same round with good updates then gives exactly the result it would have given."""
    method = fm.methods.create("fedmomentum", merge_every=3)
    (global_lora, _, first), (_, updates, expected) = run(method, 2)
    before = {slot: {n: v.clone() for n, v in layers.items()} for slot, layers in first.state.items()}
    attributes = copy.deepcopy(vars(method))
    bad = copy.deepcopy(updates)
    replace_layer(bad[1], Q, B=torch.full_like(bad[1].factors[Q].B, float("nan")))
    with pytest.raises(fm.UpdateError, match="NaN"):
        method.aggregate(first.lora, bad, scaling=SCALING, t=2, state=first.state)
    assert vars(method).keys() == attributes.keys()
    assert all(torch.equal(v, before[slot][n]) for slot, layers in first.state.items() for n, v in layers.items())
    assert_same_aggregate(method.aggregate(first.lora, updates, scaling=SCALING, t=2, state=first.state), expected)


def test_a_state_from_another_model_is_refused():
    global_lora, updates = good_round()
    with pytest.raises(fm.UpdateError, match="'held_left' for layer 'nowhere'"):
        fm.methods.create("fedmomentum", merge_every=2).aggregate(
            global_lora, updates, scaling=SCALING, state={"held_left": {"nowhere": torch.zeros(2, 1)}})


# --- bad inputs ------------------------------------------------------------------------------------------


def good_round(rank=3, n_clients=3):
    global_lora = initial_adapter(rank)
    return global_lora, clients_from(global_lora, 0, n_clients)


def replace_layer(update, name, A=None, B=None):
    pair = update.factors[name]
    update.factors[name] = fm.LoraPair(pair.A if A is None else A, pair.B if B is None else B)


Q, O = list(SHAPES)


def missing_layer(updates):
    del updates[1].factors[O]


def extra_layer(updates):
    updates[1].factors["model.layers.0.self_attn.k_proj"] = updates[1].factors[Q]


def wrong_in_features(updates):
    replace_layer(updates[1], O, A=torch.zeros(3, 33))


def wrong_out_features(updates):
    replace_layer(updates[1], O, B=torch.zeros(21, 3))


def rank_mismatch(updates):
    replace_layer(updates[1], O, B=torch.zeros(20, 4))


def not_a_matrix(updates):
    replace_layer(updates[1], O, A=torch.zeros(3, 32, 1))


def nan_in_A(updates):
    A = updates[1].factors[O].A.clone()
    A[2, 5] = float("nan")
    replace_layer(updates[1], O, A=A)


def inf_in_B(updates):
    B = updates[1].factors[O].B.clone()
    B[0, 0] = float("inf")
    replace_layer(updates[1], O, B=B)


def minus_inf_in_B(updates):
    B = updates[1].factors[O].B.clone()
    B[-1, -1] = float("-inf")
    replace_layer(updates[1], O, B=B)


LAYER_ERRORS = [missing_layer, extra_layer, wrong_in_features, wrong_out_features, rank_mismatch, not_a_matrix,
                nan_in_A, inf_in_B, minus_inf_in_B]


@pytest.mark.parametrize("name", fm.methods.names())
@pytest.mark.parametrize("spoil", LAYER_ERRORS, ids=[f.__name__ for f in LAYER_ERRORS])
def test_bad_layers_name_the_client_and_the_layer(name, spoil):
    global_lora, updates = good_round()
    spoil(updates)
    with pytest.raises(fm.UpdateError) as error:
        fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "site-1" in message
    layer = "k_proj" if spoil is extra_layer else "o_proj"
    assert layer in message, message


@pytest.mark.parametrize("name", fm.methods.names())
@pytest.mark.parametrize("n", [0, -4, 2.5, "10", None, True])
def test_bad_example_counts_name_the_client(name, n):
    global_lora, updates = good_round()
    updates[2].num_examples = n
    with pytest.raises(fm.UpdateError, match=r"site-2.*num_examples"):
        fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)


def test_numpy_integer_example_counts_are_fine():
    global_lora, updates = good_round()
    for u in updates:
        u.num_examples = np.int64(u.num_examples)
    agg = fm.methods.create("fedmomentum").aggregate(global_lora, updates, scaling=SCALING)
    assert all(isinstance(v.A, torch.Tensor) for v in agg.lora.values())


def test_unnamed_clients_are_named_by_position():
    global_lora, updates = good_round()
    updates[2].client_id = ""
    nan_in_A([updates[0], updates[2]])
    with pytest.raises(fm.UpdateError, match=r"client 2, layer .*o_proj"):
        fm.methods.create("fedit").aggregate(global_lora, updates, scaling=SCALING)


@pytest.mark.parametrize("name", fm.methods.names())
def test_no_updates(name):
    with pytest.raises(fm.UpdateError, match="no client updates"):
        fm.methods.create(name).aggregate(initial_adapter(), [], scaling=SCALING)


def test_unknown_methods_and_options():
    with pytest.raises(ValueError, match="'fedprox'"):
        fm.methods.create("fedprox")
    with pytest.raises(ValueError, match="momentum_decay"):
        fm.methods.create("fedmomentum", momentum_decay=0.9)
    with pytest.raises(ValueError, match="residual_energy"):
        fm.methods.create("fedit", residual_energy=0.9)  # an option of another method
    for bad in [dict(residual_energy=0.0), dict(residual_energy=1.2), dict(split="diagonal"), dict(svd="qr"),
                dict(merge_every=0), dict(merge_every=1.5), dict(weighting="tokens"), dict(dtype="float16")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            fm.methods.create("fedmomentum", **bad)


# --- no in-place mutation, no aliasing -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", fm.methods.names())
def test_inputs_are_left_untouched(name, dtype):
    global_lora, updates = good_round()
    if name in ("ffa-lora", "rolora"):  # their valid input: a frozen factor shared with the global adapter
        for u in updates:
            for layer, pair in u.factors.items():
                u.factors[layer] = fm.LoraPair(global_lora[layer].A.clone(), pair.B)
    before = copy.deepcopy((global_lora, updates))
    method = fm.methods.create(name, dtype=dtype, **({"merge_every": 2} if name == "fedmomentum" else {}))
    first = method.aggregate(global_lora, updates, scaling=SCALING, t=1)
    outputs = [first, method.aggregate(global_lora, updates, scaling=SCALING, t=2, state=first.state)]

    def tensors(obj):
        g, us = obj
        return [t for p in g.values() for t in (p.A, p.B)] + [t for u in us for p in u.factors.values()
                                                                for t in (p.A, p.B)]

    for old, new in zip(tensors(before), tensors((global_lora, updates)), strict=True):
        assert torch.equal(old, new) and old.dtype == new.dtype
    # writing into the results does not reach the callers' tensors either
    for agg in outputs:
        for pair in agg.lora.values():
            pair.A.add_(1.0)
            pair.B.add_(1.0)
        for delta in agg.backbone.values():
            delta.left.add_(1.0)
            delta.right.add_(1.0)
    for old, new in zip(tensors(before), tensors((global_lora, updates)), strict=True):
        assert torch.equal(old, new)


# --- what the Python API refuses: scaling, the global adapter, overflow, option types ---------------------------


@pytest.mark.parametrize("name", fm.methods.names())
@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), 0.0, -1.0, True, "2.0", None])
def test_bad_scaling_is_refused(name, scaling):
    global_lora, updates = good_round()
    with pytest.raises(fm.UpdateError, match="scaling"):
        fm.methods.create(name).aggregate(global_lora, updates, scaling=scaling)


@pytest.mark.parametrize("name", fm.methods.names())
@pytest.mark.parametrize("t", [0, -1, 1.5, "1", True])
def test_bad_round_is_refused(name, t):
    global_lora, updates = good_round()
    with pytest.raises(fm.UpdateError, match="round t"):
        fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING, t=t)


@pytest.mark.parametrize("name", fm.methods.names())
@pytest.mark.parametrize("bad", ["nan_A", "inf_B", "shapes", "not_a_pair"])
def test_a_bad_global_adapter_is_refused(name, bad):
    global_lora, updates = good_round()
    pair = global_lora[O]
    if bad == "nan_A":
        A = pair.A.clone()
        A[0, 0] = float("nan")
        global_lora[O] = fm.LoraPair(A, pair.B)
    elif bad == "inf_B":
        B = pair.B.clone()
        B[1, 1] = float("inf")
        global_lora[O] = fm.LoraPair(pair.A, B)
    elif bad == "shapes":
        global_lora[O] = fm.LoraPair(pair.A, pair.B[:, :2])
    else:
        global_lora[O] = (pair.A, pair.B)
    with pytest.raises(fm.UpdateError, match=r"global adapter, layer .*o_proj"):
        fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)


def huge_round(factor=1e20):
    """Finite client factors whose products (≈1e40) overflow float32."""
    global_lora, updates = good_round()
    for u in updates:
        for layer, pair in u.factors.items():
            u.factors[layer] = fm.LoraPair(pair.A * factor, pair.B * factor)
    return global_lora, updates


@pytest.mark.parametrize("name", ["fedit", "flora", "fedex-lora", "flexlora", "fedmomentum"])
def test_an_aggregate_that_overflows_float32_is_refused(name):
    """FedIT used to return an infinite noise silently and the SVD methods raised torch's _LinAlgError."""
    global_lora, updates = huge_round()
    with pytest.raises(fm.UpdateError, match=r"layer .*(overflows float32|SVD).*float64") as error:
        fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)
    assert isinstance(error.value, ValueError)
    # in float64 the same input is fine: the refusal is about overflow, not about large values
    agg = fm.methods.create(name, dtype="float64").aggregate(global_lora, updates, scaling=SCALING)
    tensors = [t for p in agg.lora.values() for t in (p.A, p.B)]
    tensors += [t for d in agg.backbone.values() for t in (d.left, d.right)]
    assert all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("name", ["ffa-lora", "rolora"])
def test_averaging_one_factor_of_large_values_is_still_finite(name):
    global_lora, updates = huge_round()
    for u in updates:  # these methods train one factor; the other is the broadcast one
        for layer, pair in u.factors.items():
            u.factors[layer] = fm.LoraPair(global_lora[layer].A.clone(), pair.B)
    agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)
    assert all(bool(torch.isfinite(p.B).all()) and p.B.abs().max() > 1e18 for p in agg.lora.values())


@pytest.mark.parametrize("options, key", [
    (dict(merge_residual="no"), "merge_residual"), (dict(merge_residual=0), "merge_residual"),
    (dict(residual_energy="0.9"), "residual_energy"), (dict(residual_energy=float("nan")), "residual_energy"),
    (dict(merge_every=True), "merge_every"), (dict(merge_every="2"), "merge_every"),
    (dict(seed="1"), "seed"), (dict(seed=1.0), "seed"), (dict(weighting=1), "weighting"),
    (dict(split=["left"]), "split"), (dict(dtype=None), "dtype"),
])
def test_options_of_the_wrong_type_are_refused(options, key):
    with pytest.raises(ValueError, match=key):
        fm.methods.create("fedmomentum", **options)


@pytest.mark.parametrize("options, key", [(dict(merge_residual="no"), "merge_residual"),
                                          (dict(residual_energy="0.9"), "residual_energy"),
                                          (dict(seed="1"), "seed")])
def test_the_method_class_refuses_wrong_types_too(options, key):
    from fedmomentum.methods import FedMomentum

    with pytest.raises(ValueError, match=key):
        FedMomentum(**options)


def test_options_of_the_right_type_are_kept():
    method = fm.methods.create("fedmomentum", residual_energy=1, merge_residual=False, merge_every=np.int64(2),
                               seed=3, dtype="float64")
    assert (method.residual_energy, method.merge_residual, method.merge_every, method.seed) == (1, False, 2, 3)


def test_text_options_are_converted_by_their_declared_type():
    parsed = fm.methods.parse_options("fedmomentum", {"residual_energy": "9.9e-1", "merge_residual": "false",
                                                      "merge_every": "2", "split": "left", "seed": 4})
    assert parsed == {"residual_energy": 0.99, "merge_residual": False, "merge_every": 2, "split": "left",
                      "seed": 4}
    fm.methods.create("fedmomentum", **parsed)
    with pytest.raises(ValueError, match=r"fedmomentum option residual_energy = 'abc': expected a finite number"):
        fm.methods.parse_options("fedmomentum", {"residual_energy": "abc"})
    assert fm.methods.option_types("flexlora") == {
        "split": Literal["balanced", "left"], "svd": Literal["auto", "factored", "dense", "sketch", "randomized"],
        "weighting": Literal["examples", "uniform"], "dtype": Literal["float32", "float64"], "seed": int,
        "batched": bool, "server_opt": Literal["none", "avgm", "adam", "yogi", "adagrad"],
        "server_lr": float | None, "server_momentum": float, "server_betas": list[float], "server_eps": float}
