"""``fedmomentum.linalg`` against dense numpy (float64) references.

Every expected value here is computed independently of the code under test: ``numpy.linalg.svd`` /
``numpy.linalg.norm`` / ``numpy.linalg.matrix_rank`` on the dense ``Σ w_i L_i R_i``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmomentum as fm
from fedmomentum import linalg

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def random_terms(rng, d, k, ranks, dtype=torch.float32):
    lefts = [torch.tensor(rng.standard_normal((d, r)), dtype=dtype) for r in ranks]
    rights = [torch.tensor(rng.standard_normal((r, k)), dtype=dtype) for r in ranks]
    weights = list(rng.uniform(0.1, 1.0, len(ranks)))
    return lefts, rights, weights


def dense(lefts, rights, weights) -> np.ndarray:
    return sum(w * L.double().numpy() @ R.double().numpy() for w, L, R in zip(weights, lefts, rights, strict=True))


def check_svd(U, S, Vh, M: np.ndarray, dtype) -> None:
    """``(U, S, Vh)`` is a thin SVD of ``M`` to the dtype's tolerance (values, product, orthonormality)."""
    tol = TOL[dtype]
    m = min(*M.shape, U.shape[1])
    assert U.shape == (M.shape[0], m) and S.shape == (m,) and Vh.shape == (m, M.shape[1])
    assert U.dtype == S.dtype == Vh.dtype == dtype
    reference = np.linalg.svd(M, compute_uv=False)
    scale = max(reference[0], 1e-30)
    Un, Sn, Vhn = U.double().numpy(), S.double().numpy(), Vh.double().numpy()
    assert np.all(np.diff(Sn) <= tol * scale), "singular values must be in descending order"
    np.testing.assert_allclose(Sn, reference[:m], rtol=0, atol=tol * scale)
    np.testing.assert_allclose((Un * Sn) @ Vhn, M, rtol=0, atol=tol * scale * np.sqrt(m))
    np.testing.assert_allclose(Un.T @ Un, np.eye(m), rtol=0, atol=10 * tol)
    np.testing.assert_allclose(Vhn @ Vhn.T, np.eye(m), rtol=0, atol=10 * tol)


shapes = st.tuples(
    st.integers(1, 40),  # d
    st.integers(1, 40),  # k
    st.lists(st.integers(1, 6), min_size=1, max_size=6),  # client ranks (heterogeneous)
)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**32 - 1))
def test_factored_svd_matches_dense_svd(shape, dtype, seed):
    d, k, ranks = shape
    lefts, rights, weights = random_terms(np.random.default_rng(seed), d, k, ranks, dtype)
    U, S, Vh = fm.linalg.factored_svd(lefts, rights, weights, dtype=dtype)
    assert len(S) == min(d, k, sum(ranks))
    check_svd(U, S, Vh, dense(lefts, rights, weights), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, k, ranks", [(64, 48, [4, 4, 4]), (20, 300, [3, 5, 2]), (6, 5, [4, 4, 4])])
def test_factored_svd_of_rank_deficient_sums(dtype, d, k, ranks):
    """Duplicated clients: the sum has the rank of the distinct ones, the rest of the spectrum is ~0."""
    rng = np.random.default_rng(1)
    lefts, rights, weights = random_terms(rng, d, k, ranks, dtype)
    lefts, rights, weights = lefts * 3, rights * 3, weights * 3  # every client three times
    M = dense(lefts, rights, weights)
    true_rank = np.linalg.matrix_rank(M)
    assert true_rank == min(d, k, sum(ranks))
    U, S, Vh = fm.linalg.factored_svd(lefts, rights, weights, dtype=dtype)
    assert len(S) == min(d, k, 3 * sum(ranks))
    check_svd(U, S, Vh, M, dtype)
    assert linalg.numerical_rank(S, (d, k)) == true_rank
    assert float(torch.cat([S[true_rank:], S.new_zeros(1)]).max()) <= TOL[dtype] * float(S[0])


def test_factored_svd_float64_is_tighter():
    rng = np.random.default_rng(2)
    errors = {}
    for dtype in (torch.float32, torch.float64):
        lefts, rights, weights = random_terms(rng, 200, 150, [8] * 6, torch.float64)
        U, S, Vh = fm.linalg.factored_svd(lefts, rights, weights, dtype=dtype)
        M = dense(lefts, rights, weights)
        errors[dtype] = np.linalg.norm((U.double() * S.double() @ Vh.double()).numpy() - M) / np.linalg.norm(M)
    assert errors[torch.float64] < 1e-13 < 1e-8 < errors[torch.float32] < 1e-5


def test_product_svd_leading_vectors_only():
    lefts, rights, weights = random_terms(np.random.default_rng(3), 70, 50, [5] * 4)
    svd = linalg.ProductSVD(*linalg.stack(lefts, rights, weights))
    U, Vh = svd.U(), svd.Vh()
    assert U.shape == (70, 20) and Vh.shape == (20, 50)
    for n in (0, 1, 7, 20):
        torch.testing.assert_close(svd.U(n), U[:, :n])
        torch.testing.assert_close(svd.Vh(n), Vh[:n])


@pytest.mark.parametrize("d, k, ranks", [(80, 60, [4, 4, 4]), (30, 90, [2, 6]), (7, 9, [5, 5])])
def test_svd_routes_agree(d, k, ranks):
    lefts, rights, weights = random_terms(np.random.default_rng(4), d, k, ranks)
    M = dense(lefts, rights, weights)
    results = {kind: linalg.svd_of_sum(lefts, rights, weights, kind=kind) for kind in linalg.SVD_KINDS}
    for kind, (U, S, Vh) in results.items():
        assert len(S) == min(d, k, sum(ranks)), kind
        scale = float(results["factored"][1][0])
        torch.testing.assert_close(S, results["factored"][1], rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose((U * S @ Vh).double().numpy(), M, rtol=0, atol=1e-4 * scale)
    with pytest.raises(ValueError, match="svd 'qr'"):
        linalg.svd_of_sum(lefts, rights, weights, kind="qr")


def test_compress_keeps_the_matrix_and_cuts_to_its_rank():
    rng = np.random.default_rng(5)
    lefts, rights, weights = random_terms(rng, 50, 40, [3, 4])
    L, R = linalg.stack(lefts * 2 + [lefts[0]], rights * 2 + [-rights[0]], weights * 2 + [weights[0]])
    delta = fm.LowRank(L, R)  # rank 7 written with 17 columns (duplicates and a cancelling pair)
    M = L.double() @ R.double()
    assert delta.rank == 17 and np.linalg.matrix_rank(M.numpy()) == 7
    out = linalg.compress(delta)
    assert out.rank == 7 and out.shape == (50, 40)
    torch.testing.assert_close(out.dense().double(), M, rtol=0, atol=2e-5 * float(M.norm()))
    zero = linalg.compress(fm.LowRank(torch.cat([L, -L], 1), torch.cat([R, R], 0)))
    assert zero.rank == 0 and zero.shape == (50, 40)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1))
