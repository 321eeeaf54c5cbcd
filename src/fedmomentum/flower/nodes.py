"""The SuperNodes the server knows: which data partition each holds, its backbone version, its example count.

A node the server has not seen is asked (a ``query`` message, "hello") for its partition, backbone version and
example count before it is used. Each partition is held by one node: a second node claiming a partition already
held is refused (logged, recorded) and waits; it takes the partition over when the holder disconnects. A node
whose hello breaks the protocol (``replies.parse_hello``) is ignored, with the reason logged.

Who may hold a partition:

- with ``keys`` (the operator's ``node-keys`` file, ``identity.read_node_keys``: partition → the public key the
  SuperLink authenticates that node by, with ``--enable-supernode-auth``), only the node with that key; any other
  claim is refused and the node ignored;
- without it, the first node to claim; a holder whose train messages got no accepted update ``handover_after``
  rounds in a row (no reply, an error, a rejected reply) gives the partition to a node waiting for it (logged,
  recorded), so a node that claims a partition and never answers cannot keep it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore import log

from .identity import same_key
from .replies import REASON_CHARS, Hello, Limits, parse_hello, shown


@dataclass
class Node:
    node_id: int
    partition: int
    version: int  # the backbone version the server believes the node has
    examples: int = 0  # the training examples it said it holds
    needs_own: bool = False  # it said it lacks what its client keeps between rounds (``Method.local``)


class Nodes:
    """Connected nodes by id, learnt through hellos; one holder per partition (see the module's docstring)."""

    def __init__(self, clients: int, fingerprint: str, limits: Limits, run_config: str = "", *,
                 keys: dict[int, bytes] | None = None, handover_after: int = 2) -> None:
        self.clients, self.fingerprint, self.limits, self.run_config = clients, fingerprint, limits, run_config
        self.keys = keys  # partition → the public key (DER) that may hold it; None: the first claim
        self.handover_after = handover_after  # 0: never
        self.public_keys: dict[int, bytes] = {}  # node id → its public key as the SuperLink reports it
        self.declared: dict[int, int] = {}  # node id → the example count its hello declared (kept after it leaves)
        self.missed: dict[int, int] = {}  # partition → rounds in a row its holder gave no accepted update
        self.known: dict[int, Node] = {}
        self.ignored: dict[int, str] = {}  # node id → why it is not used
        self.waiting: dict[int, Hello] = {}  # refused second claims: node id → its hello, used if the holder leaves
        self.events: dict[str, str] = {}  # what happened to nodes since the last ``take_events`` (for the record)

    def __getitem__(self, node_id: int) -> Node:
        return self.known[node_id]

    def get(self, node_id: int) -> Node | None:
        return self.known.get(node_id)

    def holder(self, partition: int) -> Node | None:
        return next((node for node in self.known.values() if node.partition == partition), None)

    def seen(self, node_id: int) -> bool:
        return node_id in self.known or node_id in self.ignored or node_id in self.waiting

    def hello_message(self, node_id: int) -> Message:
        info = ConfigRecord({"fingerprint": self.fingerprint, "run-config": self.run_config})
        return Message(RecordDict({"config": info}), dst_node_id=node_id, message_type=MessageType.QUERY,
                       group_id="hello")

    def on_hello(self, node_id: int, reply: Message) -> Node | None:
        """Register the node from its hello reply (or ignore it, saying why); the node if it now holds a partition."""
        if reply.has_error():
            log(WARNING, "node %d did not answer the hello: %s", node_id, shown(reply.error.reason))
            return None  # asked again at the next discovery
        try:
            hello = parse_hello(reply, self.clients, self.limits)
        except Exception as error:  # any fault in one reply costs only that node
            self.ignore(node_id, f"bad hello reply: {error}")
            return None
        if self.keys is not None and not same_key(self.public_keys.get(node_id), self.keys[hello.partition]):
            self.ignore(node_id, f"claims partition {hello.partition}, but its public key is not the one node-keys "
                                 "gives that partition: refused")
            return None
        self.declared[node_id] = hello.examples
        return self._claim(node_id, hello)

    def _claim(self, node_id: int, hello: Hello) -> Node | None:
        holder = self.holder(hello.partition)
        if holder is not None and holder.node_id != node_id:
            self.waiting[node_id] = hello
            self._event(node_id, f"claims partition {hello.partition}, already held by node {holder.node_id}: "
                                 "refused (it takes over if that node leaves)")
            return None
        node = self.known[node_id] = Node(node_id, hello.partition, hello.version, hello.examples)
        self.missed.pop(hello.partition, None)
        log(INFO, "node %d holds partition %d (backbone version %d, %d examples)", node_id, node.partition,
            node.version, node.examples)
        return node

    def ignore(self, node_id: int, reason: str) -> None:
        self.ignored[node_id] = reason
        self._event(node_id, reason)

    def _event(self, node_id: int, what: str) -> None:
        self.events[str(node_id)] = shown(what, REASON_CHARS)
        log(WARNING, "node %d: %s", node_id, self.events[str(node_id)])

    def forget(self, node_id: int, reason: str) -> Node | None:
        """Drop a node that left; a node waiting for its partition takes it over (returned)."""
        node = self.known.pop(node_id, None)
        self.waiting.pop(node_id, None)
        if node is None:
            return None
        log(INFO, "node %d (partition %d) %s", node_id, node.partition, reason)
        heir = next((n for n, hello in self.waiting.items() if hello.partition == node.partition), None)
        return self._claim(heir, self.waiting.pop(heir)) if heir is not None else None

    def end_round(self, sent_to: dict[int, int], accepted: Iterable[int]) -> None:
        """After a round: ``sent_to`` is the node each partition's train message went to, ``accepted`` the
        partitions with an accepted update. Without ``keys``, a holder that missed ``handover_after`` rounds in a
        row gives its partition to a node waiting for it (and waits in its place)."""
        accepted = set(accepted)
        for partition, node_id in sorted(sent_to.items()):
            holder = self.holder(partition)
            if partition in accepted or holder is None or holder.node_id != node_id:
                self.missed.pop(partition, None)
                continue
            missed = self.missed[partition] = self.missed.get(partition, 0) + 1
            heir = next((n for n, hello in self.waiting.items() if hello.partition == partition), None)
            if self.keys is not None or not self.handover_after or missed < self.handover_after or heir is None:
                continue
            del self.known[node_id]
            self.waiting[node_id] = Hello(partition, holder.version, holder.examples)
            self._event(node_id, f"gave no accepted update in {missed} rounds in a row: partition {partition} goes "
                                 f"to node {heir}, which was waiting for it")
            self._claim(heir, self.waiting.pop(heir))

    def refresh(self, connected: Iterable[int] | dict[int, bytes]) -> list[int]:
        """Forget nodes that are no longer connected; the connected nodes not seen yet (to be asked).
        ``connected`` may map each node id to its public key."""
        if isinstance(connected, dict):
            self.public_keys.update(connected)
        connected = set(connected)
        for gone in [n for n in self.waiting if n not in connected]:
            del self.waiting[gone]
        for gone in [n for n in self.known if n not in connected]:
            self.forget(gone, "left")
        return sorted(n for n in connected if not self.seen(n))

    def take_events(self) -> dict[str, str]:
        events, self.events = self.events, {}
        return events
