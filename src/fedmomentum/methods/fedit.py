"""FedIT: average A and B separately (the "noisy" baseline: ``ΣpB · ΣpA ≠ Σ pBA``)."""

from __future__ import annotations

from ..types import LoraPair
from .base import LayerResult, Method
from .option_specs import FedITOptions
from .shared import fedit_noise, mean, streamed_noise


class FedIT(Method):
    name = "fedit"
    Options = FedITOptions
    exact = False

    def stream_sums(self, t):
        return frozenset({"A", "B", "noise"})

    def streamed_stats(self, name, mean, noise, weight, scaling):
        return {"noise_norm": streamed_noise(mean, noise, weight, scaling)}

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        new = LoraPair(mean([c.A for c in clients], weights), mean([c.B for c in clients], weights))
        return LayerResult(new, None, {"rank": new.rank, "noise_norm": fedit_noise(clients, weights, new, scaling)})
