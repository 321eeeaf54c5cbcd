"""Train messages that carry only what a node lacks.

A node at backbone version ``v`` holds the global adapter of version ``v`` (the one it last trained from; version 0
is the seeded LoRA init, which every node builds itself), so a message carries the backbone deltas of rounds
``v …`` and only the adapter factors a round since ``v`` changed. A node whose version is older than the server
believed (it restarted, or lost its state) replies ``resync`` with its version and is sent the deltas from there
(``exchange``); a node whose adapter does not match the digest asks for the whole adapter (``full``).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from . import wire
from .backbone_log import BackboneLog
from .nodes import Node


def train_message(node: Node, settings: ConfigRecord, adapter: ArrayRecord, backbone: BackboneLog, seed: int,
                  server_round: int, full: bool = False) -> Message:
    """One node's message: the round's settings, its seed, and the factors and deltas it lacks (``full``: both
    factors)."""
    start = min(node.version, backbone.version)
    config = ConfigRecord(dict(settings.items()))
    config.update({"seed": seed, "partition-id": node.partition, "backbone-from": start,
                   "backbone-to": backbone.version})
    content = RecordDict({"config": config, "backbone": wire.deltas_to_record(backbone.since(start))})
    for factor, record in wire.split_factors(adapter).items():
        if full or backbone.changed_since(start, factor):
            content[f"global-{factor}"] = record
    return Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(server_round))
