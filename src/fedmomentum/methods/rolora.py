"""RoLoRA: alternate the trained factor, ``B`` in even rounds and ``A`` in odd ones; average only that one.

The frozen factor is the same on every client, so the average of the products is exact.
"""

from __future__ import annotations

from ..types import LoraPair
from .base import LayerResult, Method
from .option_specs import RoLoRAOptions
from .shared import mean


class RoLoRA(Method):
    name = "rolora"
    Options = RoLoRAOptions

    def trainable(self, t):
        """``B`` in rounds 1, 3, 5, …, ``A`` in rounds 2, 4, … (round 0, before training, as round 1)."""
        train_B = t % 2 == 1 or t == 0
        return {"A": not train_B, "B": train_B}

    def stream_sums(self, t):
        return frozenset({"B"} if self.trainable(t)["B"] else {"A"})

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        if self.trainable(t)["B"]:
            new = LoraPair(global_pair.A.clone(), mean([c.B for c in clients], weights))
        else:
            new = LoraPair(mean([c.A for c in clients], weights), global_pair.B.clone())
        return LayerResult(new, None, {"rank": new.rank})
