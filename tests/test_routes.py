"""A round's SVD routes (``linalg.decompose``): the cost model's choice, exactness of every exact route against numpy
float64, the matrix-free sketch within its tolerance (and its error estimate honest), chunks equal to one batch,
and a sketch that cannot reach its tolerance in budget falling back to an exact route."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from fedmomentum import linalg
from fedmomentum.linalg import cost
from linalg_helpers import dense, drift_terms, flat_terms, reconstruction, roundoff


def test_the_cost_model_picks_factored_for_few_clients_dense_near_full_rank_and_the_sketch_only_when_allowed():
    d = k = 4096
    assert linalg.choose_route("auto", d, k, 10 * 16)[0] == "factored"
    assert linalg.choose_route("auto", d, k, 40 * 16)[0] == "factored"
    assert linalg.choose_route("auto", d, k, 320 * 16)[0] == "dense"  # q > min(d, k)
    assert linalg.choose_route("auto", d, k, 1000 * 16)[0] == "dense"
    assert linalg.choose_route("auto", d, k, 160 * 16)[0] == "factored"  # exact only: energy = 1
    route, options = linalg.choose_route("auto", d, k, 160 * 16, energy=0.99, widest_term=16)
    assert route == "sketch" and options.tol == pytest.approx(0.1 ** 1.5)
    assert 0 < options.max_width < min(d, k)  # the budget: never past the exact route's cost
    assert cost.sketch_cost(d, k, 2560, options.max_width, options.niter, options.probes) <= cost.exact_cost(d, k, 2560)
    assert linalg.choose_route("auto", d, k, 10 * 16, energy=0.99, widest_term=16)[0] == "factored"  # no cheaper
    for kind in ("factored", "dense", "sketch", "randomized"):  # a route given by name is taken
        assert linalg.choose_route(kind, d, k, 160, energy=0.99)[0] == kind
    with pytest.raises(ValueError, match="unknown svd 'qr'"):
        linalg.choose_route("qr", d, k, 160)
    # the exact route's cost never exceeds the dense route's, at any number of clients
    for n in (1, 10, 40, 160, 240, 256, 320, 1000):
        assert cost.exact_cost(d, k, 16 * n) <= cost.dense_cost(d, k, 16 * n)
        assert cost.exact_cost(4096, 11008, 16 * n) <= cost.dense_cost(4096, 11008, 16 * n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["auto", "factored", "dense"])
def test_every_exact_route_is_the_svd_of_the_sum(kind, dtype):
    rng = np.random.default_rng(0)
    terms = {"wide": drift_terms(rng, 24, 40, 3, 5, dtype=dtype), "square": flat_terms(rng, 30, 30, 4, 9, dtype=dtype),
             "tall": flat_terms(rng, 50, 20, 2, 3, dtype=dtype)}
    out = linalg.decompose(terms, kind)
    for name, t in terms.items():
        M, svd = dense(t), out[name]
        assert svd.route == out.routes[name] == (cost.exact_route(*t.shape) if kind == "auto" else kind)
        assert out.stats(name) == {"svd": svd.route} and svd.error == 0.0
        tol = roundoff(t)
        S = np.linalg.svd(M, compute_uv=False)
        assert len(svd.S) == min(t.shape)
        np.testing.assert_allclose(svd.S.double().numpy(), S[: len(svd.S)], rtol=0, atol=tol)
        np.testing.assert_allclose(reconstruction(svd), M, rtol=0, atol=tol)
        np.testing.assert_allclose((svd.L.double() @ svd.R.double()).numpy(), M, rtol=0, atol=tol)
        assert svd.energy == pytest.approx(float((S ** 2).sum()), rel=4 * tol / np.linalg.norm(M))


@pytest.mark.parametrize("seed", range(4))
def test_the_sketch_reaches_its_tolerance_and_estimates_its_error(seed):
    rng = np.random.default_rng(seed)
    t = drift_terms(rng, 120, 90, 4, 30, dtype=torch.float64)
    M = dense(t)
    for tol in (0.1, 0.03, 0.01):
        svd = linalg.ProductSVD(*t.stacked(), "sketch", sketch=linalg.SketchOptions(tol=tol, seed=seed), widest_term=4)
        true = np.linalg.norm(reconstruction(svd) - M) / np.linalg.norm(M)
        assert svd.route == "sketch" and svd.converged and svd.error <= tol
        assert true <= 2 * tol
        assert svd.error / 3 <= true <= 3 * svd.error  # ten Gaussian probes: far inside a factor of 3
        assert len(svd.S) < min(t.shape)  # it did not need the full width
        U, Vh = svd.U().numpy(), svd.Vh().numpy()
        np.testing.assert_allclose(U.T @ U, np.eye(len(svd.S)), atol=1e-12)
        np.testing.assert_allclose(Vh @ Vh.T, np.eye(len(svd.S)), atol=1e-12)
        # the sketch is the exact SVD of Q Qᵀ M: its singular values are M's to within the error
        S = np.linalg.svd(M, compute_uv=False)[: len(svd.S)]
        assert np.max(np.abs(svd.S.numpy() - S)) <= true * np.linalg.norm(M)
        assert svd.energy == pytest.approx(np.linalg.norm(M) ** 2, rel=2 * true ** 2 + 1e-12)


def test_a_sketch_at_full_width_is_exact():
    rng = np.random.default_rng(5)
    t = flat_terms(rng, 40, 30, 3, 4, dtype=torch.float64)  # rank 12, flat: only the full width gets there
    svd = linalg.ProductSVD(*t.stacked(), "sketch", sketch=linalg.SketchOptions(tol=1e-9), widest_term=3)
    assert len(svd.S) == 12 and svd.converged
    np.testing.assert_allclose(reconstruction(svd), dense(t), rtol=0, atol=roundoff(t))


def test_auto_takes_the_sketch_when_energy_may_go_and_records_its_error():
    rng = np.random.default_rng(6)
    terms = {f"layer{i}": drift_terms(rng, 256, 256, 4, 256, spread=0.2) for i in range(3)}  # q = 1024 > d
    out = linalg.decompose(terms, energy=0.99)
    for name, t in terms.items():
        M, svd = dense(t), out[name]
        assert out.routes[name] == "sketch" and len(svd.S) < 64
        stats = out.stats(name)
        assert stats["svd"] == "sketch" and stats["svd_error"] == svd.error <= linalg.sketch_tolerance(0.99)
        assert np.linalg.norm(reconstruction(svd) - M) <= 3 * svd.error * np.linalg.norm(M)
        np.testing.assert_allclose((svd.L.double() @ svd.R.double()).numpy(), M, rtol=0, atol=roundoff(t))


def test_a_sketch_that_misses_its_tolerance_in_budget_falls_back_to_the_exact_route():
    rng = np.random.default_rng(7)
    t = flat_terms(rng, 256, 256, 4, 256)  # flat spectrum of rank 256: a 0.03 error needs nearly all of it
    route, options = linalg.choose_route("auto", 256, 256, 1024, energy=0.99, widest_term=4)
    assert route == "sketch" and options.max_width < 256  # the model expects a cheap sketch...
    out = linalg.decompose({"flat": t}, energy=0.99)
    svd = out["flat"]
    assert out.routes["flat"] == svd.route == cost.exact_route(256, 256, 1024) == "dense"  # ...and falls back
    assert out.stats("flat") == {"svd": "dense"}
    np.testing.assert_allclose(reconstruction(svd), dense(t), rtol=0, atol=roundoff(t))


@pytest.mark.parametrize("kind", ["factored", "sketch"])
def test_chunks_give_the_one_batch_results_and_are_dropped_as_the_next_is_taken(kind):
    rng = np.random.default_rng(8)
    terms = {f"layer{i}": drift_terms(rng, 48, 40, 3, 6, dtype=torch.float64) for i in range(7)}
    whole = linalg.decompose(terms, kind, chunk_bytes=2**40)
    one_by_one = linalg.decompose(terms, kind, chunk_bytes=1)
    alive = []
    for name, t in terms.items():
        a, b = whole[name], one_by_one[name]
        M = dense(t)
        for svd in (a, b):
            tol = roundoff(t) if kind == "factored" else 3 * svd.error * np.linalg.norm(M)
            np.testing.assert_allclose(reconstruction(svd), M, rtol=0, atol=tol)
        if kind == "factored":
            np.testing.assert_allclose(a.S.numpy(), b.S.numpy(), rtol=0, atol=roundoff(t))
        alive.append(weakref.ref(b))
        del a, b
    gc.collect()
    assert sum(ref() is not None for ref in alive) == 1  # only the last chunk is still held
    assert len({whole[n].L.untyped_storage().data_ptr() for n in terms}) == 1  # one batch


def test_a_layer_whose_svd_fails_is_left_out_and_its_batch_retried_layer_by_layer(monkeypatch):
    rng = np.random.default_rng(9)
    terms = {"a": flat_terms(rng, 20, 16, 2, 3), "b": flat_terms(rng, 20, 16, 2, 3)}
    real_svd = torch.linalg.svd
    failing = {"batches": True, "all": False}

    def svd(A, *args, **kwargs):
        if failing["all"] or failing["batches"] and A.ndim == 3:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    out = linalg.decompose(terms, "factored")
    assert "a" in out and "b" in out  # their batch failed; alone they converge
    for name in ("a", "b"):
        np.testing.assert_allclose(reconstruction(out[name]), dense(terms[name]), rtol=0, atol=roundoff(terms[name]))
    failing["all"] = True
    out = linalg.decompose(terms, "factored")
    assert "a" not in out and out.get("b") is None and len(out) == 2


def test_svds_takes_every_layer_at_once():
    rng = np.random.default_rng(10)
    terms = {f"layer{i}": flat_terms(rng, 16, 12, 2, 3) for i in range(3)}
    out = linalg.svds(terms)
    assert isinstance(out, dict) and list(out) == list(terms)
    for name, t in terms.items():
        np.testing.assert_allclose(reconstruction(out[name]), dense(t), rtol=0, atol=roundoff(t))
    with pytest.raises(ValueError, match="unknown svd"):
        linalg.svds(terms, "qr")
