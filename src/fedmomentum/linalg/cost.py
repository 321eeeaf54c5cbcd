"""What each SVD route of ``Σ w_i L_i R_i`` costs, from its shapes: the model behind ``svd="auto"``.

``M = L R`` with ``L: d×q`` and ``R: q×k`` (``q = Σ r_i``, ``N·r`` for ``N`` clients of rank ``r``):

* factored (exact): Householder QR of ``L`` and ``Rᵀ`` and the SVD of the ``min(d, q)×min(k, q)`` core:
  ``O((d + k) q² + q³)``, cheap while ``q`` is small and as dear as the dense route once ``q`` nears ``min(d, k)``;
* dense (exact): form ``M`` (one matmul, ``2dkq``) and take its SVD: ``O(d k min(d, k))`` whatever ``q``;
* sketch (a randomized SVD of width ``ℓ``, matrix-free): ``2 + 2·niter`` products of ``M`` (or ``Mᵀ``) with
  ``ℓ`` vectors, each ``2(d + k) q ℓ``, and QRs/SVD of ``ℓ``-wide matrices: linear in ``q``.

Counts are textbook flop counts (Golub & Van Loan: QR ``2mn² − 2n³/3``, thin SVD with vectors ``4mn² + 22n³``)
weighted by how much slower a flop of QR and of SVD runs than a flop of matmul (``SPEED``: measured on a 2-core
x86 CPU with MKL, ``benchmarks/aggregation.py``; only their ratios matter, and the routes' crossover moves little
with them because the costs grow at different powers of ``q``).
"""

from __future__ import annotations

SPEED = {"matmul": 1.0, "qr": 1.5, "svd": 1.3}  # relative seconds per flop


def qr_flops(m: int, n: int) -> float:
    """Householder QR of an ``m×n`` matrix (reflectors only)."""
    long, short = max(m, n), min(m, n)
    return 2.0 * long * short**2 - 2.0 * short**3 / 3


def svd_flops(m: int, n: int) -> float:
    """Thin SVD of an ``m×n`` matrix with its singular vectors."""
    long, short = max(m, n), min(m, n)
    return 4.0 * long * short**2 + 22.0 * short**3


def factored_cost(d: int, k: int, q: int) -> float:
    return SPEED["qr"] * (qr_flops(d, q) + qr_flops(k, q)) + SPEED["svd"] * svd_flops(min(d, q), min(k, q))


def dense_cost(d: int, k: int, q: int) -> float:
    return SPEED["matmul"] * 2.0 * d * k * q + SPEED["svd"] * svd_flops(d, k)


def sketch_cost(d: int, k: int, q: int, width: int, niter: int, probes: int) -> float:
    """A sketch of ``width`` columns with ``niter`` power iterations and ``probes`` test vectors."""
    products = (2 + 2 * niter) * width + 2 * probes  # vectors multiplied by M or Mᵀ (factor by factor)
    return (SPEED["matmul"] * 2.0 * (d + k) * q * products
            + SPEED["qr"] * (2 + 2 * niter) * qr_flops(max(d, k), width) + SPEED["svd"] * svd_flops(width, k))


def exact_route(d: int, k: int, q: int) -> str:
    """The cheaper exact route for one ``d×k`` sum of rank ``q``: ``"factored"`` or ``"dense"``."""
    return "factored" if factored_cost(d, k, q) <= dense_cost(d, k, q) else "dense"


def exact_cost(d: int, k: int, q: int) -> float:
    return min(factored_cost(d, k, q), dense_cost(d, k, q))


def sketch_width_budget(d: int, k: int, q: int, niter: int, probes: int, budget: float) -> int:
    """The widest sketch whose cost stays within ``budget`` (0 if none does)."""
    low, high = 0, min(d, k, q)
    while low < high:  # the cost grows with the width
        mid = (low + high + 1) // 2
        if sketch_cost(d, k, q, mid, niter, probes) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
