"""The SuperNodes the server knows: which data partition each holds, its backbone version, how reliable it is.

A new node is asked (a ``query`` message, "hello") for its partition and backbone version before it is used; a node
whose answer does not fit the run is ignored, with the reason logged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log


@dataclass
class Node:
    node_id: int
    partition: int
    version: int  # the backbone version the server believes the node has
    failures: int = 0  # consecutive rounds it failed or went silent (another node for its partition goes first)


def client_id(partition: int) -> str:
    return f"client-{partition}"


class Nodes:
    """Connected nodes by id, learnt through hellos; ``discover`` waits for the partitions a round needs."""

    def __init__(self, clients: int, fingerprint: str, node_timeout: float) -> None:
        self.clients, self.fingerprint, self.node_timeout = clients, fingerprint, node_timeout
        self.known: dict[int, Node] = {}
        self.ignored: dict[int, str] = {}  # node id → why it is not used

    def __getitem__(self, node_id: int) -> Node:
        return self.known[node_id]

    def get(self, node_id: int) -> Node | None:
        return self.known.get(node_id)

    def hello(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Ask new nodes which partition they hold and which backbone version they have."""
        messages = [Message(RecordDict({"config": ConfigRecord({"fingerprint": self.fingerprint})}),
                            dst_node_id=node_id, message_type=MessageType.QUERY, group_id="hello")
                    for node_id in node_ids]
        for reply in grid.send_and_receive(messages, timeout=max(timeout, 1.0)):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not answer the hello: %s", node_id, reply.error.reason)
                continue
            info = reply.content.config_records.get("node")
            if info is None:
                self._ignore(node_id, "its hello reply has no 'node' record")
                continue
            pid, count = int(info["partition-id"]), int(info["num-partitions"])
            if not 0 <= pid < self.clients or count not in (-1, self.clients):
                self._ignore(node_id, f"its node config partition-id={pid} num-partitions={count} does not fit "
                                      f"the run's clients={self.clients}")
                continue
            self.known[node_id] = Node(node_id, pid, int(info["backbone-version"]))
            log(INFO, "node %d holds partition %d (backbone version %d)", node_id, pid, self.known[node_id].version)

    def _ignore(self, node_id: int, reason: str) -> None:
        self.ignored[node_id] = reason
        log(WARNING, "ignoring node %d: %s", node_id, reason)

    def discover(self, grid: Grid, wanted: set[int]) -> None:
        """Track connected nodes; wait up to ``node_timeout`` for nodes holding every ``wanted`` partition."""
        deadline = time.monotonic() + self.node_timeout
        while True:
            connected = set(grid.get_node_ids())
            for gone in set(self.known) - connected:
                log(INFO, "node %d (partition %d) left", gone, self.known.pop(gone).partition)
            new = connected - set(self.known) - set(self.ignored)
            if new:
                self.hello(grid, sorted(new), deadline - time.monotonic())
            if wanted <= {node.partition for node in self.known.values()} or time.monotonic() >= deadline:
                return
            time.sleep(0.5)

    def for_partition(self, partition: int) -> Node | None:
        """The node that trains ``partition``; when several hold it, the most reliable, then most up-to-date one."""
        holders = [node for node in self.known.values() if node.partition == partition]
        return max(holders, key=lambda node: (-node.failures, node.version, -node.node_id)) if holders else None
