"""Sums of low-rank products for the linalg tests: clients drifting around one adapter (a fast-decaying spectrum)
or independent (flat), and float64 references."""

from __future__ import annotations

import numpy as np
import torch

from fedmomentum import linalg

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def drift_terms(rng, d, k, r, n, spread=0.3, dtype=torch.float32) -> linalg.Terms:
    """``n`` clients' ``(B_i, A_i)`` around one shared adapter (as after a round of local training): the sum's
    spectrum decays fast after the first ``r`` components."""
    B0, A0 = rng.standard_normal((d, r)), rng.standard_normal((r, k))
    lefts = [torch.tensor(B0 + spread * rng.standard_normal((d, r)), dtype=dtype) for _ in range(n)]
    rights = [torch.tensor(A0 + spread * rng.standard_normal((r, k)), dtype=dtype) for _ in range(n)]
    return linalg.Terms(lefts, rights, list(rng.uniform(0.5, 1.5, n)))


def flat_terms(rng, d, k, r, n, dtype=torch.float32) -> linalg.Terms:
    """Independent Gaussian clients: a flat spectrum, the worst case for a sketch."""
    return linalg.Terms([torch.tensor(rng.standard_normal((d, r)), dtype=dtype) for _ in range(n)],
                        [torch.tensor(rng.standard_normal((r, k)), dtype=dtype) for _ in range(n)],
                        list(rng.uniform(0.5, 1.5, n)))


def dense(t: linalg.Terms) -> np.ndarray:
    return sum(w * L.double().numpy() @ R.double().numpy() for L, R, w in zip(t.lefts, t.rights, t.weights,
                                                                             strict=True))


def roundoff(t: linalg.Terms) -> float:
    """What float round-off may move the sum by: ``c · eps · Σ |w_i| ‖L_i‖_F ‖R_i‖_F``, with ``c = 8 √max(d, k, q)``
    for the dimension-dependent constants of QR and SVD."""
    d, k, q = t.shape
    size = sum(abs(w) * float(L.double().norm() * R.double().norm()) for L, R, w in zip(t.lefts, t.rights, t.weights,
                                                                                      strict=True))
    return 8 * max(d, k, q) ** 0.5 * EPS[t.lefts[0].dtype] * size


def reconstruction(svd: linalg.ProductSVD) -> np.ndarray:
    return ((svd.U().double() * svd.S.double()) @ svd.Vh().double()).numpy()
