"""The batched route of the aggregation: layers of equal shape decomposed together give the per-layer results.

References: the per-layer route (to 1e-6, the issue's bar) and, for the batched ``ProductSVD`` itself, dense numpy
float64 SVDs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmomentum as fm
from fedmomentum import checkpoint, linalg
from fedmomentum.state import ServerState

SCALING = 2.0
# q, k, v, o of three blocks with GQA shapes (k, v: 16×32): two shape groups of six layers each
SHAPES = {f"model.layers.{b}.self_attn.{p}_proj": ((16, 32) if p in "kv" else (32, 32))
          for b in range(3) for p in "qkvo"}


def make_round(seed, ranks, rank=4, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)

    def pair(d, k, r):
        return fm.LoraPair(torch.randn(r, k, generator=g) / k**0.5, 0.1 * torch.randn(d, r, generator=g))

    global_lora = {name: pair(*shape, rank) for name, shape in shapes.items()}
    updates = [fm.ClientUpdate({name: pair(*shape, r) for name, shape in shapes.items()}, num_examples=5 + 3 * i,
                               client_id=f"c{i}") for i, r in enumerate(ranks)]
    return global_lora, updates


EPS = torch.finfo(torch.float32).eps


class Tolerance:
    """How far two float32 routes may differ on one layer, from float32's eps and the layer's conditioning.

    Both routes decompose ``M = Σ p_i B_i A_i`` from its stacked factors, so each has a backward error up to
    ``δ = c·eps·Σ p_i ‖B_i‖ ‖A_i‖`` (the factors' size, not ``‖M‖``: terms may cancel). A singular vector then moves by
    up to ``δ / gap_j`` (its distance to the nearest other singular value), so ``B' = U_r √S_r`` moves by
    ``√σ_1 δ / gap + δ / √σ_r`` (the same for ``A'``), and the backbone's tail ``M − U_r S_r V_rᵀ`` by
    ``δ (1 + σ_1 / gap_r)``. ``c`` covers the dimension-dependent constants of Householder QR and SVD.
    """

    C = 16  # about √(d·q) for these shapes

    def __init__(self, updates, name, scaling, rank):
        total = sum(u.num_examples for u in updates)
        pairs = [(u.num_examples / total, u.factors[name].B.double(), u.factors[name].A.double()) for u in updates]
        M = sum(p * B @ A for p, B, A in pairs)
        sigma = torch.linalg.svdvals(M)
        size = sum(p * float(B.norm() * A.norm()) for p, B, A in pairs)
        self.delta = self.C * EPS * size
        top = sigma[: rank + 1]
        gaps = [min(float(abs(top[j] - top[i])) for i in range(len(top)) if i != j) for j in range(min(rank,
                                                                                                         len(top)))]
        gap = max(min(gaps), self.delta)
        sigma_r = max(float(sigma[min(rank, len(sigma)) - 1]), self.delta)
        self.factor = self.delta * (float(sigma[0]) ** 0.5 / gap + 1 / sigma_r ** 0.5)
        self.backbone = scaling * self.delta * (1 + float(sigma[0]) / gap)
        self.relative = self.delta / max(float(M.norm()), self.delta)  # for norms and energies of M


def assert_same(a: fm.Aggregate, b: fm.Aggregate, updates, scaling=SCALING) -> None:
    assert a.lora.keys() == b.lora.keys() and a.backbone.keys() == b.backbone.keys()
    for name in a.lora:
        tol = Tolerance(updates, name, scaling, a.lora[name].rank)
        for x, y in ((a.lora[name].A, b.lora[name].A), (a.lora[name].B, b.lora[name].B)):
            torch.testing.assert_close(x, y, rtol=0, atol=tol.factor)
        if name in a.backbone:  # compare the matrices (factors may differ by signs or a basis of the same space)
            torch.testing.assert_close(a.backbone[name].dense(), b.backbone[name].dense(), rtol=0, atol=tol.backbone)
        stats = a.stats["layers"][name]
        assert stats.keys() == b.stats["layers"][name].keys()
        for key, value in stats.items():
            other = b.stats["layers"][name][key]
            assert value == (other if isinstance(other, str) else  # the svd route's name
                             pytest.approx(other, rel=4 * tol.relative, abs=tol.relative)), (name, key)


@pytest.mark.parametrize("method, options", [
    ("fedmomentum", {}),
    ("fedmomentum", {"residual_energy": 0.9}),
    ("fedmomentum", {"split": "left", "merge_every": 2}),
    ("flexlora", {}),
    ("flora", {}),
    ("fedex-lora", {}),
])
@pytest.mark.parametrize("ranks", [[4, 4, 4], [4, 2, 3, 4]], ids=["equal-ranks", "mixed-ranks"])
def test_the_batched_route_gives_the_per_layer_results(method, options, ranks):
    global_lora, updates = make_round(0, ranks)
    per_layer = fm.methods.create(method, batched=False, **options)
    batched = fm.methods.create(method, **options)
    assert batched.batched and not per_layer.batched
    state_a = state_b = {}
    for t in range(1, 4):  # rounds 2 and 3 start from the previous adapter (and held residuals)
        a = per_layer.aggregate(global_lora, updates, scaling=SCALING, t=t, state=state_a)
        b = batched.aggregate(global_lora, updates, scaling=SCALING, t=t, state=state_b)
        assert_same(a, b, updates)
        global_lora, state_a, state_b = b.lora, a.state, b.state
        updates = make_round(t, ranks)[1]


def test_the_tolerance_still_catches_a_wrong_route():
    """The derived tolerance is far below what a real difference between routes would be (here: one factor's
    last column scaled by 1.01, or the other split)."""
    global_lora, updates = make_round(0, [4, 2, 3, 4])
    right = fm.methods.create("fedmomentum").aggregate(global_lora, updates, scaling=SCALING)
    name = next(iter(right.lora))
    B = right.lora[name].B.clone()
    B[:, -1] *= 1.01
    wrong = fm.Aggregate({**right.lora, name: fm.LoraPair(right.lora[name].A, B)}, right.backbone, right.stats)
    with pytest.raises(AssertionError):
        assert_same(right, wrong, updates)
    left = fm.methods.create("fedmomentum", split="left").aggregate(global_lora, updates, scaling=SCALING)
    with pytest.raises(AssertionError):
        assert_same(right, left, updates)


def test_batched_results_are_exact_against_a_float64_reference():
    """Not only equal to the per-layer route: the merged model is the weighted average of the client models."""
    global_lora, updates = make_round(3, [4, 4, 4])
    result = fm.methods.create("fedmomentum").aggregate(global_lora, updates, scaling=SCALING)
    total = sum(u.num_examples for u in updates)
    for name in SHAPES:
        expected = SCALING * sum(u.num_examples / total * u.factors[name].B.double() @ u.factors[name].A.double()
                                 for u in updates)
        merged = SCALING * result.lora[name].delta().double() + result.backbone[name].dense().double()
        np.testing.assert_allclose(merged.numpy(), expected.numpy(), rtol=0, atol=2e-6 * float(expected.abs().max()))


def test_a_batched_product_svd_is_each_matrix_svd():
    rng = np.random.default_rng(0)
    L = torch.tensor(rng.standard_normal((5, 30, 6)), dtype=torch.float64)
    R = torch.tensor(rng.standard_normal((5, 6, 20)), dtype=torch.float64)
    R[2, 3] = R[2, 1]  # a rank-deficient layer in the batch
    batch = linalg.ProductSVD(L, R)
    for i in range(5):
        M = (L[i] @ R[i]).numpy()
        layer = batch[i]
        np.testing.assert_allclose(layer.S.numpy(), np.linalg.svd(M, compute_uv=False)[:6], atol=1e-10)
        np.testing.assert_allclose((layer.U() * layer.S @ layer.Vh()).numpy(), M, atol=1e-10)
        n = 3
        np.testing.assert_allclose((layer.U(n) * layer.S[:n] @ layer.Vh(n)).numpy(),
                                   (batch.U(n)[i] * batch.S[i, :n] @ batch.Vh(n)[i]).numpy(), atol=1e-12)
        assert layer.L.data_ptr() == L[i].data_ptr()  # a view, not a copy
        alone = linalg.ProductSVD(L[i], R[i])
        assert layer.factor_norms() == pytest.approx(alone.factor_norms(), rel=1e-12)
        assert layer.factor_norms()[0] == pytest.approx(np.linalg.norm(L[i].numpy(), 2), rel=1e-12)


def test_svds_groups_layers_by_shape_and_leaves_other_routes_per_layer():
    rng = np.random.default_rng(1)

    def terms(d, k, ranks):
        return linalg.Terms([torch.tensor(rng.standard_normal((d, r)), dtype=torch.float32) for r in ranks],
                            [torch.tensor(rng.standard_normal((r, k)), dtype=torch.float32) for r in ranks],
                            list(rng.uniform(0.1, 1, len(ranks))))

    layers = {"a": terms(12, 8, [2, 2]), "b": terms(12, 8, [2, 2]), "c": terms(8, 12, [2, 2]),
              "d": terms(12, 8, [3, 1])}
    out = linalg.svds(layers)
    storages = {name: svd.L.untyped_storage().data_ptr() for name, svd in out.items()}
    assert storages["a"] == storages["b"] and len(set(storages.values())) == 3  # a and b in one batch
    for name, t in layers.items():
        dense = sum(w * x @ y for x, y, w in zip(t.lefts, t.rights, t.weights, strict=True))
        torch.testing.assert_close(out[name].L @ out[name].R, dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[name].S, torch.linalg.svdvals(dense)[:4], rtol=1e-4, atol=1e-4)
    dense_route = linalg.svds(layers, kind="dense")
    assert len({svd.L.untyped_storage().data_ptr() for svd in dense_route.values()}) == 4
    with pytest.raises(ValueError, match="one matrix at a time"):
        linalg.ProductSVD(torch.zeros(2, 4, 3), torch.zeros(2, 3, 4), "dense")


def test_held_residuals_that_are_views_of_a_batch_still_checkpoint(tmp_path):
    """With merge_every > 1 the held residual's left factor is a view of the round's batch: safetensors must take it."""
    global_lora, updates = make_round(0, [4, 4, 4])
    method = fm.methods.create("fedmomentum", merge_every=2)
    result = method.aggregate(global_lora, updates, scaling=SCALING)
    assert result.state and not result.backbone
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, ServerState(1, result.lora, method=result.state), {})
    loaded, _ = checkpoint.load(path)
    assert loaded.method.keys() == result.state.keys()
    for slot, layers in result.state.items():
        assert all(torch.equal(loaded.method[slot][name], value) for name, value in layers.items())


def test_batched_must_be_a_bool():
    with pytest.raises(ValueError, match="option batched = 'yes': expected true or false"):
        fm.methods.create("fedmomentum", batched="yes")
