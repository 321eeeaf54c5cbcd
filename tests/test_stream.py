"""Streaming accumulators (``linalg.stream``): folding one client at a time gives the all-at-once results (exactly,
to round-off, for the exact ones; within the recorded error for the sketch) in memory that stops growing with the
number of clients. References: numpy float64 on the dense sum, and the all-at-once routes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedmomentum as fm
from fedmomentum import linalg
from linalg_helpers import EPS, dense, drift_terms, flat_terms, reconstruction, roundoff


def fold_all(accumulator, t: linalg.Terms):
    for L, R, w in zip(t.lefts, t.rights, t.weights, strict=True):
        accumulator.fold(L, R, w)
    return accumulator


def normalized(t: linalg.Terms) -> linalg.Terms:
    """The same terms with weights ``p_i = w_i / Σ w_j`` (what ``finish()`` divides by)."""
    total = sum(t.weights)
    return linalg.Terms(t.lefts, t.rights, [w / total for w in t.weights])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_factor_sum_is_the_weighted_mean(dtype):
    rng = np.random.default_rng(0)
    tensors = [torch.tensor(rng.standard_normal((7, 5)), dtype=dtype) for _ in range(40)]
    weights = list(rng.integers(1, 100, 40))
    acc = linalg.FactorSum()
    for X, w in zip(tensors, weights, strict=True):
        acc.fold(X, w)
        assert acc.nbytes == 7 * 5 * tensors[0].element_size()  # one tensor's worth, whatever the count
    expected = sum(w * X.double() for X, w in zip(tensors, weights, strict=True)) / sum(weights)
    tol = 4 * len(tensors) * EPS[dtype] * max(float(X.abs().max()) for X in tensors)  # summation round-off
    torch.testing.assert_close(acc.finish().double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(acc.finish(scale=2.0).double(), 2 * expected * sum(weights), rtol=0,
                               atol=2 * sum(weights) * tol)
    assert acc.count == 40 and acc.weight == sum(weights)
    with pytest.raises(ValueError, match="cannot join"):
        acc.fold(torch.zeros(5, 7, dtype=dtype))
    with pytest.raises(ValueError, match="finite"):
        acc.fold(tensors[0], math.nan)
    with pytest.raises(ValueError, match="nothing was folded"):
        linalg.FactorSum().finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_product_sum_while_held_as_factors_is_the_all_at_once_route(dtype):
    rng = np.random.default_rng(1)
    t = drift_terms(rng, 60, 44, 3, 5, dtype=dtype)  # 15 columns: the factors take less room than the matrix
    acc = fold_all(linalg.ProductSum((60, 44), dtype=dtype), t)
    assert not acc.is_dense and acc.rank == 15
    streamed = acc.finish()
    at_once = linalg.decompose({"layer": normalized(t)})["layer"]
    assert streamed.route == at_once.route == "factored"
    M = dense(normalized(t))
    tol = roundoff(normalized(t))
    for svd in (streamed, at_once):
        np.testing.assert_allclose(reconstruction(svd), M, rtol=0, atol=tol)
        np.testing.assert_allclose((svd.L.double() @ svd.R.double()).numpy(), M, rtol=0, atol=tol)
    np.testing.assert_allclose(streamed.S.double().numpy(), at_once.S.double().numpy(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_product_sum_turns_dense_and_stops_growing_and_stays_exact(dtype):
    rng = np.random.default_rng(2)
    d, k, r = 40, 30, 3
    t = flat_terms(rng, d, k, r, 60, dtype=dtype)  # 180 columns: far more than the 40×30 matrix holds
    acc = linalg.ProductSum((d, k), dtype=dtype)
    sizes = []
    for L, R, w in zip(t.lefts, t.rights, t.weights, strict=True):
        acc.fold(L, R, w)
        sizes.append(acc.nbytes)
    item = t.lefts[0].element_size()
    switch = next(i for i, size in enumerate(sizes) if size == d * k * item)  # the first fold held densely
    assert (switch + 1) * r * (d + k) > d * k >= switch * r * (d + k)  # as soon as the factors outgrow the matrix
    assert max(sizes) <= d * k * item and all(size == d * k * item for size in sizes[switch:])
    streamed = acc.finish()
    assert acc.is_dense and streamed.route == "dense"
    p = normalized(t)
    M, tol = dense(p), roundoff(p)
    S = np.linalg.svd(M, compute_uv=False)
    np.testing.assert_allclose(streamed.S.double().numpy(), S, rtol=0, atol=tol)
    np.testing.assert_allclose(reconstruction(streamed), M, rtol=0, atol=tol)
    np.testing.assert_allclose((streamed.L.double() @ streamed.R.double()).numpy(), M, rtol=0, atol=tol)
    at_once = linalg.decompose({"layer": p})["layer"]  # q = 180 > min(d, k): the dense route too
    assert at_once.route == "dense"
    np.testing.assert_allclose(streamed.S.double().numpy(), at_once.S.double().numpy(), rtol=0, atol=tol)


def test_a_dense_product_sum_of_cancelling_terms_compresses_to_nothing():
    """The dense matrix alone cannot tell round-off from signal; the accumulated size of the terms can."""
    rng = np.random.default_rng(3)
    t = flat_terms(rng, 12, 10, 4, 3)
    acc = linalg.ProductSum((12, 10))
    for L, R in zip(t.lefts, t.rights, strict=True):
        acc.fold(L, R, 1.0)
        acc.fold(L, R, -1.0)  # B A − B A
    assert acc.is_dense
    svd = acc.finish(scale=1.0)
    assert linalg.compress(fm.LowRank(svd.L, svd.R), svd).rank == 0


def test_a_product_sum_rejects_bad_terms():
    acc = linalg.ProductSum((6, 5))
    with pytest.raises(ValueError, match="do not make a 6×5 term"):
        acc.fold(torch.zeros(6, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="finite"):
        acc.fold(torch.zeros(6, 2), torch.zeros(2, 5), math.inf)
    with pytest.raises(ValueError, match="nothing was folded"):
        acc.finish()
    acc.fold(torch.ones(6, 2), torch.ones(2, 5))
    with pytest.raises(ValueError, match="decomposed exactly"):
        acc.finish(kind="sketch")


def test_a_product_sketch_is_exact_while_the_terms_fit_its_width():
    rng = np.random.default_rng(4)
    t = flat_terms(rng, 50, 40, 3, 4, dtype=torch.float64)  # rank 12 ≤ width 16
    svd = fold_all(linalg.ProductSketch((50, 40), 16, dtype=torch.float64), t).finish()
    p = normalized(t)
    assert svd.route == "sketch" and svd.error <= 1e-10
    np.testing.assert_allclose(reconstruction(svd), dense(p), rtol=0, atol=roundoff(p))


@pytest.mark.parametrize("seed", range(3))
def test_a_product_sketch_estimates_its_error_and_agrees_with_the_all_at_once_sketch(seed):
    rng = np.random.default_rng(seed)
    d, k = 200, 160
    t = drift_terms(rng, d, k, 4, 100, spread=0.2, dtype=torch.float64)
    p = normalized(t)
    M = dense(p)
    acc = linalg.ProductSketch((d, k), 40, seed=seed, dtype=torch.float64)
    before = acc.nbytes
    streamed = fold_all(acc, t).finish()
    assert acc.nbytes == before  # fixed memory
    true = np.linalg.norm(reconstruction(streamed) - M) / np.linalg.norm(M)
    assert streamed.error / 3 <= true <= 3 * streamed.error and true < 0.05
    at_once = linalg.decompose({"layer": p}, "sketch", energy=0.99)["layer"]
    gap = np.linalg.norm(reconstruction(streamed) - reconstruction(at_once)) / np.linalg.norm(M)
    assert gap <= 3 * (streamed.error + at_once.error)  # both within their recorded errors of M


@pytest.mark.parametrize("method, options", [
    ("fedmomentum", {}),
    ("fedmomentum", {"residual_energy": 0.9}),
    ("flexlora", {}),
    ("flora", {}),
])
@pytest.mark.parametrize("clients", [4, 40], ids=["factored", "dense"])
def test_a_method_given_the_streamed_svd_returns_the_all_at_once_aggregate(method, options, clients):
    """What a method needs of the stream: ``aggregate_layer(..., svd=ProductSum.finish())`` (folding ``B_i`` with
    weight ``n_i``) gives ``aggregate``'s layer, whether the sum was held as factors or densely."""
    g = torch.Generator().manual_seed(clients)
    d, k, r, scaling = 24, 20, 2, 2.0
    name = "model.layers.0.self_attn.q_proj"
    global_lora = {name: fm.LoraPair(torch.randn(r, k, generator=g), torch.randn(d, r, generator=g))}
    updates = [fm.ClientUpdate({name: fm.LoraPair(torch.randn(r, k, generator=g), torch.randn(d, r, generator=g))},
                               num_examples=3 + i) for i in range(clients)]
    m = fm.methods.create(method, **options)
    expected = m.aggregate(global_lora, updates, scaling=scaling)
    acc = linalg.ProductSum((d, k))
    for u in updates:
        acc.fold(u.factors[name].B, u.factors[name].A, u.num_examples)
    assert acc.is_dense == (clients == 40)
    weights = m.client_weights(updates)
    clients_ = [u.factors[name] for u in updates]
    terms = m.svd_terms(name, global_lora[name], clients_, weights, scaling, 1)
    svd = acc.finish(scale=scaling / sum(u.num_examples for u in updates)) if method == "flora" else acc.finish()
    assert terms is not None
    result = fm.methods.create(method, **options).aggregate_layer(name, global_lora[name], clients_, weights,
                                                                  scaling, 1, svd, {})
    new, delta, stats = result.lora, result.backbone, result.stats
    M = sum(w * c.B.double() @ c.A.double() for w, c in zip(weights, clients_, strict=True)) * scaling
    tol = roundoff(linalg.Terms([c.B for c in clients_], [c.A for c in clients_], [w * scaling for w in weights]))
    got = scaling * new.delta().double() + (delta.dense().double() if delta is not None else 0)
    want = scaling * expected.lora[name].delta().double() + (expected.backbone[name].dense().double()
                                                             if name in expected.backbone else 0)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=4 * tol)
    if m.exact:
        np.testing.assert_allclose(got.numpy(), M.numpy(), rtol=0, atol=4 * tol)
    for key, value in expected.stats["layers"][name].items():
        if key not in ("svd", "svd_error"):  # the route aggregate() took, which the stream does not report
            assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
