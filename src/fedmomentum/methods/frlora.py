"""FRLoRA (Yan et al., *Federated Residual Low-Rank Adaption of Large Language Models*, ICLR 2025).

Start (``start``, once): the adapter takes the principal part of each pre-trained weight, PiSSA-style,
``W₀ = U S Vᵀ``, ``B₀ = U_r (S_r/s)^½``, ``A₀ = (S_r/s)^½ V_rᵀ``, and the backbone keeps the rest,
``W ← W₀ − s B₀ A₀`` (the model is unchanged). Every round, every client trains from the same ``(A₀, B₀)``;
the server averages the factors (FedAvg: ``Ā = Σ p_i A_i``, ``B̄ = Σ p_i B_i``), adds the residual
``s (B̄ Ā − B₀ A₀)`` to the backbone (a global update of rank up to ``2r`` per round, so the backbone's change
grows in rank), and re-initialises the adapter to ``(A₀, B₀)``: the principal singular directions of the
pre-trained weights, the same every round, which calibrates the clients' drift.

This follows the authors' public code: the SVD is of the pre-trained weights, taken once; top-``r`` singular
directions; ``√(S/s)`` on each side; factors averaged separately. Their released script trains only ``B`` (``lora_A``
frozen at ``A₀``), the default here (``train_A=False``): every client then holds the same ``A₀``, so the average of
the factors is the average of the client models, ``s(B̄ − B₀) A₀`` of rank ``r``. ``train_A=True`` trains both as the
paper's text describes; averaging the factors then misses ``Σ p_i B_i A_i`` (``noise_norm``), and
``average="products"`` folds the exact ``s(Σ p_i B_i A_i − B₀ A₀)`` instead (not in the paper). Their script also
weighs clients uniformly: the run's ``weighting="uniform"``.

A weight whose rank is below ``r`` (a zero weight, say) has fewer than ``r`` nonzero singular values: the adapter
takes those, and its other slots start as a LoRA init does (``B`` column 0, a fresh ``A`` row).
"""

from __future__ import annotations

from ..linalg import compress, dense_svd, numerical_rank, randomized_svd
from ..types import Aggregate, LoraPair, LowRank
from .base import LayerResult, Method
from .option_specs import FRLoRAOptions
from .shared import adapter_from_svd, fedit_noise, mean, product_sum


class FRLoRA(Method):
    """Options (declared in ``option_specs.FRLoRAOptions``): ``train_A`` (false: ``A`` frozen at ``A₀``, the
    authors' script; true: both factors), ``average`` (``factors``: the paper's FedAvg of A and B; ``products``:
    exact), ``init_svd`` (``dense``: exact SVD of each weight; ``randomized``: ``torch.svd_lowrank``, faster on large
    layers)."""

    name = "frlora"
    Options = FRLoRAOptions
    uses_backbone = True
    update_space = "product"  # a server optimizer acts on W + s B A (the adapter returns to (A₀, B₀))

    def __init__(self, options: FRLoRAOptions | None = None, **values):
        super().__init__(options, **values)
        self.train_A, self.average, self.init_svd = self.options.train_A, self.options.average, self.options.init_svd

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.average == "products" or not self.train_A

    def trainable(self, t):
        return {"A": self.train_A, "B": True}

    def shared(self, t):
        """Nothing of the adapter: it is ``(A₀, B₀)`` every round, which the clients have had since the start; they
        receive only the backbone delta."""
        return {"A": False, "B": False}

    def start(self, global_lora, weights, *, scaling):
        """The PiSSA-style adapter ``(A₀, B₀)`` from each weight's top-``r`` SVD, and ``−s B₀ A₀`` for the backbone."""
        lora, backbone, layers = {}, {}, {}
        for name, pair in global_lora.items():
            W = weights[name]
            if tuple(W.shape) != pair.shape:
                raise ValueError(f"{self.name}: backbone weight of {name!r} has shape {tuple(W.shape)}, the adapter "
                                 f"expects {pair.shape}")
            W = W.to(self.dtype)
            rank = pair.rank
            if self.init_svd == "dense":
                U, S, Vh = dense_svd(W, rank)
            else:  # oversampled by 10, as randomized SVDs usually are, then cut to r
                U, S, Vh = randomized_svd(W, min(rank + 10, *W.shape), niter=4, seed=self.seed)
                U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
            alive = numerical_rank(S, tuple(W.shape))  # zero singular values have no direction to take
            S = S[:alive] / scaling  # s B₀ A₀ = U_r S_r V_rᵀ
            new = adapter_from_svd(U[:, :alive] * S, S, Vh[:alive], rank, "balanced",
                                   lambda n, name=name, k=pair.shape[1]: self.fresh_A(name, n, k, 0))
            lora[name] = LoraPair(new.A.to(pair.A.device), new.B.to(pair.A.device))
            backbone[name] = LowRank((-scaling * new.B).to(pair.A.device), lora[name].A)
            layers[name] = {"rank": rank, "residual_rank": rank}
        stats = {"method": self.name, "round": 0, "rank_kept": max(p.rank for p in lora.values()),
                 "residual_rank": sum(d.rank for d in backbone.values()), "layers": layers}
        return Aggregate(lora, backbone, stats)  # type: ignore[arg-type]

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        init = global_pair  # (A₀, B₀): every client started from it, and the adapter goes back to it
        back = LowRank(-scaling * init.B, init.A)
        stats = {"rank": init.rank}
        if not self.train_A:  # every client holds A₀: s Σ p_i B_i A₀ − s B₀ A₀ = s (B̄ − B₀) A₀
            B = mean([c.B for c in clients], weights)
            update = LowRank(scaling * (B - init.B), init.A)
        elif self.average == "factors":
            A, B = mean([c.A for c in clients], weights), mean([c.B for c in clients], weights)
            update = LowRank(scaling * B, A) + back
            stats["noise_norm"] = fedit_noise(clients, weights, LoraPair(A, B), scaling)
        else:
            update = product_sum(clients, weights, scaling) + back
        delta = compress(update)
        stats["residual_rank"] = delta.rank
        return LayerResult(LoraPair(init.A.clone(), init.B.clone()), delta, stats)
