"""The server's whole state between rounds, as one value the driver holds.

In the style of FedJAX's ``ServerState`` and optax's ``(init, update)``: round ``t`` takes the state after round
``t − 1`` and returns the next one (``driver.run_round``), and the checkpoint is its serialisation
(``checkpoint.py``). Nothing else carries state from one round to the next: the method objects never change, and an
engine keeps only what it needs to talk to its clients (the Flower engine's log of backbone deltas, which late nodes
replay).

The two model-sized parts, the backbone and its whole change, are updated in place after an aggregation succeeded
(a copy of a 7B model's adapted layers every round would double its memory); everything else is replaced, so an
aggregation that fails leaves the state as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .backbone_change import BackboneChange
from .momentum import MomentumState
from .types import ClientUpdate, LoraPair, StateDict, Tensor


@dataclass(frozen=True)
class Pending:
    """A straggler's update, waiting for the round it arrives in (``stragglers.py`` re-bases it then)."""

    update: ClientUpdate  # as the client trained it (its own rank and scaling; its id is ``client@round``)
    start: dict[str, LoraPair]  # the adapter it trained from (the global one of ``trained_in``, at its rank)
    trained_in: int  # the round it trained in
    arrives: int  # the round it is aggregated in


@dataclass(frozen=True)
class ServerState:
    """Everything round ``rounds_done + 1`` starts from."""

    rounds_done: int  # round t is the t-th aggregation; 0 = before training
    lora: dict[str, LoraPair]  # the global adapter
    method: StateDict = field(default_factory=dict)  # the method's own state (``Aggregate.state``)
    clients: dict[str, StateDict] = field(default_factory=dict)  # client id → what it keeps (``ClientUpdate.keep``)
    control: StateDict = field(default_factory=dict)  # SCAFFOLD's server variate, factor → layer (``corrections``)
    # the adapted layers' backbone (``peft_io.apply_backbone``): the model's own float32 weights, or float32 masters
    # of low-precision ones; updated in place
    backbone: dict[str, Tensor] = field(default_factory=dict)
    change: BackboneChange | None = None  # the backbone's whole change since the original base (None: not tracked)
    momentum: MomentumState = field(default_factory=MomentumState)  # what the momentum measures carry (momentum.py)
    pending: tuple[Pending, ...] = ()  # stragglers' updates not yet arrived, in the order they trained
