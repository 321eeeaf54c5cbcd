"""Train messages that carry only what a node lacks.

A node at backbone version ``v`` holds the global adapter of version ``v`` (the one it last trained from; version 0
is the seeded LoRA init, which every node builds itself), so a message carries the backbone deltas of entries
``v …`` (``backbone_log``: the method's start, then the rounds) and only the adapter factors an entry since ``v``
changed. A node whose version is older than the server believed (it restarted, or lost its state) replies
``resync`` with its version and is sent the deltas from there (``exchange``); a node whose adapter does not match
the digests asks for the whole adapter (``full``).

SCAFFOLD's server variate (``ServerState.control``) goes with every train message of a run with ``scaffold``.

What a client keeps between rounds (``Method.local``: FedSA-LoRA's ``B``; SCAFFOLD's variate) stays on its node: a
message names it by digest (``own-digest``; empty while the client has nothing kept, and then it starts from the
global adapter, as a new client does in ``fedmomentum run``) and does not carry those global factors. The server's
copy (the factors it last received from that client; the variate it derived from them, ``client.kept``) goes out
only to a node that lacks it (it said so in a resync, or it is at version 0: a node that restarted, or a new Flower
run after the server resumed).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from ..types import Tensor
from . import wire
from .backbone_log import BackboneLog
from .nodes import Node


def train_message(node: Node, settings: ConfigRecord, adapter: ArrayRecord, backbone: BackboneLog, seed: int,
                  server_round: int, full: bool = False, *, own: dict[str, dict[str, Tensor]] | None = None,
                  local: tuple[str, ...] = (), control: dict[str, dict[str, Tensor]] | None = None) -> Message:
    """One node's message: the round's settings, its seed, and the factors and deltas it lacks (``full``: both
    factors). ``own``: what the server last received of the factors its client keeps (``local``), if any;
    ``control``: SCAFFOLD's server variate (sent whenever given)."""
    start = min(node.version, backbone.version)
    config = ConfigRecord(dict(settings.items()))
    config.update({"seed": seed, "partition-id": node.partition, "backbone-from": start,
                   "backbone-to": backbone.version, "own-digest": wire.own_digest(own)})
    content = RecordDict({"config": config, "backbone": wire.deltas_to_record(backbone.since(start))})
    for factor, record in wire.split_factors(adapter).items():
        if own and factor in local and not full:
            continue  # the client starts from its own
        if full or backbone.changed_since(start, factor):
            content[f"global-{factor}"] = record
    if own and (node.needs_own or start == 0):
        content["own"] = wire.own_to_record(own)
    if control is not None:
        content["control"] = wire.own_to_record(control)
    return Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(server_round))
