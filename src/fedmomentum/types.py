"""The values that flow between clients, aggregation methods and the model: plain tensors, no PEFT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

import torch

Tensor = torch.Tensor
# Named tensors kept between rounds, as ``slot → layer → tensor``: a method's state (FedMomentum's held residual as
# slots ``held_left`` / ``held_right``) or what one client keeps (FedSA-LoRA's ``B``). Flat and safetensors-ready.
StateDict = dict[str, dict[str, Tensor]]


class UpdateError(ValueError):
    """A client update that cannot be aggregated; the message names the client and the layer."""


@dataclass(frozen=True)
class LoraPair:
    """One layer's LoRA factors in PEFT shapes: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""

    A: Tensor
    B: Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``: the shape of ``B @ A``."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """The dense ``B @ A`` (for tests and small layers only)."""
        return self.B @ self.A

    def to(self, *args, **kwargs) -> LoraPair:
        return LoraPair(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))


@dataclass(frozen=True)
class LowRank:
    """A ``d×k`` matrix kept as ``left @ right`` (``left: d×q``, ``right: q×k``), never formed densely."""

    left: Tensor
    right: Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    def dense(self) -> Tensor:
        return self.left @ self.right

    def to(self, *args, **kwargs) -> LowRank:
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def __add__(self, other: LowRank) -> LowRank:
        """The sum, as concatenated factors (rank adds up; see ``linalg.compress``)."""
        return LowRank(torch.cat([self.left, other.left], 1), torch.cat([self.right, other.right], 0))


@dataclass
class ClientUpdate:
    """What one client returns after local training.

    ``scaling`` is the client's LoRA scaling ``s_k`` (``α/r_k``, or ``α/√r_k`` with rsLoRA) when its rank differs
    from the global adapter's; ``None`` means the ``scaling`` given to ``Method.aggregate``. The aggregate is
    ``Σ p_k s_k B_k A_k`` either way. ``keep`` is what the client keeps until its next round (``Method.local``:
    FedSA-LoRA's own ``B``), which the server holds in ``ServerState.clients``.
    """

    factors: dict[str, LoraPair]
    num_examples: int
    client_id: str = ""
    scaling: float | None = None
    keep: StateDict = field(default_factory=dict)


class LayerStats(TypedDict, total=False):
    """What a method reports for one layer (keys a method has no use for are absent)."""

    rank: int  # the adapter's rank after aggregation
    residual_rank: int  # components merged into the backbone
    energy: float  # Σσ² of the exact aggregate (SVD methods)
    energy_dropped: float  # fraction of that energy neither in the adapter nor in the backbone
    noise_norm: float  # factor averaging (fedit, fedsa-lora, frlora): ‖s(Σ p_i B_i A_i − B'A')‖_F
    held_rank: int  # rank of the delta held back for a later round (FedMomentum, merge_every > 1)
    rounding_error: float  # FedMomentum's residual_dtype: ‖sent − residual‖_F / ‖s M‖_F
    svd: str  # the route its SVD took (linalg.decompose: factored, dense, sketch, randomized)
    svd_error: float  # the sketch's estimated ‖M − U S Vh‖_F / ‖M‖_F
    # the momentum measures of the layer, added by the driver (``momentum.measure``; None where undefined)
    update_alignment: float | None
    subspace_overlap: float | None
    path_efficiency: float | None
    noise_share: float | None
    update_norm: float


class RoundStats(TypedDict):
    """What a method reports for one round: totals over layers and the bytes each client sends and receives."""

    method: str
    round: int  # the round, 1-based (0: a method's start, before round 1)
    clients: int
    rank_kept: int
    residual_rank: int  # total width of the backbone deltas' factors
    energy_dropped: float
    noise_norm: float | None
    uplink_bytes: float  # mean over clients, float32 factors
    downlink_bytes: int  # per client: the trained factors and the backbone deltas
    uplink_bytes_per_client: dict[str, int]
    layers: dict[str, LayerStats]


@dataclass
class Aggregate:
    """A method's result: the new global adapter, backbone deltas to add to ``W``, stats, and the method's state.

    ``state`` is the method's state after this round (FedMomentum's residuals held back with ``merge_every > 1``;
    empty for a method that carries nothing between rounds): pass it to the next ``aggregate``. The method object
    itself never changes, so an aggregation that raises leaves everything as it was.
    """

    lora: dict[str, LoraPair]
    backbone: dict[str, LowRank] = field(default_factory=dict)
    stats: RoundStats = field(default_factory=dict)  # type: ignore[assignment]
    state: StateDict = field(default_factory=dict)
