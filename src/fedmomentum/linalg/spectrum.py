"""Ranks and norms read off a spectrum or a pair of factors (no ``d×k`` matrix)."""

from __future__ import annotations

import torch

from ..types import Tensor


def numerical_rank(S: Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values are above round-off (numpy's ``matrix_rank`` rule)."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    tol = S[0] * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


def energy_rank(S: Tensor, rank: int, energy: float, total: float | None = None) -> int:
    """Smallest ``r_eff ≥ rank`` whose leading components hold ``energy`` of ``Σ σ²``.

    Never more than the nonzero components, so ``energy = 1`` keeps exactly the nonzero spectrum. ``total``: the
    whole ``Σ σ²`` when ``S`` holds only the leading singular values (a sketch's: ``ProductSVD.energy``); then
    ``r_eff`` is at most ``len(S)``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"residual_energy must be in (0, 1], got {energy}")
    nonzero = numerical_rank(S, (S.numel(),))
    if nonzero <= rank:
        return rank
    if energy >= 1.0:
        return nonzero
    cumulative = torch.cumsum(S.double() ** 2, 0)
    whole = float(cumulative[-1]) if total is None else max(float(total), float(cumulative[-1]))
    needed = int((cumulative < energy * whole).sum()) + 1
    return min(max(rank, needed), nonzero)


def lowrank_norm(left: Tensor, right: Tensor) -> float:
    """``‖left @ right‖_F`` from the ``q×q`` core of two QRs (no cancellation, no ``d×k`` matrix)."""
    R_left = torch.linalg.qr(left, mode="r")[1]
    R_right = torch.linalg.qr(right.mT, mode="r")[1]
    return float(torch.linalg.matrix_norm(R_left @ R_right.mT))


def spectral_norm(X: Tensor) -> float:
    """``‖X‖₂`` of a thin (or wide) matrix, from its small Gram matrix."""
    gram = X.mT @ X if X.shape[0] >= X.shape[1] else X @ X.mT
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt()) if gram.numel() else 0.0
