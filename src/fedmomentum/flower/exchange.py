"""One round on the wire: train messages out, replies in, nodes that come and go while the round waits.

Messages are pushed one by one and their replies pulled by message id (``Grid.push_messages`` /
``pull_messages``), so every reply is matched to what was sent, including the error the SuperLink itself sends
when a node stops sending heartbeats (it comes from the SuperLink, not from the node): that partition is recorded
as "node disconnected" as soon as it is known. While the round waits, the node list is polled: a node that left is
forgotten, a new node is asked its hello, and a node that takes over a partition the round still needs (its
holder left, or it had none) is sent that partition's message at once, so a SuperNode that restarts during a
round's wait trains in that round. A node that says it lacks backbone deltas, the whole adapter or its client's
kept factors (``resync``) is resent what it lacks, at most ``MAX_RESENDS`` times.

A partition without a node (none yet, or its node left) is waited for until ``node_deadline``, and after that
only while other nodes of the round are still training or a hello is still in flight (a node that connected in time
but answers slowly, on a busy machine, is not left out); each train message and each hello is waited for
``round_timeout`` seconds. A node that answered with an error is not sent the round again. Replies are pulled with a
size cap (``pull``): a train reply may take what the client's factors take (``replies.reply_cap``), a hello
``replies.HELLO_CAP``; a larger one is refused before it is downloaded. Text from a node reaches the log and the
records only through ``replies.shown``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore import log

from ..build import client_id
from . import wire
from .nodes import Node, Nodes
from .pull import pull_replies
from .replies import HELLO_CAP, REASON_CHARS, parse_resync, shown

MAX_RESENDS = 2
NO_NODE = "no connected node holds this partition"
DISCONNECTED = "node disconnected"


@dataclass
class _Sent:
    kind: str  # "train" or "hello"
    node_id: int
    partition: int  # -1 for a hello
    deadline: float
    cap: int = HELLO_CAP  # the most bytes its reply may take


class Exchange:
    """The messages of one round; ``run`` returns the final train reply of each partition that got one.

    ``failed`` and ``rejected`` (partition → reason) say what happened to the others; ``down`` / ``up`` count the
    array bytes sent to and received from each client; ``resyncs`` the resends; ``sent_to`` the node each
    partition's train message last went to. ``reply_cap(partition)`` is the most bytes that partition's train reply
    may take.
    """

    poll_seconds = 3.0  # between pulls of replies (as Flower's own ``send_and_receive``)
    node_poll_seconds = 6.0  # between looks at the node list

    def __init__(self, grid: Grid, nodes: Nodes, partitions: list[int], message: Callable[[Node, bool], Message],
                 *, round_timeout: float, node_deadline: float, server_version: int,
                 reply_cap: Callable[[int], int] | None = None) -> None:
        self.grid, self.nodes, self.partitions, self.message = grid, nodes, list(partitions), message
        self.reply_cap = reply_cap or (lambda partition: HELLO_CAP)
        self.round_timeout, self.node_deadline, self.server_version = round_timeout, node_deadline, server_version
        self.replies: dict[int, Message | None] = {}
        # a round that streams: each final train reply is handed over as it is pulled and not kept (None in replies)
        self.on_reply: Callable[[int, Message], None] | None = None
        self.failed: dict[int, str] = {p: NO_NODE for p in partitions}
        self.rejected: dict[int, str] = {}
        self.down: dict[str, int] = {}
        self.up: dict[str, int] = {}
        self.resyncs = 0
        self.sent_to: dict[int, int] = {}
        self._sent: dict[str, _Sent] = {}
        self._attempts: dict[int, int] = {}
        self._asked: set[int] = set()  # nodes sent a hello in this round (one each: a failing node is not flooded)
        self._unsent: dict[int, tuple[Node, bool, float]] = {}  # partition → (node, full, give up at): to push again
        self._last_node_poll = -float("inf")

    # --- sending -------------------------------------------------------------------------------------------

    def _grid(self, call: Callable, *args):
        """A Grid call; a SuperLink that does not answer (say, its database is busy) is asked again later."""
        try:
            return call(*args)
        except Exception as error:
            log(WARNING, "the SuperLink did not answer %s (%s: %s); trying again", call.__name__,
                type(error).__name__, error)
            return None

    def _push(self, message: Message, sent: _Sent) -> bool:
        ids = [i for i in self._grid(self.grid.push_messages, [message]) or [] if i]
        if not ids:
            return False
        self._sent[ids[0]] = sent
        return True

    def _send_train(self, node: Node, full: bool = False, give_up: float | None = None) -> None:
        partition = node.partition
        message = self.message(node, full)
        give_up = give_up if give_up is not None else time.monotonic() + self.round_timeout
        sent = _Sent("train", node.node_id, partition, time.monotonic() + self.round_timeout, self.reply_cap(partition))
        if self._push(message, sent):
            cid = client_id(partition)
            self.sent_to[partition] = node.node_id
            self.down[cid] = self.down.get(cid, 0) + wire.array_bytes(message.content)
            self.failed.pop(partition, None)
            self._unsent.pop(partition, None)
        elif time.monotonic() < give_up:
            self._unsent[partition] = (node, full, give_up)
        else:
            self._unsent.pop(partition, None)
            self.failed[partition] = "the SuperLink did not take its message"

    def _retry_unsent(self) -> None:
        for partition, (node, full, give_up) in list(self._unsent.items()):
            if self.nodes.holder(partition) is node:
                self._send_train(node, full, give_up)
            else:
                del self._unsent[partition]

    def _open(self, partition: int) -> bool:
        """The round still needs this partition, and nothing for it is in flight."""
        return (partition in self.partitions and partition not in self.replies and partition not in self.rejected
                and partition not in self._unsent
                and not any(s.kind == "train" and s.partition == partition for s in self._sent.values()))

    def _serve(self, node: Node | None) -> None:
        if node is not None and self._open(node.partition):
            self._send_train(node)

    # --- receiving -----------------------------------------------------------------------------------------

    def _disconnected(self, node_id: int) -> None:
        """The node left: its in-flight message is failed, and a node waiting for its partition is served."""
        for message_id, sent in list(self._sent.items()):
            if sent.node_id == node_id:
                del self._sent[message_id]
                if sent.kind == "train":
                    self.failed[sent.partition] = DISCONNECTED
                    log(WARNING, "%s: its node %d disconnected", client_id(sent.partition), node_id)
        self._serve(self.nodes.forget(node_id, "disconnected"))

    def _connected(self) -> dict[int, bytes] | None:
        """Connected node id → its public key as the SuperLink reports it (empty without SuperNode auth)."""
        infos = self._grid(self.grid.get_nodes)
        if infos is None:
            return None
        return {int(info.node_id): bytes(getattr(info, "public_key", b"") or b"") for info in infos}

    def _poll_nodes(self) -> None:
        self._last_node_poll = time.monotonic()
        connected = self._connected()
        if connected is None:
            return
        for node_id in [n for n in self.nodes.known if n not in connected]:
            self._disconnected(node_id)
        for node_id in self.nodes.refresh(connected):
            if node_id not in self._asked:
                deadline = time.monotonic() + self.round_timeout
                if self._push(self.nodes.hello_message(node_id), _Sent("hello", node_id, -1, deadline)):
                    self._asked.add(node_id)

    def _on_train_reply(self, sent: _Sent, reply: Message) -> None:
        partition, cid = sent.partition, client_id(sent.partition)
        if reply.has_error():
            if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                self.failed[partition] = DISCONNECTED
                log(WARNING, "%s: its node %d disconnected", cid, sent.node_id)
                self._disconnected(sent.node_id)
            else:
                self.failed[partition] = f"error reply: {shown(reply.error.reason)}"
                log(WARNING, "%s failed: %s", cid, self.failed[partition])
            return
        self.up[cid] = self.up.get(cid, 0) + wire.array_bytes(reply.content)
        node = self.nodes.get(sent.node_id)
        if "resync" in reply.content and node is not None:
            resync = parse_resync(reply, partition, self.server_version)
            self._attempts[partition] = self._attempts.get(partition, 0) + 1
            if self._attempts[partition] <= MAX_RESENDS:
                node.version = resync.version
                node.needs_own = node.needs_own or resync.own
                self.resyncs += 1
                log(INFO, "node %d (%s) has backbone version %d%s%s; resending from there", node.node_id, cid,
                    node.version, " and needs the whole adapter" if resync.full_adapter else "",
                    " and lacks its client's own factors" if resync.own else "")
                self._send_train(node, resync.full_adapter)
                return
        self.failed.pop(partition, None)
        if self.on_reply is not None:
            self.replies[partition] = None
            self.on_reply(partition, reply)
        else:
            self.replies[partition] = reply

    def _on_reply(self, reply: Message) -> None:
        sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
        if sent is None:  # not (or no longer) awaited
            return
        if sent.kind == "hello":
            self._serve(self.nodes.on_hello(sent.node_id, reply))
            return
        try:
            self._on_train_reply(sent, reply)
        except Exception as error:  # any fault in one reply costs only that reply
            self._reject(sent, str(error) or type(error).__name__)

    def _reject(self, sent: _Sent, reason: str) -> None:
        if sent.kind == "hello":
            self.nodes.ignore(sent.node_id, f"bad hello reply: {reason}")
            return
        self.rejected[sent.partition] = shown(reason, REASON_CHARS)
        self.failed.pop(sent.partition, None)
        log(WARNING, "rejected the reply of %s: %s", client_id(sent.partition), self.rejected[sent.partition])

    def _pull(self) -> None:
        """Pull the replies in flight (each within its cap) and handle them."""
        pulled = self._grid(pull_replies, self.grid, list(self._sent), {i: s.cap for i, s in self._sent.items()})
        replies, refused = pulled or ([], {})
        for message_id, reason in refused.items():
            sent = self._sent.pop(message_id, None)
            if sent is not None:
                self._reject(sent, reason)
        for reply in replies:
            self._on_reply(reply)

    # --- the loop ------------------------------------------------------------------------------------------

    def _waiting(self, now: float) -> bool:
        """Train messages are in flight, or a partition still lacks a node and it is before ``node_deadline`` or a
        hello is in flight."""
        training = any(s.kind == "train" for s in self._sent.values()) or bool(self._unsent)
        homeless = any(self._open(p) and self.nodes.holder(p) is None for p in self.partitions)
        asking = any(s.kind == "hello" for s in self._sent.values())  # a node that connected in time may hold one
        return training or (homeless and (now < self.node_deadline or asking))

    def run(self) -> dict[int, Message | None]:
        """Send to the holders of the round's partitions, wait, and return ``{partition: final reply}`` (None for
        a reply handed to ``on_reply`` as it arrived)."""
        self._poll_nodes()
        for partition in self.partitions:
            self._serve(self.nodes.holder(partition))
        while True:
            now = time.monotonic()
            for message_id, sent in list(self._sent.items()):
                if sent.deadline <= now:
                    del self._sent[message_id]
                    if sent.kind == "train":
                        self.failed[sent.partition] = f"no reply within {self.round_timeout:.0f}s"
                        log(WARNING, "%s did not reply in time and is left out", client_id(sent.partition))
            if not self._waiting(now):
                break
            self._retry_unsent()
            if self._sent:
                self._pull()
            if now - self._last_node_poll >= self.node_poll_seconds:
                self._poll_nodes()
            if self._waiting(time.monotonic()) and self.poll_seconds:
                time.sleep(self.poll_seconds)
        return self.replies

    def settle(self, replies: list[Message]) -> dict[int, Message]:
        """The given replies taken as final (Flower's ``aggregate_train`` path: no resends, no waiting)."""
        for reply in replies:
            sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
            if sent is None:
                node = self.nodes.get(reply.metadata.src_node_id)
                if node is None:
                    continue
                sent = _Sent("train", node.node_id, node.partition, 0.0)
            if sent.kind == "train":
                if reply.has_error():
                    self.failed[sent.partition] = f"error reply: {reply.error.reason}"
                else:
                    self.replies[sent.partition] = reply
                    self.failed.pop(sent.partition, None)
        return self.replies
