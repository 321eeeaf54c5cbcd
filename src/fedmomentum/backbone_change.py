"""The whole change a run made to the model, kept factored, and the one LoRA adapter that carries it to the
original base.

A run that changes the backbone (flora, fedex-lora, fedmomentum, frlora) adds a low-rank delta to the adapted
layers every round. Their sum, kept as ``left @ right`` and cut to its numerical rank after each round
(``linalg.compress``), plus the final adapter ``s·B·A``, is everything the run changed: an adapter of that rank on
the *original* base model computes the final model, and no ``d×k`` matrix is ever formed.
"""

from __future__ import annotations

import torch

from .linalg import compress
from .types import LoraPair, LowRank


class BackboneChange:
    """The sum of every backbone delta applied so far, per layer, as concatenated factors.

    Adding is a concatenation; a layer's factors are cut back to their numerical rank (``linalg.compress``, cost
    ``O((d+k) q²)`` for width ``q``) only when their width has grown by ``slack`` times since the last cut: by default
    when it has doubled, so the cost per round stays a small share of the aggregation and the width stays within
    twice the change's rank. A change that quantized layers compute with in every forward pass (``change_branch.py``)
    is kept tighter (``keep_tight``): there the width costs ``2 q (d+k)`` operations per token, far more than a cut.
    """

    def __init__(self, deltas: dict[str, LowRank] | None = None, *, slack: float = 2.0):
        self.deltas: dict[str, LowRank] = {}
        self._cut: dict[str, int] = {}  # width after each layer's last cut
        self.slack = slack
        self.add(deltas or {})

    def add(self, deltas: dict[str, LowRank]) -> None:
        for name, delta in deltas.items():
            delta = delta.to("cpu", torch.float32)
            total = self.deltas[name] + delta if name in self.deltas else delta
            if total.rank > max(self.slack * self._cut.get(name, 0), MIN_CUT):
                total = compress(total)
                self._cut[name] = total.rank
            self.deltas[name] = total

    def keep_tight(self) -> None:
        """Cut a layer once its width exceeds its rank at the last cut by ``TIGHT_SLACK``, and now."""
        self.slack = TIGHT_SLACK
        for name, delta in self.deltas.items():
            if delta.rank > MIN_CUT and delta.rank > self._cut.get(name, 0):
                self.deltas[name] = compress(delta)
                self._cut[name] = self.deltas[name].rank


MIN_CUT = 32  # below this width, factors are not worth cutting
TIGHT_SLACK = 1.25


def whole_change(change: dict[str, LowRank], lora: dict[str, LoraPair], scaling: float,
                 rank: int | None = None) -> tuple[dict[str, LoraPair], dict[str, dict]]:
    """Per layer, factors with ``B @ A = change + s·B_f·A_f`` (``√S`` on each side) at that sum's numerical rank,
    or at most ``rank``; and per layer the ``rank`` kept, the ``energy`` ``Σ σ²`` and the ``energy_dropped`` by the
    cut (``Σ dropped σ² / Σ σ²``). Layers the run left unchanged are absent."""
    factors, stats = {}, {}
    for name, pair in lora.items():
        total = LowRank(scaling * pair.B.float().cpu(), pair.A.float().cpu())
        if name in change:
            total = change[name].to("cpu", torch.float32) + total
        exact = compress(total)  # U S (orthogonal columns, norms S descending), Vh
        S = exact.left.norm(dim=0)
        cut = S.numel() if rank is None else min(S.numel(), rank)
        if cut == 0:
            continue
        root = S[:cut].sqrt()
        factors[name] = LoraPair((root[:, None] * exact.right[:cut]).contiguous(),
                                 (exact.left[:, :cut] / root).contiguous())
        energy = float((S.double() ** 2).sum())
        stats[name] = {"rank": cut, "energy": energy, "energy_dropped": float((S[cut:].double() ** 2).sum()) / energy}
    return factors, stats
