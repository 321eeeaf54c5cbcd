"""FlexLoRA: truncated SVD of the exact ``Σ p_i B_i A_i`` to the global rank; the tail is dropped.

Not exact: the energy beyond rank ``r`` is lost every round (reported as ``energy_dropped``).
"""

from __future__ import annotations

from ..linalg import SVD_KINDS, Terms, numerical_rank
from .base import LayerResult, Method
from .shared import SPLITS, adapter_from_svd


class FlexLoRA(Method):
    name = "flexlora"
    exact = False
    mixed_ranks = True

    def __init__(self, split: str = "balanced", svd: str = "auto", **common):
        super().__init__(**common)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if svd not in SVD_KINDS:
            raise ValueError(f"svd must be one of {', '.join(SVD_KINDS)}, got {svd!r}")
        self.split, self.svd = split, svd

    def svd_terms(self, name, global_pair, clients, weights, scaling, t):
        return Terms([c.B for c in clients], [c.A for c in clients], weights)  # Σ p_i B_i A_i

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        rank, shape = global_pair.rank, global_pair.shape
        L, R, S = svd.L, svd.R, svd.S
        alive = min(numerical_rank(svd.S_cpu, shape), rank)
        Vh = svd.Vh(alive)
        new = adapter_from_svd(L @ (R @ Vh.mT), S[:alive], Vh, rank, self.split,
                               lambda n: self.fresh_A(name, n, shape[1], t))
        energy = float((svd.S_cpu.double() ** 2).sum())
        dropped = float((svd.S_cpu[alive:].double() ** 2).sum()) / energy if energy > 0 else 0.0
        return LayerResult(new, None, {"rank": rank, "energy": energy, "energy_dropped": dropped})
