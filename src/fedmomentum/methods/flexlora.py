"""FlexLoRA: truncated SVD of the exact ``Σ p_i B_i A_i`` to the global rank; the tail is dropped.

Not exact: the energy beyond rank ``r`` is lost every round (reported as ``energy_dropped``).

Clients of other ranks (FlexLoRA's point): each client of rank ``r_k`` starts from the top ``r_k`` components of
the aggregate (``Method.client_start``), as FederatedScope redistributes it. The global adapter keeps the top ``r``
(``lora_r``), so client ranks may not exceed it: a client above would get only those ``r`` components, zero-padded.
With ``lora_r`` = the largest client rank, every client's top-``r_k`` part of the kept adapter is the top-``r_k``
part of the whole aggregate.
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
    update_space = "product"  # a server optimizer acts on W + s B A (its factors come from an SVD every round)

    def __init__(self, options: FlexLoRAOptions | None = None, **values):
        super().__init__(options, **values)
        self.split, self.svd = self.options.split, self.options.svd

    def check_ranks(self, global_rank, client_ranks):
        if max(client_ranks) > global_rank:
            raise ValueError(f"{self.name} keeps the aggregate's top lora_r = {global_rank} components, so a client "
                             f"of rank {max(client_ranks)} could not get its top {max(client_ranks)}: set lora_r to "
                             "the largest client rank")

    def client_start(self, global_lora, *, own=None, rank=None, scaling=None, global_scaling=None, t=1):
        above = [name for name, pair in global_lora.items() if rank is not None and rank > pair.rank]
        if above:
            self.check_ranks(global_lora[above[0]].rank, [rank])
        return super().client_start(global_lora, own=own, rank=rank, scaling=scaling, global_scaling=global_scaling,
                                    t=t)

    def stream_sums(self, t):
        return None if self.svd == "randomized" else frozenset({"product"})

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
