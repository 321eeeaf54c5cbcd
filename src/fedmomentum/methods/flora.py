"""FLoRA: fold the exact ``s·Σ p_i B_i A_i`` (stacked factors) into the backbone, then restart the adapter.

Exact, but the adapter restarts every round (``B' = 0``, new random ``A'``): no momentum carries over.
"""

from __future__ import annotations

from ..linalg import Terms, compress
from ..types import LoraPair, LowRank
from .base import LayerResult, Method
from .option_specs import FLoRAOptions


class FLoRA(Method):
    name = "flora"
    Options = FLoRAOptions
    mixed_ranks = True
    update_space = "product"  # a server optimizer acts on W + s B A (the adapter restarts every round)

    def stream_sums(self, t):
        return None if self.svd == "randomized" else frozenset({"product"})

    def product_scale(self, scaling):
        return scaling

    def svd_terms(self, name, global_pair, clients, weights, scaling, t):
        return Terms([c.B for c in clients], [c.A for c in clients], [scaling * w for w in weights])

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        delta = compress(LowRank(svd.L, svd.R), svd)  # s·Σ p_i B_i A_i
        rank, (out_features, in_features) = global_pair.rank, global_pair.shape
        new = LoraPair(self.fresh_A(name, rank, in_features, t).to(delta.left.device),
                       delta.left.new_zeros(out_features, rank))
        return LayerResult(new, delta, {"rank": rank})
