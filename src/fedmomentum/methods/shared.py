"""The small pieces of maths several methods use: weighted means, stacked products, FedIT's averaging error, an
adapter from an SVD, an adapter brought to another rank."""

from __future__ import annotations

import math

import torch

from ..linalg import ProductSVD, lowrank_norm, numerical_rank, stack
from ..types import LoraPair, LowRank, Tensor


def at_rank(pair: LoraPair, rank: int, ratio: float, fresh_A) -> LoraPair:
    """Rank-``rank`` factors with ``B' A' = ratio · B A`` when ``rank ≥ rank(B A)``, else its best rank-``rank``
    part (truncated SVD, ``√S`` on each side); extra slots get ``B`` column 0 and a fresh ``A`` row."""
    if rank >= pair.rank:
        root = math.sqrt(ratio)
        extra = rank - pair.rank
        B = torch.cat([pair.B * root, pair.B.new_zeros(pair.B.shape[0], extra)], 1)
        A = torch.cat([pair.A * root, fresh_A(extra).to(pair.A)], 0) if extra else pair.A * root
        return LoraPair(A.contiguous(), B.contiguous())
    svd = ProductSVD(pair.B, pair.A)
    alive = min(numerical_rank(svd.S, pair.shape), rank)
    S = svd.S[:alive] * ratio
    return adapter_from_svd(svd.U(alive) * S, S, svd.Vh(alive), rank, "balanced", fresh_A)


def mean(tensors: list[Tensor], weights: list[float]) -> Tensor:
    return sum(w * t for w, t in zip(weights, tensors, strict=True))


def product_sum(clients: list[LoraPair], weights: list[float], scaling: float = 1.0) -> LowRank:
    """``scaling · Σ p_i B_i A_i`` in stacked factored form (rank ``Σ r_i``)."""
    left, right = stack([c.B for c in clients], [c.A for c in clients], [scaling * w for w in weights])
    return LowRank(left, right)


def fedit_noise(clients: list[LoraPair], weights: list[float], new: LoraPair, scaling: float) -> float:
    """``‖s(Σ p_i B_i A_i − B'A')‖_F``: what averaging the factors separately gets wrong."""
    exact = product_sum(clients, weights, scaling)
    return lowrank_norm(torch.cat([exact.left, -scaling * new.B], 1), torch.cat([exact.right, new.A], 0))


def streamed_noise(new: LoraPair, noise, weight: float, scaling: float) -> float:
    """``fedit_noise`` from a streamed round: ``noise`` holds ``Σ w_i B_i A_i`` (``linalg.ProductSum``, total weight
    ``weight``); ``−B'A'`` is folded in at that weight and the sum's norm taken at ``s / weight``."""
    noise.fold(new.B, new.A, -weight)
    return noise.norm(scaling / weight)


def adapter_from_svd(US: Tensor, S: Tensor, Vh: Tensor, rank: int, split: str, fresh_A) -> LoraPair:
    """Rank-``rank`` factors with ``B A = U S Vh`` for the given components (``US = U S``, all ``S > 0``).

    ``split="balanced"`` puts ``√S`` on each side, ``"left"`` all of ``S`` on ``B``. Slots beyond the given
    components (missing or numerically zero ones) get ``B`` column 0 and a fresh ``A`` row (``fresh_A(n)``,
    like a LoRA init), so they stay trainable instead of being stuck at ``A = B = 0``.
    """
    if split == "balanced":
        root = S.sqrt()
        B, A = US / root, root[:, None] * Vh
    else:
        B, A = US, Vh
    if len(S) < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - len(S))], 1)
        A = torch.cat([A, fresh_A(rank - len(S)).to(A)], 0)
    return LoraPair(A.contiguous(), B.contiguous())