def test_lowrank_norm_matches_dense(shape, seed):
    d, k, ranks = shape
    lefts, rights, weights = random_terms(np.random.default_rng(seed), d, k, ranks)
    L, R = linalg.stack(lefts, rights, weights)
    expected = np.linalg.norm(dense(lefts, rights, weights))
    assert linalg.lowrank_norm(L, R) == pytest.approx(expected, rel=1e-5)


def test_lowrank_norm_of_cancelling_terms_is_zero():
    lefts, rights, _ = random_terms(np.random.default_rng(6), 30, 20, [4])
    L, R = lefts[0], rights[0]
    assert linalg.lowrank_norm(torch.cat([L, -L], 1), torch.cat([R, R], 0)) <= 1e-6 * float((L @ R).norm())


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 10.0)), min_size=1, max_size=30),  # zero or clearly not
    st.integers(1, 8),
    st.floats(0.01, 1.0),
)
def test_energy_rank_is_the_smallest_sufficient_rank(values, rank, tau):
    S = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    r_eff = linalg.energy_rank(S, rank, tau)
    sq = S.numpy() ** 2
    nonzero = int((sq > 0).sum()) if sq[0] > 0 else 0
    if nonzero <= rank:
        assert r_eff == rank
        return
    assert rank <= r_eff <= nonzero
    kept = sq[:r_eff].sum()
    assert kept >= tau * sq.sum() * (1 - 1e-12) or r_eff == nonzero
    if r_eff > rank:  # one component fewer would not be enough
        assert sq[: r_eff - 1].sum() < tau * sq.sum()
    if tau == 1.0:
        assert r_eff == nonzero


def test_energy_rank_rejects_bad_energy():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="residual_energy"):
            linalg.energy_rank(torch.ones(4), 2, bad)


def test_numerical_rank():
    assert linalg.numerical_rank(torch.tensor([3.0, 1.0, 1e-9, 0.0]), (10, 10)) == 2
    assert linalg.numerical_rank(torch.zeros(3), (4, 4)) == 0
    assert linalg.numerical_rank(torch.tensor([]), (4, 4)) == 0


def test_energy_rank_against_a_total_beyond_the_given_values():
    """A sketch's leading values only: the energy is measured against the whole ``Σ σ²``, and ``r_eff ≤ len(S)``."""
    S = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    whole = float((S ** 2).sum()) + 1.0  # a tail of energy 1 that S does not show
    assert linalg.energy_rank(S, 1, 0.9) == 2  # 20 / 21.25 ≥ 0.9 of the values given
    assert linalg.energy_rank(S, 1, 0.9, total=whole) == 3  # 20 / 22.25 < 0.9 ≤ 21 / 22.25 of the whole
    assert linalg.energy_rank(S, 1, 0.99, total=whole) == 4  # never beyond the values given
    assert linalg.energy_rank(S, 1, 0.9, total=1.0) == 2  # a total below the values' own is theirs
