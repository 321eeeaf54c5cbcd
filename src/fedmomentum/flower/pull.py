"""Replies pulled with a size cap: no reply larger than the server expects is ever downloaded whole.

Flower's ``Grid.pull_messages`` downloads every object of a reply (the message, its records, each array in chunks of
at most 5 MiB as Flower's SuperNodes send them) before the caller sees any of it, and gRPC's limit
(``GRPC_MAX_MESSAGE_LENGTH``, 2 GiB, fixed in Flower 1.41) bounds one object, not a reply: a node could make the
ServerApp hold any amount. On a grid that speaks Flower's Runtime API (``HttpGrid``, the ServerApp's grid on a
deployment) ``pull_replies`` takes the same steps as ``HttpGrid.pull_messages`` (the message headers and object
trees, then the objects, Flower's own retries and concurrency) but adds up the bytes of each reply's objects as they
arrive and stops pulling a reply once it passes its cap: the ServerApp then holds at most the cap plus the objects in
flight (two at a time, at most one gRPC message each), and the reply is refused, naming the cap. On other grids (the
simulation's in-memory grid, whose replies are in this process already) the cap is checked on the pulled reply.

The SuperLink itself stores what a node pushes (up to gRPC's 2 GiB per object); it is not protected here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from flwr.app import Error, Message, Metadata
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, inflate_object_from_contents, pull_objects

TOO_LARGE = "reply larger than"


class _TooLarge(ObjectPullError):
    """Raised inside ``pull_objects`` to stop pulling a reply that passed its cap."""


def pull_replies(grid, message_ids: Iterable[str], caps: dict[str, int]) -> tuple[list[Message], dict[str, str]]:
    """The replies to ``message_ids`` that fit their caps (``caps``: message id → most bytes its reply may take),
    and ``{message id: why}`` for those that did not (each pulled no further than its cap)."""
    message_ids = list(message_ids)
    runtime = getattr(grid, "_runtime_client", None)  # HttpGrid's Runtime API client
    if runtime is None:
        return _checked(list(grid.pull_messages(message_ids)), caps)
    run_id = grid.run.run_id
    response = runtime.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
    pull = make_pull_object_fn_protobuf(pull_object_protobuf=runtime.PullObject, node=grid.node, run_id=run_id)
    replies, refused = [], {}
    for header, tree in zip(response.messages_list, response.message_object_trees, strict=True):
        asked = header.metadata.reply_to_message_id
        cap = caps.get(asked, 0)
        pulled = [0]
        lock = threading.Lock()

        def counted(object_id: str, cap=cap, pulled=pulled, lock=lock) -> bytes:
            content = pull(object_id)
            with lock:
                pulled[0] += len(content)
                over = pulled[0] > cap
            if over:
                raise _TooLarge(object_id, f"{TOO_LARGE} {cap} bytes")
            return content

        try:
            contents = pull_objects([t.object_id for t in iterate_object_tree(tree)], counted)
        except _TooLarge:
            refused[asked] = f"{TOO_LARGE} {cap} bytes, the most a reply to this message may take (not downloaded)"
            contents = None
        except Exception as error:  # as HttpGrid does when the objects never arrive; the other replies are kept
            replies.append(_unavailable(header, f"{type(error).__name__}: {error}"))
            continue
        runtime.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
            node=grid.node, run_id=run_id, message_object_id=header.metadata.message_id))
        if contents is not None:
            message = inflate_object_from_contents(header.metadata.message_id, contents)
            message.metadata.__dict__["_message_id"] = header.metadata.message_id
            replies.append(message)
    return replies, refused


def _checked(replies: list[Message], caps: dict[str, int]) -> tuple[list[Message], dict[str, str]]:
    """Replies already in this process, measured: arrays by their bytes, other records deflated."""
    kept, refused = [], {}
    for reply in replies:
        asked = reply.metadata.reply_to_message_id
        size = 0
        if reply.has_content():
            content = reply.content
            size = sum(len(array.data) for record in content.array_records.values() for array in record.values())
            size += sum(len(record.deflate()) for records in (content.config_records, content.metric_records)
                        for record in records.values())
        if asked in caps and size > caps[asked]:
            refused[asked] = f"{TOO_LARGE} {caps[asked]} bytes, the most a reply to this message may take ({size})"
        else:
            kept.append(reply)
    return kept, refused


def _unavailable(header, reason: str) -> Message:
    """The error reply ``HttpGrid.pull_messages`` makes when a reply's objects cannot be pulled."""
    metadata = Metadata(run_id=header.metadata.run_id, message_id="", src_node_id=header.metadata.dst_node_id,
                        dst_node_id=header.metadata.dst_node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="",
                        ttl=0, reply_to_message_id=header.metadata.reply_to_message_id,
                        created_at=now().timestamp())
    return make_message(metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=(
        f"Reply message objects are unavailable. The sender may not have completed the upload before the "
        f"object-push session expired. {reason}")))


__all__ = ["TOO_LARGE", "pull_replies"]
