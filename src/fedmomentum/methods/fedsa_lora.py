"""FedSA-LoRA (Guo et al., *Selective Aggregation for Low-Rank Adaptation in Federated Learning*, ICLR 2025).

``A`` learns what the clients share and ``B`` what is their own: clients train both, the server averages only
``A`` (``A' = Σ p_i A_i``) and sends it back, and each client keeps its own ``B`` from round to round (its state:
``local = ("B",)``; a client that has not trained yet starts from the global init). ``B`` never goes back to the
clients.

The server's own model, the one it evaluates and exports, needs a ``B`` too: it uses ``B' = Σ p_i B_i`` of the
round's clients, so clients also report ``B`` (counted in the uplink). That model is FedIT's average, and is not
the average of the client models (``noise_norm``); each client's own model is ``(A', B_i)``.
"""

from __future__ import annotations

from ..types import LoraPair
from .base import LayerResult, Method
from .option_specs import FedSALoRAOptions
from .shared import fedit_noise, mean, streamed_noise


class FedSALoRA(Method):
    name = "fedsa-lora"
    Options = FedSALoRAOptions
    exact = False
    local = ("B",)

    def stream_sums(self, t):
        return frozenset({"A", "B", "noise"})

    def streamed_stats(self, name, mean, noise, weight, scaling):
        return {"noise_norm": streamed_noise(mean, noise, weight, scaling)}

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        new = LoraPair(mean([c.A for c in clients], weights), mean([c.B for c in clients], weights))
        return LayerResult(new, None, {"rank": new.rank, "noise_norm": fedit_noise(clients, weights, new, scaling)})
