"""FlexLoRA: truncated SVD of the exact ``Σ p_i B_i A_i`` to the global rank; the tail is dropped.

Not exact: the energy beyond rank ``r`` is lost every round (reported as ``energy_dropped``).
"""

from __future__ import annotations

from ..linalg import Terms, numerical_rank
from .base import LayerResult, Method
from .option_specs import FlexLoRAOptions
from .shared import adapter_from_svd


class FlexLoRA(Method):
    name = "flexlora"
    Options = FlexLoRAOptions
    exact = False
    mixed_ranks = True

    def __init__(self, options: FlexLoRAOptions | None = None, **values):
        super().__init__(options, **values)
        self.split, self.svd = self.options.split, self.options.svd

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
