"""The seven aggregation methods against dense numpy float64 references.

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
    agg = method.aggregate(global_lora, updates, scaling=SCALING, round=0)
    p = weights_of(updates)
    for layer in global_lora:
        assert agg.lora[layer].A.dtype == getattr(torch, dtype)
        assert agg.lora[layer].A.shape == global_lora[layer].A.shape
        assert agg.lora[layer].B.shape == global_lora[layer].B.shape
        expected = target(updates, layer, p)
        assert rel(merged(agg, layer), expected) < (1e-4 if opts.get("svd") == "randomized" else tol)


@pytest.mark.parametrize("name, shared, rounds", [("ffa-lora", "A", [0, 1, 2]), ("rolora", "A", [0, 2]),
                                                  ("rolora", "B", [1, 3])])
@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_one_factor_methods_are_exact_with_a_shared_frozen_factor(name, shared, rounds, case):
    d, k, ranks, rank = case
    global_lora, updates = make_round(12, d, k, [rank] * len(ranks), rank, shared=shared)
    method = fm.methods.create(name)
    p = weights_of(updates)
    for t in rounds:
        assert method.trainable(t) == {"A": shared != "A", "B": shared != "B"}
        agg = method.aggregate(global_lora, updates, scaling=SCALING, round=t)
        assert not agg.backbone
        for layer, pair in global_lora.items():
            frozen = agg.lora[layer].A if shared == "A" else agg.lora[layer].B
            assert torch.equal(frozen, pair.A if shared == "A" else pair.B)  # the frozen factor is kept as is
            assert rel(merged(agg, layer), target(updates, layer, p)) < F32


def test_rolora_alternates_and_ffa_lora_freezes_A():
    rolora, ffa = fm.methods.create("rolora"), fm.methods.create("ffa-lora")
    assert [rolora.trainable(t) for t in range(4)] == [{"A": False, "B": True}, {"A": True, "B": False}] * 2
    assert all(ffa.trainable(t) == {"A": False, "B": True} for t in range(4))
    # with a shared B, RoLoRA's odd round averages A; in an even round it would keep the global A instead
    global_lora, updates = make_round(13, 20, 16, [3, 3, 3], 3, shared="B")
    p = weights_of(updates)
    odd = rolora.aggregate(global_lora, updates, scaling=1.0, round=1)
    even = rolora.aggregate(global_lora, updates, scaling=1.0, round=2)
    for layer, pair in global_lora.items():
        mean_A = sum(w * np64(u.factors[layer].A) for w, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(np64(odd.lora[layer].A), mean_A, rtol=0, atol=1e-6)
        assert torch.equal(even.lora[layer].A, pair.A)


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
    agg = method.aggregate(global_lora, updates, scaling=SCALING, round=3)
    again = fm.methods.create("fedmomentum").aggregate(global_lora, updates, scaling=SCALING, round=3)
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
    runs = [fm.methods.create("flora", seed=s).aggregate(global_lora, updates, scaling=SCALING, round=t)
            for s, t in [(0, 0), (0, 0), (1, 0), (0, 1)]]
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
        agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING, round=4)
        stats = agg.stats
        assert stats["method"] == name and stats["round"] == 4 and stats["clients"] == 3
        assert stats["rank_kept"] == 3
        assert stats["residual_rank"] == sum(d.rank for d in agg.backbone.values())
        trained = {"ffa-lora": "B", "rolora": "B"}.get(name, "AB")  # round 4 is even: RoLoRA trains B
        sent = sum(("B" in trained) * p.B.numel() + ("A" in trained) * p.A.numel() for p in updates[0].factors.values())
        assert stats["uplink_bytes_per_client"]["client-0"] == 4 * sent
        assert set(stats["layers"]) == set(global_lora)


@pytest.mark.parametrize("name", fm.methods.names())
def test_all_zero_products(name):
    """Clients that did not move B off zero (a layer nobody trained): nothing to merge, nothing breaks."""
    global_lora, updates = make_round(26, 20, 16, [3] * 3, 3)
    for u in updates:
        for layer, pair in list(u.factors.items()):
            u.factors[layer] = fm.LoraPair(global_lora[layer].A.clone(), torch.zeros_like(pair.B))
    agg = fm.methods.create(name).aggregate(global_lora, updates, scaling=SCALING, round=0)
    assert not agg.backbone
    for layer in global_lora:
        assert torch.all(agg.lora[layer].B == 0) and torch.isfinite(agg.lora[layer].A).all()
        assert agg.lora[layer].A.shape == global_lora[layer].A.shape


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
