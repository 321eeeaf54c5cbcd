"""The aggregation methods against dense numpy float64 references.

For every case the reference is built here from the clients' factors alone: the exact aggregate
``s · Σ p_i B_i A_i`` as a dense matrix, and its SVD from ``numpy.linalg.svd``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmomentum as fm

F32, F64 = 3e-5, 1e-11  # relative tolerances for the two aggregation dtypes
SCALING = 1.5

# (d, k, client ranks, global rank): square, d≠k, tiny, tall, wide, and N·r > min(d, k)
CASES = [
    (24, 24, [4, 4, 4], 4),
    (40, 18, [3, 3, 3, 3, 3], 3),
    (3, 2, [1, 1, 1], 1),
    (300, 8, [2, 2, 2, 2], 2),
    (8, 200, [4, 4], 4),
    (6, 5, [3, 3, 3, 3], 3),
]
CASE_IDS = ["square", "d!=k", "tiny", "tall", "wide", "Nr>min(d,k)"]


def layer_shapes(d, k):
    return {"model.layers.0.self_attn.q_proj": (d, k), "model.layers.0.self_attn.v_proj": (k, d)}


def make_round(seed, d, k, ranks, rank, *, examples=None, shared=None, same=False):
    """A global adapter (rank ``rank``) and one update per entry of ``ranks``.

    ``shared="A"`` / ``"B"``: every client keeps the global factor of that name (FFA-LoRA / RoLoRA's valid input);
    ``same=True``: every client returns the same factors.
    """
    rng = np.random.default_rng(seed)

    def factors(d_, k_, r):
        return fm.LoraPair(torch.tensor(rng.standard_normal((r, k_)) / np.sqrt(k_), dtype=torch.float32),
                           torch.tensor(rng.standard_normal((d_, r)), dtype=torch.float32))

    shapes = layer_shapes(d, k)
    global_lora = {name: factors(*shape, rank) for name, shape in shapes.items()}
    examples = examples or [int(n) for n in rng.integers(1, 60, len(ranks))]
    first = None
    updates = []
    for index, (r, n) in enumerate(zip(ranks, examples, strict=True)):
        layers = first if same and first else {name: factors(*shape, r) for name, shape in shapes.items()}
        first = first or layers
        if shared == "A":
            layers = {name: fm.LoraPair(global_lora[name].A.clone(), p.B) for name, p in layers.items()}
        elif shared == "B":
            layers = {name: fm.LoraPair(p.A, global_lora[name].B.clone()) for name, p in layers.items()}
        updates.append(fm.ClientUpdate(layers, n, client_id=f"client-{index}"))
    return global_lora, updates


def weights_of(updates, weighting="examples"):
    n = np.array([u.num_examples for u in updates], dtype=float)
    return n / n.sum() if weighting == "examples" else np.full(len(n), 1.0 / len(n))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def target(updates, name, p, scaling=SCALING) -> np.ndarray:
    """``s · Σ p_i B_i A_i``, dense, float64."""
    return scaling * sum(w * np64(u.factors[name].B) @ np64(u.factors[name].A) for w, u in zip(p, updates, strict=True))


def merged(agg: fm.Aggregate, name, scaling=SCALING) -> np.ndarray:
    """``D + s·B'A'``: what the clients' models become after applying the aggregate."""
    pair = agg.lora[name]
    out = scaling * np64(pair.B) @ np64(pair.A)
    if name in agg.backbone:
        out = out + np64(agg.backbone[name].left) @ np64(agg.backbone[name].right)
    return out


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def truncated(M: np.ndarray, r: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


EXACT = [
    ("flora", {}),
    ("fedex-lora", {}),
    ("fedmomentum", {}),
    ("fedmomentum", {"split": "left"}),
    ("fedmomentum", {"svd": "dense"}),
    ("fedmomentum", {"svd": "randomized"}),
    ("fedmomentum", {"compress_residual": True}),
]


@pytest.mark.parametrize("dtype, tol", [("float32", F32), ("float64", F64)])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name, opts", EXACT, ids=[f"{n}{o}" for n, o in EXACT])
def test_exact_methods_keep_the_weighted_average(name, opts, case, dtype, tol):
    d, k, ranks, rank = case
    global_lora, updates = make_round(11, d, k, ranks, rank)
    method = fm.methods.create(name, dtype=dtype, **opts)
    assert method.exact
    agg = method.aggregate(global_lora, updates, scaling=SCALING)
    p = weights_of(updates)
    for layer in global_lora:
        assert agg.lora[layer].A.dtype == getattr(torch, dtype)
        assert agg.lora[layer].A.shape == global_lora[layer].A.shape
        assert agg.lora[layer].B.shape == global_lora[layer].B.shape
        expected = target(updates, layer, p)
        assert rel(merged(agg, layer), expected) < (1e-4 if opts.get("svd") == "randomized" else tol)


@pytest.mark.parametrize("name, shared, rounds", [("ffa-lora", "A", [1, 2, 3]), ("rolora", "A", [1, 3]),
                                                  ("rolora", "B", [2, 4])])
@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_one_factor_methods_are_exact_with_a_shared_frozen_factor(name, shared, rounds, case):
    d, k, ranks, rank = case
    global_lora, updates = make_round(12, d, k, [rank] * len(ranks), rank, shared=shared)
    method = fm.methods.create(name)
    p = weights_of(updates)
    for t in rounds:
        assert method.trainable(t) == {"A": shared != "A", "B": shared != "B"}
        agg = method.aggregate(global_lora, updates, scaling=SCALING, t=t)
        assert not agg.backbone
        for layer, pair in global_lora.items():
            frozen = agg.lora[layer].A if shared == "A" else agg.lora[layer].B
            assert torch.equal(frozen, pair.A if shared == "A" else pair.B)  # the frozen factor is kept as is
            assert rel(merged(agg, layer), target(updates, layer, p)) < F32


def test_rolora_alternates_and_ffa_lora_freezes_A():
    rolora, ffa = fm.methods.create("rolora"), fm.methods.create("ffa-lora")
    assert [rolora.trainable(t) for t in range(1, 5)] == [{"A": False, "B": True}, {"A": True, "B": False}] * 2
    assert rolora.trainable(0) == rolora.trainable(1)  # before training: as round 1
    assert all(ffa.trainable(t) == {"A": False, "B": True} for t in range(5))
    # with a shared B, RoLoRA's even round averages A; in an odd round it would keep the global A instead
    global_lora, updates = make_round(13, 20, 16, [3, 3, 3], 3, shared="B")
    p = weights_of(updates)
    even = rolora.aggregate(global_lora, updates, scaling=1.0, t=2)
    odd = rolora.aggregate(global_lora, updates, scaling=1.0, t=3)
    for layer, pair in global_lora.items():
        mean_A = sum(w * np64(u.factors[layer].A) for w, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(np64(even.lora[layer].A), mean_A, rtol=0, atol=1e-6)
        assert torch.equal(odd.lora[layer].A, pair.A)


@pytest.mark.parametrize("split", ["balanced", "left"])
@pytest.mark.parametrize("case", [c for c in CASES if min(c[0], c[1]) >= c[3]],
                         ids=[i for c, i in zip(CASES, CASE_IDS, strict=True) if min(c[0], c[1]) >= c[3]])
def test_fedmomentum_adapter_is_the_best_rank_r_part(split, case):
    d, k, ranks, rank = case
    global_lora, updates = make_round(14, d, k, ranks, rank)
    agg = fm.methods.create("fedmomentum", split=split).aggregate(global_lora, updates, scaling=SCALING)
    p = weights_of(updates)
    for layer in global_lora:
        M = target(updates, layer, p, scaling=1.0)
        S = np.linalg.svd(M, compute_uv=False)[:rank]
        B, A = np64(agg.lora[layer].B), np64(agg.lora[layer].A)
        tol = F32 * S[0]
        np.testing.assert_allclose(B @ A, truncated(M, rank), rtol=0, atol=tol)
        if split == "balanced":  # B' = U_r √S_r, A' = √S_r V_rᵀ
            np.testing.assert_allclose(B.T @ B, np.diag(S), rtol=0, atol=tol)
            np.testing.assert_allclose(A @ A.T, np.diag(S), rtol=0, atol=tol)
        else:  # B' = U_r S_r, A' = V_rᵀ (orthonormal rows)
            np.testing.assert_allclose(A @ A.T, np.eye(rank), rtol=0, atol=F32)
            np.testing.assert_allclose(B.T @ B, np.diag(S**2), rtol=0, atol=tol * S[0])
            np.testing.assert_allclose(B, M @ A.T, rtol=0, atol=tol)


def test_fedmomentum_restarts_slots_the_aggregate_cannot_fill():
    """Rank-r adapter, but Σ p_i B_i A_i of rank 1 (all clients send the same rank-1 product): one live slot,
    the others get B column 0 and a fresh (nonzero, seeded) A row; still exact."""
    global_lora, updates = make_round(15, 30, 20, [1, 1, 1], 4, same=True)
    method = fm.methods.create("fedmomentum")
    agg = method.aggregate(global_lora, updates, scaling=SCALING, t=4)
    again = fm.methods.create("fedmomentum").aggregate(global_lora, updates, scaling=SCALING, t=4)
    p = weights_of(updates)
    for layer in global_lora:
        B, A = np64(agg.lora[layer].B), np64(agg.lora[layer].A)
        assert np.linalg.norm(B[:, 0]) > 0 and np.all(B[:, 1:] == 0)
        assert np.all(np.linalg.norm(A[1:], axis=1) > 0)
        assert torch.equal(agg.lora[layer].A, again.lora[layer].A)  # seeded
        assert layer not in agg.backbone
        assert rel(merged(agg, layer), target(updates, layer, p)) < F32


@settings(max_examples=25, deadline=None)
@given(st.floats(0.05, 0.999), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_fedmomentum_residual_energy_drops_at_most_and_no_more_than_allowed(tau, seed, rank):
    # clients of decaying size, so the spectrum has a tail worth cutting
    global_lora, updates = make_round(seed, 40, 30, [rank] * 6, rank)
    for i, u in enumerate(updates):
        for layer, pair in list(u.factors.items()):
            u.factors[layer] = fm.LoraPair(pair.A, pair.B * 0.6**i)
    agg = fm.methods.create("fedmomentum", residual_energy=tau).aggregate(global_lora, updates, scaling=SCALING)
    p = weights_of(updates)
    for layer in global_lora:
        M = target(updates, layer, p)
        sq = np.linalg.svd(M, compute_uv=False) ** 2
        backbone = np64(agg.backbone[layer].dense()) if layer in agg.backbone else np.zeros_like(M)
        r_eff = rank + np.linalg.matrix_rank(backbone, tol=1e-4 * np.sqrt(sq[0]))
        got = merged(agg, layer)
        dropped = np.linalg.norm(M - got) ** 2 / sq.sum()
        assert dropped <= 1 - tau + 1e-5  # at most what τ allows
        assert r_eff == rank or sq[: r_eff - 1].sum() < tau * sq.sum() * (1 + 1e-5)  # r_eff is minimal
        np.testing.assert_allclose(got, truncated(M, r_eff), rtol=0, atol=1e-4 * np.sqrt(sq[0]))
        assert agg.stats["layers"][layer]["energy_dropped"] == pytest.approx(dropped, abs=1e-5)
        assert agg.stats["layers"][layer]["residual_rank"] == r_eff - rank


def test_fedmomentum_without_residual_merge_is_flexlora():
    global_lora, updates = make_round(16, 30, 24, [3] * 5, 3)
    p = weights_of(updates)
    plain = fm.methods.create("fedmomentum", merge_residual=False)
    assert not plain.exact
    agg = plain.aggregate(global_lora, updates, scaling=SCALING)
    flex = fm.methods.create("flexlora").aggregate(global_lora, updates, scaling=SCALING)
    assert not agg.backbone and not flex.backbone and agg.stats["residual_rank"] == 0
    for layer in global_lora:
        M = target(updates, layer, p)
        sq = np.linalg.svd(M, compute_uv=False) ** 2
        for result in (agg, flex):
            np.testing.assert_allclose(merged(result, layer), truncated(M, 3), rtol=0, atol=F32 * np.sqrt(sq[0]))
            assert result.stats["layers"][layer]["energy_dropped"] == pytest.approx(sq[3:].sum() / sq.sum(), rel=1e-4)
        assert rel(merged(agg, layer), M) > 0.1  # a real loss: the test would notice an exact result
    assert 0 < agg.stats["energy_dropped"] < 1


def test_fedit_averages_factors_and_reports_the_noise():
    global_lora, updates = make_round(17, 30, 20, [3] * 4, 3)
    p = weights_of(updates)
    agg = fm.methods.create("fedit").aggregate(global_lora, updates, scaling=SCALING)
    total = 0.0
    for layer in global_lora:
        mean_B = sum(w * np64(u.factors[layer].B) for w, u in zip(p, updates, strict=True))
        mean_A = sum(w * np64(u.factors[layer].A) for w, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(np64(agg.lora[layer].B), mean_B, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np64(agg.lora[layer].A), mean_A, rtol=0, atol=1e-6)
        noise = np.linalg.norm(target(updates, layer, p) - SCALING * mean_B @ mean_A)
        assert noise > 0.1 * np.linalg.norm(target(updates, layer, p))
        assert agg.stats["layers"][layer]["noise_norm"] == pytest.approx(noise, rel=1e-4)
        total += noise**2
    assert agg.stats["noise_norm"] == pytest.approx(np.sqrt(total), rel=1e-4)
    assert not agg.backbone

    global_lora, same = make_round(17, 30, 20, [3] * 4, 3, same=True)
    agg = fm.methods.create("fedit").aggregate(global_lora, same, scaling=SCALING)
    for layer in global_lora:
        assert agg.stats["layers"][layer]["noise_norm"] <= 1e-5 * np.linalg.norm(target(same, layer, weights_of(same)))


def test_flexlora_is_the_truncated_svd():
    global_lora, updates = make_round(18, 50, 40, [2, 3, 4, 4], 4)
    p = weights_of(updates)
    agg = fm.methods.create("flexlora").aggregate(global_lora, updates, scaling=SCALING)
    assert not agg.backbone
    for layer in global_lora:
        M = target(updates, layer, p)
        sq = np.linalg.svd(M, compute_uv=False) ** 2
        np.testing.assert_allclose(merged(agg, layer), truncated(M, 4), rtol=0, atol=F32 * np.sqrt(sq[0]))
        assert agg.stats["layers"][layer]["energy_dropped"] == pytest.approx(sq[4:].sum() / sq.sum(), rel=1e-4)


@pytest.mark.parametrize("name", ["flora", "fedex-lora", "fedmomentum", "flexlora", "fedit"])
def test_weighting_by_examples_or_uniform(name):
    global_lora, updates = make_round(19, 20, 16, [3] * 4, 3, examples=[1, 5, 20, 80])
    for weighting in ("examples", "uniform"):
        agg = fm.methods.create(name, weighting=weighting).aggregate(global_lora, updates, scaling=SCALING)
        p = weights_of(updates, weighting)
        other = weights_of(updates, "uniform" if weighting == "examples" else "examples")
        for layer in global_lora:
            if name == "fedit":
                expected = sum(w * np64(u.factors[layer].B) for w, u in zip(p, updates, strict=True))
                wrong = sum(w * np64(u.factors[layer].B) for w, u in zip(other, updates, strict=True))
                got = np64(agg.lora[layer].B)
            elif name == "flexlora":
                expected, wrong = truncated(target(updates, layer, p), 3), truncated(target(updates, layer, other), 3)
                got = merged(agg, layer)
            else:
                expected, wrong, got = target(updates, layer, p), target(updates, layer, other), merged(agg, layer)
            assert rel(got, expected) < F32
            assert rel(got, wrong) > 0.05


@pytest.mark.parametrize("name", ["flora", "fedex-lora", "fedmomentum", "flexlora"])
def test_mixed_client_ranks(name):
    ranks = [1, 4, 2, 4, 3] + ([6] if name != "fedex-lora" else [])  # fedex-lora pads up to the global rank
    global_lora, updates = make_round(20, 30, 22, ranks, 4)
    p = weights_of(updates)
    agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)
    for layer in global_lora:
        assert agg.lora[layer].A.shape == global_lora[layer].A.shape
        assert agg.lora[layer].B.shape == global_lora[layer].B.shape
        expected = target(updates, layer, p)
        if name == "flexlora":
            expected = truncated(expected, 4)
        assert rel(merged(agg, layer), expected) < F32


@pytest.mark.parametrize("name", ["fedit", "ffa-lora", "rolora"])
def test_mixed_client_ranks_are_refused_where_unsupported(name):
    global_lora, updates = make_round(21, 30, 22, [4, 2, 4], 4)
    with pytest.raises(fm.UpdateError, match=r"client-1.*q_proj.*rank 2"):
        fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)


def test_fedex_lora_refuses_clients_above_the_global_rank():
    global_lora, updates = make_round(22, 30, 22, [4, 4, 5], 4)
    with pytest.raises(fm.UpdateError, match=r"client-2.*q_proj.*rank 5"):
        fm.methods.create("fedex-lora").aggregate(global_lora, updates, scaling=SCALING)


def test_flora_restarts_the_adapter_from_a_seeded_init():
    global_lora, updates = make_round(23, 30, 64, [3] * 3, 3)
    runs = [fm.methods.create("flora", seed=s).aggregate(global_lora, updates, scaling=SCALING, t=t)
            for s, t in [(0, 1), (0, 1), (1, 1), (0, 2)]]
    for layer, pair in global_lora.items():
        A = [run.lora[layer].A for run in runs]
        assert torch.all(runs[0].lora[layer].B == 0)
        assert torch.equal(A[0], A[1]) and not torch.equal(A[0], A[2]) and not torch.equal(A[0], A[3])
        assert float(A[0].abs().max()) <= 1 / np.sqrt(pair.A.shape[1]) and float(A[0].std()) > 0
        assert rel(np64(runs[0].backbone[layer].dense()), target(updates, layer, weights_of(updates))) < F32


def test_fedex_lora_backbone_is_the_fedit_gap():
    global_lora, updates = make_round(24, 26, 20, [3] * 4, 3)
    p = weights_of(updates)
    fedex = fm.methods.create("fedex-lora").aggregate(global_lora, updates, scaling=SCALING)
    fedit = fm.methods.create("fedit").aggregate(global_lora, updates, scaling=SCALING)
    for layer in global_lora:
        torch.testing.assert_close(fedex.lora[layer].A, fedit.lora[layer].A)
        torch.testing.assert_close(fedex.lora[layer].B, fedit.lora[layer].B)
        gap = target(updates, layer, p) - SCALING * np64(fedit.lora[layer].B) @ np64(fedit.lora[layer].A)
        np.testing.assert_allclose(np64(fedex.backbone[layer].dense()), gap, rtol=0,
                                   atol=F32 * np.linalg.norm(gap))
    # identical clients: FedIT is already exact, the backbone term vanishes
    global_lora, same = make_round(24, 26, 20, [3] * 4, 3, same=True)
    assert not fm.methods.create("fedex-lora").aggregate(global_lora, same, scaling=SCALING).backbone


def test_round_stats():
    global_lora, updates = make_round(25, 20, 16, [3] * 3, 3)
    for name in fm.methods.names():
        agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING, t=4)
        stats = agg.stats
        assert stats["method"] == name and stats["round"] == 4 and stats["clients"] == 3
        assert stats["rank_kept"] == 3
        assert stats["residual_rank"] == sum(d.rank for d in agg.backbone.values())
        trained = {"ffa-lora": "B", "rolora": "B", "frlora": "B"}.get(name, "AB")  # round 4 is even: RoLoRA trains B
        sent = sum(("B" in trained) * p.B.numel() + ("A" in trained) * p.A.numel() for p in updates[0].factors.values())
        assert stats["uplink_bytes_per_client"]["client-0"] == 4 * sent
        assert set(stats["layers"]) == set(global_lora)


@pytest.mark.parametrize("name", fm.methods.names())
def test_all_zero_products(name):
    """Clients that did not move B off zero (a layer nobody trained): nothing to merge, nothing breaks."""
    global_lora, updates = make_round(26, 20, 16, [3] * 3, 3)
    global_lora = {layer: fm.LoraPair(pair.A, torch.zeros_like(pair.B)) for layer, pair in global_lora.items()}
    for u in updates:
        for layer, pair in list(u.factors.items()):
            u.factors[layer] = fm.LoraPair(global_lora[layer].A.clone(), torch.zeros_like(pair.B))
    agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING)
    assert not agg.backbone
    for layer in global_lora:
        assert torch.all(agg.lora[layer].B == 0) and torch.isfinite(agg.lora[layer].A).all()
        assert agg.lora[layer].A.shape == global_lora[layer].A.shape


# --- FRLoRA ----------------------------------------------------------------------------------------------------


def backbone_weights(seed, global_lora):
    """Full-rank "pre-trained" weights with a decaying spectrum, one per layer (``out×in``, float32)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for layer, pair in global_lora.items():
        d, k = pair.shape
        U, _ = np.linalg.qr(rng.standard_normal((d, min(d, k))))
        V, _ = np.linalg.qr(rng.standard_normal((k, min(d, k))))
        S = 3.0 * 0.7 ** np.arange(min(d, k))
        weights[layer] = torch.tensor((U * S) @ V.T, dtype=torch.float32)
    return weights


@pytest.mark.parametrize("init_svd, tol", [("dense", F32), ("randomized", 1e-3)])
def test_frlora_starts_from_the_principal_part_of_the_weights(init_svd, tol):
    global_lora, _ = make_round(30, 24, 18, [3], 3)
    weights = backbone_weights(30, global_lora)
    method = fm.methods.create("frlora", init_svd=init_svd)
    assert method.uses_backbone and method.exact  # A frozen at A₀: averaging B is exact
    start = method.start(global_lora, weights, scaling=SCALING)
    for layer, W in weights.items():
        W64 = np64(W)
        S = np.linalg.svd(W64, compute_uv=False)[:3]
        B0, A0 = np64(start.lora[layer].B), np64(start.lora[layer].A)
        np.testing.assert_allclose(SCALING * B0 @ A0, truncated(W64, 3), rtol=0, atol=tol * S[0])
        np.testing.assert_allclose(B0.T @ B0, np.diag(S / SCALING), rtol=0, atol=tol * S[0])  # √(S/s) each side
        np.testing.assert_allclose(A0 @ A0.T, np.diag(S / SCALING), rtol=0, atol=tol * S[0])
        # the backbone keeps the rest: the model is unchanged
        np.testing.assert_allclose(np64(start.backbone[layer].dense()), -SCALING * B0 @ A0, rtol=0, atol=F32 * S[0])
    with pytest.raises(ValueError, match="shape"):
        method.start(global_lora, {k: v.T for k, v in weights.items()}, scaling=SCALING)
    assert fm.methods.create("fedmomentum").start(global_lora, weights, scaling=SCALING) is None


@pytest.mark.parametrize("weight_rank", [0, 2])
def test_frlora_starts_finite_from_a_weight_of_rank_below_r(weight_rank):
    """A zero weight (the issue's case) or one of rank 2 < r = 4: the adapter takes the nonzero singular directions,
    the other slots start like a LoRA init (B column 0, a fresh A row); nothing is NaN, and the model is unchanged."""
    rng = np.random.default_rng(33)
    W = torch.tensor(rng.standard_normal((16, weight_rank)) @ rng.standard_normal((weight_rank, 12)),
                     dtype=torch.float32)
    global_lora = {"l": fm.LoraPair(torch.rand(4, 12), torch.zeros(16, 4))}
    start = fm.methods.create("frlora").checked_start(global_lora, {"l": W}, scaling=2.0)
    pair, delta = start.lora["l"], start.backbone["l"]
    assert all(bool(torch.isfinite(x).all()) for x in (pair.A, pair.B, delta.left, delta.right))
    np.testing.assert_allclose(2.0 * np64(pair.B) @ np64(pair.A), np64(W), rtol=0,
                               atol=F32 * max(1.0, float(np.linalg.norm(np64(W)))))  # rank(W) ≤ r: all of it
    np.testing.assert_allclose(np64(delta.dense()), -np64(W), rtol=0, atol=F32 * max(1.0, np.linalg.norm(np64(W))))
    assert np.all(np64(pair.B)[:, weight_rank:] == 0) and np.all(np.linalg.norm(np64(pair.A), axis=1) > 0)
    # the issue's call, verbatim
    issue = fm.methods.create("frlora").start({"l": fm.LoraPair(torch.rand(8, 16), torch.zeros(16, 8))},
                                              {"l": torch.zeros(16, 16)}, scaling=2.0)
    assert all(bool(torch.isfinite(x).all()) for x in (issue.lora["l"].A, issue.lora["l"].B))


def test_a_start_that_is_not_finite_is_refused():
    global_lora = {"model.layers.0.q_proj": fm.LoraPair(torch.rand(2, 6), torch.zeros(5, 2))}
    W = torch.ones(5, 6)
    W[1, 2] = float("nan")
    with pytest.raises(fm.UpdateError, match=r"frlora's start, layer 'model.layers.0.q_proj': .* not finite"):
        fm.methods.create("frlora", init_svd="randomized").checked_start(global_lora, {"model.layers.0.q_proj": W},
                                                                         scaling=1.0)


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_frlora_by_default_trains_B_only_as_the_authors_script(weighting):
    """The authors' recipe (``lora_A`` frozen at ``A₀``; their script weighs clients uniformly): three rounds against
    a float64 replay, ``W ← W + s(Σ p_i B_i − B₀) A₀``, which is also the average of the client models."""
    global_lora, _ = make_round(34, 26, 20, [3], 3)
    W0 = backbone_weights(34, global_lora)
    method = fm.methods.create("frlora", weighting=weighting)
    assert method.trainable(1) == {"A": False, "B": True} and method.exact
    start = method.start(global_lora, W0, scaling=SCALING)
    reference = {layer: np64(W) for layer, W in W0.items()}
    model = {layer: np64(W) for layer, W in W0.items()}
    for t in range(1, 4):
        _, updates = make_round(50 + t, 26, 20, [3, 3, 3], 3, examples=[3, 30, 8])
        updates = [fm.ClientUpdate({n: fm.LoraPair(start.lora[n].A.clone(), p.B) for n, p in u.factors.items()},
                                   u.num_examples, u.client_id) for u in updates]  # A frozen on every client
        p = weights_of(updates, weighting)
        agg = method.aggregate(start.lora, updates, scaling=SCALING, t=t)
        assert agg.stats["uplink_bytes"] == 4 * sum(pair.B.numel() for pair in start.lora.values())
        for layer, init in start.lora.items():
            mean_B = sum(w * np64(u.factors[layer].B) for w, u in zip(p, updates, strict=True))
            expected = SCALING * (mean_B - np64(init.B)) @ np64(init.A)
            delta = np64(agg.backbone[layer].dense())
            np.testing.assert_allclose(delta, expected, rtol=0, atol=F32 * np.linalg.norm(expected))
            assert agg.backbone[layer].rank <= 3 and "noise_norm" not in agg.stats["layers"][layer]
            model[layer] += delta
            reference[layer] += target(updates, layer, p) - SCALING * np64(init.B) @ np64(init.A)
    for layer in W0:
        assert rel(model[layer], reference[layer]) < 1e-5  # the average of the client models, round after round


@pytest.mark.parametrize("average", ["factors", "products"])
def test_frlora_folds_the_round_into_the_backbone_and_restarts_at_the_same_init(average):
    """Three rounds against a float64 replay of the rule: ``W ← W + s(B̄Ā − B₀A₀)`` (``factors``, FedAvg of the
    factors as in the authors' code) or ``s(Σp BA − B₀A₀)`` (``products``), adapter back to ``(A₀, B₀)``."""
    global_lora, _ = make_round(31, 26, 20, [3], 3)
    W0 = backbone_weights(31, global_lora)
    method = fm.methods.create("frlora", average=average, train_A=True)
    assert method.exact == (average == "products") and method.trainable(1) == {"A": True, "B": True}
    start = method.start(global_lora, W0, scaling=SCALING)
    backbone = {layer: np64(W) + np64(start.backbone[layer].dense()) for layer, W in W0.items()}
    reference = {layer: np64(W) for layer, W in W0.items()}  # the full model W + s B A, replayed in float64
    adapter = start.lora
    for t in range(1, 4):
        _, updates = make_round(39 + t, 26, 20, [3, 3, 3, 3], 3)
        p = weights_of(updates)
        agg = method.aggregate(adapter, updates, scaling=SCALING, t=t)
        for layer, init in start.lora.items():
            assert torch.equal(agg.lora[layer].A, init.A) and torch.equal(agg.lora[layer].B, init.B)
            B0A0 = np64(init.B) @ np64(init.A)
            if average == "factors":
                mean_B = sum(w * np64(u.factors[layer].B) for w, u in zip(p, updates, strict=True))
                mean_A = sum(w * np64(u.factors[layer].A) for w, u in zip(p, updates, strict=True))
                expected = SCALING * (mean_B @ mean_A - B0A0)
                assert agg.stats["layers"][layer]["noise_norm"] == pytest.approx(
                    np.linalg.norm(target(updates, layer, p) - SCALING * mean_B @ mean_A), rel=1e-4)
            else:
                expected = target(updates, layer, p) - SCALING * B0A0
                assert rel(merged(agg, layer), target(updates, layer, p)) < F32  # exact
            delta = np64(agg.backbone[layer].dense())
            np.testing.assert_allclose(delta, expected, rtol=0, atol=F32 * np.linalg.norm(expected))
            assert agg.backbone[layer].rank <= 2 * 3 if average == "factors" else 3 * 4 + 3
            backbone[layer] += delta
            reference[layer] += expected
        adapter = agg.lora
    for layer, init in start.lora.items():
        model = backbone[layer] + SCALING * np64(init.B) @ np64(init.A)
        assert rel(model, reference[layer]) < 1e-5
    assert not agg.state  # nothing held: the init is the global adapter itself
    # the clients already hold (A₀, B₀): the downlink is the backbone delta alone
    assert agg.stats["downlink_bytes"] == 4 * sum(d.left.numel() + d.right.numel() for d in agg.backbone.values())


# --- FedSA-LoRA ----------------------------------------------------------------------------------------------


def test_fedsa_lora_shares_A_and_each_client_keeps_its_B():
    global_lora, updates = make_round(32, 22, 18, [3, 3, 3], 3)
    p = weights_of(updates)
    method = fm.methods.create("fedsa-lora")
    assert method.local == ("B",) and not method.exact
    agg = method.aggregate(global_lora, updates, scaling=SCALING, t=3)
    assert method.shared(3) == {"A": True, "B": False}
    for layer in global_lora:
        mean_A = sum(w * np64(u.factors[layer].A) for w, u in zip(p, updates, strict=True))
        mean_B = sum(w * np64(u.factors[layer].B) for w, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(np64(agg.lora[layer].A), mean_A, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np64(agg.lora[layer].B), mean_B, rtol=0, atol=1e-6)  # the server's own model
    assert not agg.backbone
    a_bytes = 4 * sum(pair.A.numel() for pair in global_lora.values())
    assert agg.stats["downlink_bytes"] == a_bytes  # B never goes back to the clients
    assert agg.stats["uplink_bytes"] == 4 * sum(pair.A.numel() + pair.B.numel() for pair in global_lora.values())
    # each client trains from the shared A and its own B; a newcomer from the global adapter
    for update in updates:
        own = method.local_state(update)
        assert set(own) == {"B"}
        start = method.client_start(agg.lora, own=own)
        for layer in global_lora:
            assert torch.equal(start[layer].A, agg.lora[layer].A)
            assert torch.equal(start[layer].B, update.factors[layer].B)
    assert method.client_start(agg.lora) == agg.lora
    wrong = {"B": {layer: torch.zeros(2, 2) for layer in global_lora}}
    with pytest.raises(ValueError, match="own B .* does not fit"):
        method.client_start(agg.lora, own=wrong)
    with pytest.raises(ValueError, match="keeps no 'A'"):
        method.client_start(agg.lora, own={"A": {}})
    assert fm.methods.create("fedit").local_state(updates[0]) == {}


# --- per-client ranks and scalings ---------------------------------------------------------------------------

ALPHA = 6.0


def with_own_scaling(updates, rslora=False):
    """Each update carries ``s_k = α/r_k`` (or ``α/√r_k``)."""
    for u in updates:
        r = next(iter(u.factors.values())).rank
        u.scaling = ALPHA / (np.sqrt(r) if rslora else r)
    return updates


def scaled_target(updates, name, p) -> np.ndarray:
    """``Σ p_k s_k B_k A_k``, dense, float64."""
    return sum(w * u.scaling * np64(u.factors[name].B) @ np64(u.factors[name].A)
               for w, u in zip(p, updates, strict=True))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", ["flora", "fedex-lora", "fedmomentum", "flexlora"])
def test_each_client_scaling_is_respected_in_the_aggregate(name, rslora):
    ranks = [1, 4, 2, 4, 3] + ([6] if name != "fedex-lora" else [])
    global_lora, updates = make_round(33, 30, 22, ranks, 4)
    updates = with_own_scaling(updates, rslora)
    s = ALPHA / (2.0 if rslora else 4)
    p = weights_of(updates)
    agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=s)
    for layer in global_lora:
        expected = scaled_target(updates, layer, p)
        if name == "flexlora":
            expected = truncated(expected, 4)
        got = merged(agg, layer, scaling=s)
        assert rel(got, expected) < F32
        single = target(updates, layer, p, scaling=s)  # what one silent `s` would have given
        assert rel(got, single if name != "flexlora" else truncated(single, 4)) > 0.05


def test_a_client_scaling_is_checked():
    global_lora, updates = make_round(34, 20, 16, [3, 3], 3)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        updates[1].scaling = bad
        with pytest.raises(fm.UpdateError, match="client-1'?: scaling must be a positive finite number"):
            fm.methods.create("flora").aggregate(global_lora, updates, scaling=SCALING)
    updates[1].scaling = 2 * SCALING
    with pytest.raises(fm.UpdateError, match="client-1'?: LoRA scaling .* needs one rank and scaling"):
        fm.methods.create("fedit").aggregate(global_lora, updates, scaling=SCALING)
    updates[1].scaling = SCALING  # the global value itself is fine everywhere
    fm.methods.create("fedit").aggregate(global_lora, updates, scaling=SCALING)


@pytest.mark.parametrize("client_rank", [2, 4, 7])
def test_client_start_at_its_own_rank(client_rank):
    """``s_k B_k A_k = s B A`` for a client of at least the adapter's rank (new slots: B column 0, fresh A row),
    its best rank-``r_k`` part (truncated SVD) below it."""
    global_lora, _ = make_round(35, 30, 22, [4], 4)
    s, s_k = ALPHA / 4, ALPHA / client_rank
    method = fm.methods.create("fedmomentum")
    start = method.client_start(global_lora, rank=client_rank, scaling=s_k, global_scaling=s, t=4)
    again = method.client_start(global_lora, rank=client_rank, scaling=s_k, global_scaling=s, t=4)
    for layer, pair in global_lora.items():
        B, A = np64(start[layer].B), np64(start[layer].A)
        assert B.shape == (pair.shape[0], client_rank) and A.shape == (client_rank, pair.shape[1])
        full = s * np64(pair.B) @ np64(pair.A)
        expected = full if client_rank >= 4 else truncated(full, client_rank)
        assert rel(s_k * B @ A, expected) < F32
        if client_rank > 4:
            assert np.all(B[:, 4:] == 0) and np.all(np.linalg.norm(A[4:], axis=1) > 0)
            assert torch.equal(start[layer].A, again[layer].A)  # seeded
            fresh = np64(method.fresh_A(layer, client_rank - 4, pair.shape[1], 3))
            assert not np.allclose(A[4:], fresh)  # not the rows the aggregation's fresh slots use
        elif client_rank < 4:
            gram = B.T @ B
            np.testing.assert_allclose(gram, np.diag(np.diag(gram)), rtol=0, atol=F32 * gram.max())
    same = method.client_start(global_lora, rank=4, scaling=s, global_scaling=s)
    assert all(same[layer] is pair for layer, pair in global_lora.items())
    with pytest.raises(ValueError, match="fedit needs every client at the global rank"):
        fm.methods.create("fedit").client_start(global_lora, rank=2, scaling=ALPHA / 2, global_scaling=s)


def test_flexlora_redistributes_at_each_client_rank():
    """FlexLoRA with clients of ranks 2, 4, 8 and a global rank of 8: each client starts the next round from the
    truncated SVD of ``Σ p_k s_k B_k A_k`` at its own rank."""
    global_lora, updates = make_round(36, 40, 30, [2, 4, 8, 4], 8)
    updates = with_own_scaling(updates)
    s = ALPHA / 8
    method = fm.methods.create("flexlora")
    agg = method.aggregate(global_lora, updates, scaling=s)
    M = scaled_target(updates, next(iter(global_lora)), weights_of(updates))
    layer = next(iter(global_lora))
    for rank in (2, 4, 8):
        start = method.client_start(agg.lora, rank=rank, scaling=ALPHA / rank, global_scaling=s)
        got = ALPHA / rank * np64(start[layer].B) @ np64(start[layer].A)
        assert rel(got, truncated(M, rank)) < 1e-4


@pytest.mark.parametrize("split", ["balanced", "left"])
def test_flexlora_gives_a_client_above_the_global_rank_its_top_components(split):
    """Global rank 4, clients of ranks 2, 8, 4, 8, 2: the global adapter keeps the aggregate's top 4 components, the
    state the next 4 (up to the largest client rank), and a client of rank r_k starts with ``s_k B_k A_k`` = the
    top-r_k truncation of ``Σ p_k s_k B_k A_k`` (dense float64 reference); above 8, the extra slots are empty."""
    global_lora, updates = make_round(37, 36, 30, [2, 8, 4, 8, 2], 4)
    updates = with_own_scaling(updates)
    s = ALPHA / 4
    method = fm.methods.create("flexlora", dtype="float64", split=split)
    agg = method.aggregate(global_lora, updates, scaling=s)
    for layer, pair in agg.lora.items():
        M = scaled_target(updates, layer, weights_of(updates))
        S = np.linalg.svd(M, compute_uv=False)
        assert pair.rank == 4 and agg.state["tail_A"][layer].shape[0] == 4 and S[8] > 0  # the tail is up to rank 8
        for rank in (2, 4, 6, 8, 12):
            start = method.client_start(agg.lora, rank=rank, scaling=ALPHA / rank, global_scaling=s,
                                        state=agg.state)[layer]
            assert start.rank == rank
            kept = min(rank, 8)
            gap = S[kept - 1] - S[kept]  # the truncation's conditioning
            got = ALPHA / rank * np64(start.B) @ np64(start.A)
            assert rel(got, truncated(M, kept)) < F64 * S[0] / gap, (layer, rank)
            if rank > 8:
                assert not start.B[:, 8:].any()  # nothing kept beyond the largest client rank: empty slots
        assert rel(s * np64(pair.B) @ np64(pair.A), truncated(M, 4)) < F64 * S[0] / (S[3] - S[4])
    # before any aggregate (round 1) the client of rank 8 starts from the global adapter, its extra slots empty
    first = method.client_start(global_lora, rank=8, scaling=ALPHA / 8, global_scaling=s, state={})
    for layer, pair in global_lora.items():
        assert not first[layer].B[:, 4:].any()
        np.testing.assert_allclose(ALPHA / 8 * np64(first[layer].B) @ np64(first[layer].A),
                                   s * np64(pair.B) @ np64(pair.A), rtol=0,
                                   atol=F32 * s * np.abs(np64(pair.B) @ np64(pair.A)).max())
    layer = next(iter(agg.lora))
    wrong = {"tail_A": {layer: agg.state["tail_A"][layer][:, 1:]}, "tail_B": agg.state["tail_B"]}
    with pytest.raises(ValueError, match="flexlora's state: tail_A .* do not fit the adapter"):
        method.client_start(agg.lora, rank=8, scaling=ALPHA / 8, global_scaling=s, state=wrong)
    # the next round keeps the tail as wide as the widest client so far, even with only low-rank clients
    low = with_own_scaling(make_round(38, 36, 30, [2, 4, 4], 4)[1])  # rank(M) = 10
    again = method.aggregate(agg.lora, low, scaling=s, state=agg.state)
    assert all(t.shape[0] == 4 for t in again.state["tail_A"].values())


def test_check_ranks():
    fm.methods.create("flora").check_ranks(4, [2, 8])
    fm.methods.create("fedmomentum").check_ranks(4, [2, 8])
    fm.methods.create("fedex-lora").check_ranks(8, [2, 8])
    fm.methods.create("flexlora").check_ranks(8, [2, 8])
    fm.methods.create("flexlora").check_ranks(4, [2, 8])  # above the global rank: from the state's components
    fm.methods.create("fedit").check_ranks(4, [4, 4])
    with pytest.raises(ValueError, match="must not exceed"):
        fm.methods.create("fedex-lora").check_ranks(4, [2, 8])
    for name in ("fedit", "ffa-lora", "rolora", "frlora", "fedsa-lora"):
        with pytest.raises(ValueError, match=f"{name} needs every client at the global rank 4; it cannot mix"):
            fm.methods.create(name).check_ranks(4, [4, 8])


def _layer_numel(pairs) -> int:
    return sum(p.A.numel() + p.B.numel() for p in pairs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fedmomentum_compressed_residual_has_the_rank_of_the_tail(case):
    """``compress_residual`` sends the residual at rank ``rank(M) − r`` instead of ``Σ r_i``; still exact."""
    d, k, ranks, rank = case
    global_lora, updates = make_round(27, d, k, ranks, rank)
    plain = fm.methods.create("fedmomentum", dtype="float64").aggregate(global_lora, updates, scaling=SCALING)
    small = fm.methods.create("fedmomentum", dtype="float64", compress_residual=True).aggregate(
        global_lora, updates, scaling=SCALING)
    p = weights_of(updates)
    for layer in global_lora:
        M = target(updates, layer, p)
        tail = np.linalg.matrix_rank(M) - min(rank, np.linalg.matrix_rank(M))
        assert (small.backbone[layer].rank if layer in small.backbone else 0) == tail
        assert rel(merged(small, layer), M) < F64
        if layer in plain.backbone:
            assert plain.backbone[layer].rank == sum(ranks)  # the uncompressed route sends rank-Σr factors
    adapter = _layer_numel(small.lora.values())
    for agg in (plain, small):
        residual = sum(x.left.numel() + x.right.numel() for x in agg.backbone.values())
        assert agg.stats["downlink_bytes"] == 4 * (adapter + residual)


@pytest.mark.parametrize("wire, eps", [("bfloat16", 2.0**-8), ("float16", 2.0**-11)])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e-6])  # 1e-6: entries below float16's normal range unless rebalanced
def test_fedmomentum_residual_in_half_precision(wire, eps, compress, scale):
    """The residual goes out rounded to ``wire``: representable there, within the dtype's precision of the exact
    residual (dense float64 reference), the loss reported as ``rounding_error``, counted at 2 bytes a value."""
    global_lora, updates = make_round(28, 60, 40, [4] * 4, 4)
    for u in updates:
        for layer, pair in list(u.factors.items()):
            u.factors[layer] = fm.LoraPair(pair.A, pair.B * scale)
    method = fm.methods.create("fedmomentum", dtype="float64", compress_residual=compress, residual_dtype=wire)
    assert not method.exact
    agg = method.aggregate(global_lora, updates, scaling=SCALING)
    exact = fm.methods.create("fedmomentum", dtype="float64", compress_residual=compress).aggregate(
        global_lora, updates, scaling=SCALING)
    p = weights_of(updates)
    dtype = getattr(torch, wire)
    for layer in global_lora:
        sent = agg.backbone[layer]
        for factor in (sent.left, sent.right):
            assert torch.equal(factor.to(dtype).to(factor.dtype), factor)  # what arrives is exactly this
        M = target(updates, layer, p)
        residual = np64(exact.backbone[layer].dense())
        lost = np.linalg.norm(np64(sent.dense()) - residual)
        assert 0 < lost <= 4 * eps * np.linalg.norm(residual)
        assert agg.stats["layers"][layer]["rounding_error"] == pytest.approx(lost / np.linalg.norm(M), rel=1e-6)
        torch.testing.assert_close(agg.lora[layer].A, exact.lora[layer].A)  # the adapter is sent in float32
        assert rel(merged(agg, layer), M) == pytest.approx(lost / np.linalg.norm(M), rel=1e-6)
    adapter = _layer_numel(agg.lora.values())
    residual = sum(x.left.numel() + x.right.numel() for x in agg.backbone.values())
    assert agg.stats["downlink_bytes"] == 4 * adapter + 2 * residual


def test_fedmomentum_residual_options_are_checked():
    with pytest.raises(ValueError, match="residual_dtype"):
        fm.methods.create("fedmomentum", residual_dtype="int8")
    with pytest.raises(ValueError, match="compress_residual"):
        fm.methods.create("fedmomentum", compress_residual="yes")
