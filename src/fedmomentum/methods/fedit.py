"""FedIT: average A and B separately (the "noisy" baseline: ``ΣpB · ΣpA ≠ Σ pBA``)."""

from __future__ import annotations

from ..types import LoraPair
from .base import LayerResult, Method
from .option_specs import FedITOptions
from .shared import fedit_noise, mean


class FedIT(Method):
    name = "fedit"
    Options = FedITOptions
    exact = False

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        new = LoraPair(mean([c.A for c in clients], weights), mean([c.B for c in clients], weights))
        return LayerResult(new, None, {"rank": new.rank, "noise_norm": fedit_noise(clients, weights, new, scaling)})
