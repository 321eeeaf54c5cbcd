"""FedMomentum (arXiv 2603.08014): keep the adapter's momentum by rebuilding it from the exact aggregate.

``Σ p_i B_i A_i = U S Vᵀ``. The top ``r`` components become the new adapter (``√S`` on each side), the
next ones up to ``r_eff`` (set by ``residual_energy``) are merged into the backbone, so with
``residual_energy = 1`` the global model is exactly the weighted average of the client models.
"""

from __future__ import annotations

import torch

from ..linalg import SVD_KINDS, compress, energy_rank, numerical_rank, svd_of_sum
from ..types import LoraPair, LowRank, Tensor
from .base import Method

SPLITS = ("balanced", "left")


def adapter_from_svd(U: Tensor, S: Tensor, Vh: Tensor, rank: int, split: str, fresh_A) -> LoraPair:
    """Rank-``rank`` factors with ``B A = U_r S_r V_rᵀ``.

    Components that are missing or numerically zero get ``B`` column 0 and a fresh ``A`` row (``fresh_A(n)``,
    like a LoRA init), so those slots stay trainable instead of being stuck at ``A = B = 0``.
    """
    alive = min(numerical_rank(S, (U.shape[0], Vh.shape[1])), rank)
    U, S, Vh = U[:, :alive], S[:alive], Vh[:alive]
    left_scale, right_scale = (S.sqrt(), S.sqrt()) if split == "balanced" else (S, torch.ones_like(S))
    B, A = U * left_scale, right_scale[:, None] * Vh
    if alive < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - alive)], 1)
        A = torch.cat([A, fresh_A(rank - alive)], 0)
    return LoraPair(A.contiguous(), B.contiguous())


class FedMomentum(Method):
    """Options: ``residual_energy`` τ, ``split``, ``merge_residual``, ``merge_every``, ``svd``."""

    name = "fedmomentum"
    mixed_ranks = True

    def __init__(self, residual_energy: float = 1.0, split: str = "balanced", merge_residual: bool = True,
                 merge_every: int = 1, svd: str = "factored", **common):
        super().__init__(**common)
        if not 0.0 < residual_energy <= 1.0:
            raise ValueError(f"residual_energy must be in (0, 1], got {residual_energy}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not isinstance(merge_every, int) or merge_every < 1:
            raise ValueError(f"merge_every must be an integer ≥ 1, got {merge_every!r}")
        if svd not in SVD_KINDS:
            raise ValueError(f"svd must be one of {', '.join(SVD_KINDS)}, got {svd!r}")
        self.residual_energy, self.split, self.merge_residual = residual_energy, split, merge_residual
        self.merge_every, self.svd = merge_every, svd
        self.pending: dict[str, LowRank] = {}  # residuals held on the server until the next release

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.merge_residual and self.residual_energy >= 1.0 and self.merge_every == 1

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, round):
        rank, shape = global_pair.rank, global_pair.shape
        U, S, Vh = svd_of_sum([c.B for c in clients], [c.A for c in clients], weights, self.svd, self.dtype)
        new = adapter_from_svd(U, S, Vh, rank, self.split,
                               lambda n: self.fresh_A(name, n, shape[1], round))
        keep = energy_rank(S, rank, self.residual_energy) if self.merge_residual else min(rank, len(S))
        energy = float((S.double() ** 2).sum())
        stats = {
            "rank": rank,
            "residual_rank": max(0, keep - rank),
            "energy": energy,
            "energy_dropped": float((S[keep:].double() ** 2).sum()) / energy if energy > 0 else 0.0,
        }
        if keep <= rank and name not in self.pending:
            return new, None, stats
        residual = LowRank((scaling * U[:, rank:keep]) * S[rank:keep], Vh[rank:keep].contiguous())
        if name in self.pending:
            residual = compress(self.pending.pop(name) + residual)
        if (round + 1) % self.merge_every == 0:
            return new, residual, stats
        self.pending[name] = residual
        stats["pending_rank"] = residual.rank
        return new, None, stats

    def state_dict(self):
        state = {}
        for name, delta in self.pending.items():
            state[f"pending.{name}.left"] = delta.left.clone()
            state[f"pending.{name}.right"] = delta.right.clone()
        return state

    def load_state_dict(self, state):
        names = {key[len("pending."):].rsplit(".", 1)[0] for key in state}
        unknown = [key for key in state if not key.startswith("pending.")]
        if unknown:
            raise ValueError(f"fedmomentum: unexpected state keys {unknown[:5]}")
        try:
            self.pending = {n: LowRank(state[f"pending.{n}.left"], state[f"pending.{n}.right"]) for n in names}
        except KeyError as missing:
            raise ValueError(f"fedmomentum: state is missing {missing}") from None
