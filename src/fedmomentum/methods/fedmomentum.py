"""FedMomentum (arXiv 2603.08014): keep the adapter's momentum by rebuilding it from the exact aggregate.

``M = Σ p_i B_i A_i = U S Vᵀ``. The top ``r`` components become the new adapter (``√S`` on each side), the
next ones up to ``r_eff`` (set by ``residual_energy``) are merged into the backbone, so with
``residual_energy = 1`` the global model is exactly the weighted average of the client models.

Only the right singular vectors are formed, and only as many as are used (``linalg.ProductSVD``): with
``M = L R`` stacked, the adapter is ``U_r S_r V_rᵀ = (L (R V_r)) V_rᵀ`` and, when the whole tail goes to the
backbone, the residual is ``M − M V_r V_rᵀ = L (R − (R V_r) V_rᵀ)``: exact by construction (whatever the
SVD's round-off), at ``O((d + k) q r)`` beyond the two QRs, kept as rank-``q`` factors rather than being
compressed to rank ``q − r``.

Cheaper downlink, as options: ``compress_residual`` sends the residual as its own SVD components
``r+1 … rank(M)`` (rank ``q − r`` instead of ``q``: ``U S`` and ``Vᵀ`` of the tail, exact to the SVD's round-off);
``residual_dtype`` rounds the residual factors to ``bfloat16`` / ``float16`` before they are sent (2 bytes a value;
the server applies the same rounded delta, so every party keeps the same model, and the rounding is recorded per
layer as ``rounding_error``, relative to ``‖s M‖``).
"""

from __future__ import annotations

import typing

import torch

from ..linalg import Terms, compress, energy_rank, lowrank_norm, numerical_rank
from ..types import LowRank
from .base import LayerResult, Method
from .option_specs import FedMomentumOptions, ResidualDtype
from .shared import adapter_from_svd

RESIDUAL_DTYPES = {name: getattr(torch, name) for name in typing.get_args(ResidualDtype)}
HELD_LEFT, HELD_RIGHT = "held_left", "held_right"  # the state's slots: a layer's held residual, left @ right


class FedMomentum(Method):
    """Options (declared in ``option_specs.FedMomentumOptions``): ``residual_energy`` τ, ``split``,
    ``merge_residual``, ``merge_every``, ``svd``, ``compress_residual``, ``residual_dtype``. State: with
    ``merge_every > 1``, each layer's residual held back on the server, as the slots ``held_left`` / ``held_right``."""

    name = "fedmomentum"
    Options = FedMomentumOptions
    mixed_ranks = True
    update_space = "product"  # a server optimizer acts on W + s B A (its factors come from an SVD every round)

    def __init__(self, options: FedMomentumOptions | None = None, **values):
        super().__init__(options, **values)
        options = self.options
        self.residual_energy, self.split, self.merge_residual = options.residual_energy, options.split, \
            options.merge_residual
        self.merge_every, self.svd, self.compress_residual = int(options.merge_every), options.svd, \
            options.compress_residual
        self.residual_dtype = RESIDUAL_DTYPES[options.residual_dtype]
        self.backbone_wire_bytes = torch.finfo(self.residual_dtype).bits // 8

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return (self.merge_residual and self.residual_energy >= 1.0 and self.merge_every == 1
                and self.residual_dtype == torch.float32)

    def stream_sums(self, t):
        return None if self.svd == "randomized" else frozenset({"product"})

    def svd_terms(self, name, global_pair, clients, weights, scaling, t):
        return Terms([c.B for c in clients], [c.A for c in clients], weights)  # M = Σ p_i B_i A_i

    def aggregate_layer(self, name, global_pair, clients, weights, scaling, t, svd, state):
        rank, shape = global_pair.rank, global_pair.shape
        L, R, S = svd.L, svd.R, svd.S  # L @ R = M, stacked
        spectrum = svd.S_cpu  # S on the host: ranks and stats without a GPU sync each
        alive = min(numerical_rank(spectrum, shape), rank)  # components the adapter takes; its other slots restart
        nonzero = numerical_rank(spectrum, (len(S),))
        energy = svd.energy  # Σσ² of M, with what a sketch's components miss
        keep = energy_rank(spectrum, rank, self.residual_energy, total=energy) if self.merge_residual else alive
        # the backbone gets all the adapter leaves, as rank-q factors (or as the SVD's own tail when compressed)
        whole_tail = self.merge_residual and keep >= nonzero and not self.compress_residual
        Vh = svd.Vh(alive if whole_tail else keep)
        RV = R @ Vh.mT
        US = L @ RV  # M V = U S, so U S Vh is exactly M's projection on those right singular vectors
        new = adapter_from_svd(US[:, :alive], S[:alive], Vh[:alive], rank, self.split,
                               lambda n: self.fresh_A(name, n, shape[1], t))
        if whole_tail:
            residual = LowRank(L, torch.addmm(R, RV, Vh, beta=scaling, alpha=-scaling)) if nonzero > alive else None
            residual_rank, dropped = max(0, nonzero - alive), 0.0
        else:
            residual = (LowRank((scaling * US[:, alive:keep]).contiguous(), Vh[alive:keep].contiguous())
                        if keep > alive else None)
            residual_rank, dropped = keep - alive, max(0.0, energy - float((spectrum[:keep].double() ** 2).sum()))
        stats = {
            "rank": rank,
            "residual_rank": residual_rank,
            "energy": energy,
            "energy_dropped": dropped / energy if energy > 0 else 0.0,
        }
        residual, held = self._hold_or_release(residual, state, t)
        if held is not None:
            stats["held_rank"] = held.rank
        if residual is not None and self.residual_dtype != torch.float32:
            residual, error = self._round(residual)
            stats["rounding_error"] = error / (scaling * energy ** 0.5) if energy > 0 else 0.0
        return LayerResult(new, residual, stats, None if held is None else {HELD_LEFT: held.left,
                                                                          HELD_RIGHT: held.right})

    def _round(self, residual: LowRank) -> tuple[LowRank, float]:
        """The residual's factors as they arrive in ``residual_dtype``, and ``‖sent − residual‖_F``.

        The scale is balanced between the factors first (equal column norms), so neither is tiny enough to lose
        precision in float16's subnormal range.
        """
        left, right = residual.left, residual.right
        balance = (right.norm(dim=1) / left.norm(dim=0).clamp(min=torch.finfo(left.dtype).tiny)).sqrt()
        balance = torch.where(torch.isfinite(balance) & (balance > 0), balance, torch.ones_like(balance))
        left, right = left * balance, right / balance[:, None]
        wire = self.residual_dtype
        sent = LowRank(left.to(wire).to(left.dtype), right.to(wire).to(right.dtype))
        error = lowrank_norm(torch.cat([sent.left, -residual.left], 1), torch.cat([sent.right, residual.right], 0))
        return sent, error

    def _hold_or_release(self, residual: LowRank | None, state: dict, t: int) -> tuple[LowRank | None,
                                                                                        LowRank | None]:
        """With ``merge_every = k`` residuals wait on the server and go out together after every ``k``-th round:
        returns what goes to the backbone now and what stays held (the layer's new state)."""
        if HELD_LEFT in state:
            held = LowRank(state[HELD_LEFT], state[HELD_RIGHT])
            residual = held if residual is None else compress(held + residual)
        if residual is None or t % self.merge_every == 0:
            return residual, None
        return None, residual
