"""RoLoRA: alternate the trained factor, ``B`` in even rounds and ``A`` in odd ones; average only that one.

The frozen factor is the same on every client, so the average of the products is exact.
"""

from __future__ import annotations

from ..types import LoraPair
from .base import Method
from .option_specs import RoLoRAOptions
from .shared import mean


class RoLoRA(Method):
    name = "rolora"
    Options = RoLoRAOptions

    def trainable(self, round):
        return {"A": round % 2 == 1, "B": round % 2 == 0}

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, round, svd):
        if self.trainable(round)["B"]:
            new = LoraPair(global_pair.A.clone(), mean([c.B for c in clients], weights))
        else:
            new = LoraPair(mean([c.A for c in clients], weights), global_pair.B.clone())
        return new, None, {"rank": new.rank}
