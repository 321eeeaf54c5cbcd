"""FFA-LoRA: ``A`` stays frozen at its seeded init on every client; only ``B`` is trained and averaged.

With a shared ``A``, ``Σ p_i B_i A = (Σ p_i B_i) A``: exact, at the price of half the adapter's freedom.
"""

from __future__ import annotations

from ..types import LoraPair
from .base import LayerResult, Method
from .option_specs import FFALoRAOptions
from .shared import mean


class FFALoRA(Method):
    name = "ffa-lora"
    Options = FFALoRAOptions

    def trainable(self, t):
        return {"A": False, "B": True}

    def stream_sums(self, t):
        return frozenset({"B"})

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        new = LoraPair(global_pair.A.clone(), mean([c.B for c in clients], weights))
        return LayerResult(new, None, {"rank": new.rank})
