"""FedEx-LoRA: average the factors as FedIT does, and put the exact error ``s(ΣpBA − B'A')`` in the backbone.

Clients of lower rank ``r_i ≤ r`` are zero-padded to the global rank before averaging (HetLoRA-style);
the backbone term makes the result exact either way.
"""

from __future__ import annotations

import torch

from ..linalg import Terms, compress
from ..types import LoraPair, LowRank, UpdateError
from .base import LayerResult, Method, _finish
from .option_specs import FedExLoRAOptions
from .shared import mean


def _pad(pair: LoraPair, rank: int) -> LoraPair:
    extra = rank - pair.rank
    if extra == 0:
        return pair
    return LoraPair(torch.nn.functional.pad(pair.A, (0, 0, 0, extra)), torch.nn.functional.pad(pair.B, (0, extra)))


class FedExLoRA(Method):
    name = "fedex-lora"
    Options = FedExLoRAOptions
    mixed_ranks = True
    update_space = "product"  # a server optimizer acts on W + s B A (the factors and the error belong together)

    def check_ranks(self, global_rank, client_ranks):
        if max(client_ranks) > global_rank:
            raise ValueError(f"{self.name} averages client factors into the global rank {global_rank}: client ranks "
                             f"must not exceed it (got {max(client_ranks)}; raise lora_r, or use flora, flexlora "
                             "or fedmomentum)")

    def validate_update(self, global_lora, update, index=0, scaling=None):
        super().validate_update(global_lora, update, index, scaling)
        for name, pair in update.factors.items():
            if pair.rank > global_lora[name].rank:
                raise UpdateError(f"client {update.client_id or index!r}, layer {name!r}: rank {pair.rank} "
                                  f"exceeds the global rank {global_lora[name].rank}, which {self.name} "
                                  f"cannot average into (use flora, flexlora or fedmomentum)")

    def _average(self, global_pair, clients, weights) -> LoraPair:
        padded = [_pad(c, global_pair.rank) for c in clients]
        return LoraPair(mean([c.A for c in padded], weights), mean([c.B for c in padded], weights))

    def svd_terms(self, name, global_pair, clients, weights, scaling, t):
        """``s Σ p_i B_i A_i − s B'A'``: the exact aggregate minus what the averaged adapter carries."""
        new = self._average(global_pair, clients, weights)
        return Terms([c.B for c in clients] + [new.B], [c.A for c in clients] + [new.A],
                     [scaling * w for w in weights] + [-scaling])

    def stream_sums(self, t):
        return frozenset({"A", "B", "product"})

    def streamed_svd(self, name, mean, product, weight, scaling):
        """``s Σ p_i B_i A_i − s B'A'``: the running sum with ``−B'A'`` folded in at the total weight."""
        product.fold(mean.B, mean.A, -weight)
        return _finish(product, scaling / weight, self.svd)

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        new = self._average(global_pair, clients, weights)
        return LayerResult(new, compress(LowRank(svd.L, svd.R), svd), {"rank": global_pair.rank})
