"""SVDs of sums of low-rank products, without forming the dense matrix, and the energy split.

``Σ w_i L_i R_i`` with ``L_i: d×r_i`` and ``R_i: r_i×k`` has rank ``q ≤ Σ r_i``. Stacking gives one product
``L R`` (``L: d×q``, ``R: q×k``); QR of ``L`` and of ``Rᵀ`` leaves a ``q×q`` core whose SVD is the SVD of the
whole, exactly, at ``O((d+k) q²)`` instead of ``O(d k min(d, k))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import LowRank, Tensor

SVD_KINDS = ("factored", "dense", "randomized")


def stack(lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float] | None = None):
    """``(L, R)`` with ``L @ R = Σ w_i lefts[i] @ rights[i]``; the weights go on the left factors."""
    if weights is None:
        weights = [1.0] * len(lefts)
    if not (len(lefts) == len(rights) == len(weights)) or not lefts:
        raise ValueError(f"need as many lefts, rights and weights, and at least one: "
                         f"{len(lefts)}, {len(rights)}, {len(weights)}")
    return torch.cat([w * L for w, L in zip(weights, lefts, strict=True)], 1), torch.cat(list(rights), 0)


def _thin_svd_of_product(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    Q_left, R_left = torch.linalg.qr(L)
    Q_right, R_right = torch.linalg.qr(R.mT)
    U_core, S, Vh_core = torch.linalg.svd(R_left @ R_right.mT, full_matrices=False)
    return Q_left @ U_core, S, Vh_core @ Q_right.mT


def factored_svd(
    lefts: Sequence[Tensor],
    rights: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD ``(U, S, Vh)`` of ``Σ w_i lefts[i] @ rights[i]``, never forming the ``d×k`` matrix.

    Returns ``min(d, k, Σ r_i)`` components, singular values in descending order (trailing ones may be
    numerically zero when the sum is rank deficient; see ``numerical_rank``).
    """
    L, R = stack([x.to(dtype) for x in lefts], [x.to(dtype) for x in rights], weights)
    return _thin_svd_of_product(L, R)


def dense_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of the dense matrix, truncated to ``rank`` components: the reference and the slow path."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def randomized_svd(M: Tensor, rank: int, niter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.svd_lowrank`` on the dense matrix, as published federated-LoRA code does (for parity)."""
    with torch.random.fork_rng(devices=[M.device] if M.is_cuda else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M, q=rank, niter=niter)
    return U, S, V.mT


def svd_of_sum(
    lefts: Sequence[Tensor],
    rights: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    kind: str = "factored",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``Σ w_i lefts[i] @ rights[i]`` by the chosen route; every route returns ``≤ Σ r_i`` components."""
    if kind == "factored":
        return factored_svd(lefts, rights, weights, dtype)
    if kind not in SVD_KINDS:
        raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
    L, R = stack([x.to(dtype) for x in lefts], [x.to(dtype) for x in rights], weights)
    rank = min(L.shape[1], L.shape[0], R.shape[1])
    return dense_svd(L @ R, rank) if kind == "dense" else randomized_svd(L @ R, rank)


def numerical_rank(S: Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values are above round-off (numpy's ``matrix_rank`` rule)."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    tol = S[0] * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


def energy_rank(S: Tensor, rank: int, energy: float) -> int:
    """Smallest ``r_eff ≥ rank`` whose leading components hold ``energy`` of ``Σ σ²``.

    Never more than the nonzero components, so ``energy = 1`` keeps exactly the nonzero spectrum.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"residual_energy must be in (0, 1], got {energy}")
    nonzero = numerical_rank(S, (S.numel(),))
    if nonzero <= rank:
        return rank
    if energy >= 1.0:
        return nonzero
    cumulative = torch.cumsum(S.double() ** 2, 0)
    needed = int((cumulative < energy * cumulative[-1]).sum()) + 1
    return min(max(rank, needed), nonzero)


def lowrank_norm(left: Tensor, right: Tensor) -> float:
    """``‖left @ right‖_F`` from the ``q×q`` core of two QRs (no cancellation, no ``d×k`` matrix)."""
    _, R_left = torch.linalg.qr(left)
    _, R_right = torch.linalg.qr(right.mT)
    return float(torch.linalg.matrix_norm(R_left @ R_right.mT))


def compress(delta: LowRank) -> LowRank:
    """The same matrix with its factors cut to its numerical rank (``U S`` on the left, ``Vh`` on the right)."""
    if delta.rank == 0:
        return delta
    U, S, Vh = _thin_svd_of_product(delta.left, delta.right)
    keep = numerical_rank(S, (delta.rank,) + delta.shape)
    return LowRank(U[:, :keep] * S[:keep], Vh[:keep].contiguous())
