"""Train messages that carry only what a node lacks, and the exchange that resends when a node says it lacks more.

A node at backbone version ``v`` holds the global adapter of version ``v`` (the one it last trained from; version 0
is the seeded LoRA init, which every node builds itself), so a message carries the backbone deltas of rounds
``v …`` and only the adapter factors a round since ``v`` changed. A node whose version is older than the server
believed (it restarted, or lost its state) replies ``resync`` with its version and is sent the deltas from there;
a node whose adapter does not match the digest asks for the whole adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from . import wire
from .backbone_log import BackboneLog
from .nodes import Node, Nodes, client_id

MAX_RESENDS = 2


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


class Exchange:
    """One round's sending: messages out, replies in, resends on ``resync``; counts bytes per client."""

    def __init__(self, nodes: Nodes, resend: Callable[[Node, bool], Message]) -> None:
        self.nodes, self.resend = nodes, resend
        self.down: dict[str, int] = {}
        self.up: dict[str, int] = {}
        self.resyncs = 0

    def run(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send, wait up to ``timeout`` seconds in all, and resend (at most twice) to nodes that ask for a resync."""
        deadline = time.monotonic() + timeout
        replies: dict[int, Message] = {}
        attempts: dict[int, int] = {}
        pending = list(messages)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for message in pending:
                cid = client_id(self.nodes[message.metadata.dst_node_id].partition)
                self.down[cid] = self.down.get(cid, 0) + wire.array_bytes(message.content)
            retry = []
            for reply in grid.send_and_receive(pending, timeout=remaining):
                node = self.nodes.get(reply.metadata.src_node_id)
                if node is None:  # not a node this round wrote to
                    continue
                cid = client_id(node.partition)
                if reply.has_content():
                    self.up[cid] = self.up.get(cid, 0) + wire.array_bytes(reply.content)
                if reply.has_content() and "resync" in reply.content:
                    attempts[node.node_id] = attempts.get(node.node_id, 0) + 1
                    resync = reply.content["resync"]
                    node.version = int(resync["backbone-version"])
                    full = bool(resync.get("full-adapter", False))
                    self.resyncs += 1
                    log(INFO, "node %d (%s) has backbone version %d%s; resending from there", node.node_id, cid,
                        node.version, " and needs the whole adapter" if full else "")
                    if attempts[node.node_id] <= MAX_RESENDS:
                        retry.append(self.resend(node, full))
                        continue
                replies[node.node_id] = reply
            pending = retry
        return list(replies.values())
