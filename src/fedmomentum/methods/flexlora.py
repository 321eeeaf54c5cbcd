"""FlexLoRA (Bai et al. 2024): truncated SVD of the exact ``Σ p_i B_i A_i`` to the global rank; the tail is dropped.

Not exact: the global model loses the energy beyond rank ``r`` (``lora_r``) every round (``energy_dropped``).

Clients of other ranks (FlexLoRA's point): each client of rank ``r_k`` starts from the top ``r_k`` components of
the aggregate (``client_start``). Below ``r`` they are the truncated SVD of the global adapter. Above it, the
server keeps the aggregate's next components, ``r + 1 …`` up to the largest client rank it has aggregated, in the
method's state (the slots ``tail_A`` / ``tail_B``, split like the adapter), and a client of rank ``r_k > r`` starts
from the adapter with the first ``r_k − r`` of them appended. The global model (evaluation, exports) stays at rank
``r``. Before any aggregate, and for components the aggregate lacks, the extra slots get ``B`` column 0 and a fresh
``A`` row, as for every method.
"""

from __future__ import annotations

import torch

from ..linalg import Terms, numerical_rank
from ..types import LoraPair
from .base import LayerResult, Method
from .option_specs import FlexLoRAOptions
from .shared import adapter_from_svd

TAIL_A, TAIL_B = "tail_A", "tail_B"  # the state's slots: the aggregate's components r+1 … (A rows, B columns)


class FlexLoRA(Method):
    """Options: ``split``, ``svd``. State: each layer's components beyond the global rank, up to the largest client
    rank aggregated so far (``tail_A``, ``tail_B``), for the clients above the global rank."""

    name = "flexlora"
    Options = FlexLoRAOptions
    exact = False
    mixed_ranks = True
    update_space = "product"  # a server optimizer acts on W + s B A (its factors come from an SVD every round)
    start_state = (TAIL_A, TAIL_B)  # the state's slots a client's start reads (sent to clients above the rank)

    def __init__(self, options: FlexLoRAOptions | None = None, **values):
        super().__init__(options, **values)
        self.split, self.svd = self.options.split, self.options.svd

    def check_ranks(self, global_rank, client_ranks):
        pass  # any rank: above the global one from the components kept in the state

    def client_start(self, global_lora, *, own=None, rank=None, scaling=None, global_scaling=None, t=1, state=None):
        """Below the global rank: the adapter's truncated SVD (``Method.client_start``); above it: the adapter
        with the aggregate's next ``r_k − r`` components appended (those the state holds), then rescaled by
        ``s / s_k`` like every start, so that ``s_k B_k A_k`` is ``s ×`` the top ``r_k`` components of the
        aggregate."""
        tails = (state or {}).get(TAIL_A, {}), (state or {}).get(TAIL_B, {})
        if rank is not None:
            global_lora = {name: _extended(pair, rank, tails[0].get(name), tails[1].get(name))
                           for name, pair in global_lora.items()}
        return super().client_start(global_lora, own=own, rank=rank, scaling=scaling, global_scaling=global_scaling,
                                    t=t)

    def stream_sums(self, t):
        return None if self.svd == "randomized" else frozenset({"product"})

    def svd_terms(self, name, global_pair, clients, weights, scaling, t):
        return Terms([c.B for c in clients], [c.A for c in clients], weights)  # Σ p_i B_i A_i

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        rank, shape = global_pair.rank, global_pair.shape
        L, R, S = svd.L, svd.R, svd.S
        nonzero = numerical_rank(svd.S_cpu, shape)
        alive = min(nonzero, rank)
        held = state[TAIL_A].shape[0] if TAIL_A in state else 0
        widest = max([c.rank for c in clients] + [rank + held])  # the largest client rank aggregated so far
        kept = min(nonzero, widest)  # components a client may start from: the adapter's, then the tail's
        Vh = svd.Vh(max(alive, kept))
        US = L @ (R @ Vh.mT)
        new = adapter_from_svd(US[:, :alive], S[:alive], Vh[:alive], rank, self.split,
                               lambda n: self.fresh_A(name, n, shape[1], t))
        tail = None
        if kept > rank:
            part = adapter_from_svd(US[:, rank:kept], S[rank:kept], Vh[rank:kept], kept - rank, self.split, None)
            tail = {TAIL_A: part.A, TAIL_B: part.B}
        energy = float((svd.S_cpu.double() ** 2).sum())
        dropped = float((svd.S_cpu[alive:].double() ** 2).sum()) / energy if energy > 0 else 0.0
        return LayerResult(new, None, {"rank": rank, "energy": energy, "energy_dropped": dropped}, tail)


def _extended(pair: LoraPair, rank: int, tail_A: torch.Tensor | None, tail_B: torch.Tensor | None) -> LoraPair:
    """The adapter with up to ``rank − r`` of the tail's components appended (as many as it holds)."""
    take = 0 if tail_A is None else min(rank - pair.rank, tail_A.shape[0])
    if take <= 0:
        return pair
    if tail_B is None or tail_A.ndim != 2 or tail_B.ndim != 2 or tail_A.shape[1] != pair.A.shape[1] \
            or tail_B.shape[0] != pair.B.shape[0] or tail_B.shape[1] != tail_A.shape[0]:
        raise ValueError(f"flexlora's state: tail_A {tuple(tail_A.shape)} and tail_B "
                         f"{None if tail_B is None else tuple(tail_B.shape)} do not fit the adapter's A "
                         f"{tuple(pair.A.shape)}, B {tuple(pair.B.shape)} (another model?)")
    return LoraPair(torch.cat([pair.A, tail_A[:take].to(pair.A)], 0),
                    torch.cat([pair.B, tail_B[:, :take].to(pair.B)], 1))


__all__ = ["TAIL_A", "TAIL_B", "FlexLoRA"]
