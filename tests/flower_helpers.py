"""Helpers for the Flower tests: an in-process grid that speaks Flower's wire format, a ClientApp that sends bad
replies on purpose, and real Flower processes on loopback (started, watched, and always stopped).

Fault injection lives here, never in the production ClientApp.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=E0611
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedmomentum import build, checkpoint
from fedmomentum.config import RunConfig
from fedmomentum.flower import LoraStrategy, wire
from fedmomentum.flower import client_app as flower_client
from fedmomentum.flower.exchange import Exchange
from fedmomentum.flower.local_data import server_held_out
from fedmomentum.peft_io import apply_backbone, backbone_of, get_backbone

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWER = dict(clients=2, clients_per_round=2, train_per_family=16, accuracy_per_family=0)


# --- a ClientApp that sends bad replies -------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _with_header(shape: tuple[int, ...], claimed: tuple[int, ...]) -> bytes:
    """npy bytes whose header claims ``claimed`` (e.g. 37 GiB) followed by the values of a ``shape`` array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": claimed})
    return header.getvalue() + np.zeros(shape, np.float32).tobytes()


def _replace_arrays(factors: ArrayRecord, make) -> None:
    for key in list(factors):
        factors[key] = make(key, factors[key])


def corrupt_train_reply(reply: Message, fault: str) -> Message:
    """The real train reply with one thing wrong in it (``fault``, see ``TRAIN_FAULTS``)."""
    factors, metrics = reply.content["factors"], reply.content["metrics"]
    first = next(iter(factors))
    shape = tuple(factors[first].shape)
    if fault == "nan":
        factors[first] = Array(np.full(shape, np.nan, np.float32))
    elif fault == "huge-factors":  # finite: passes a NaN check, breaks an SVD
        factors[first] = Array(np.full(shape, 1e30, np.float32))
    elif fault == "keys":
        factors["not.a.layer/" + first.rsplit("/", 1)[1]] = factors[first]
    elif fault == "missing-layer":
        del factors[first]
    elif fault in ("inf-examples", "nan-examples", "huge-examples", "zero-examples", "float-examples"):
        metrics["num-examples"] = {"inf-examples": float("inf"), "nan-examples": float("nan"),
                                   "huge-examples": 10**15, "zero-examples": 0, "float-examples": 3.5}[fault]
    elif fault == "nan-loss":
        metrics["train-loss"] = float("nan")
    elif fault == "other-partition":
        metrics["partition-id"] = int(metrics["partition-id"]) + 1
    elif fault == "stale-version":
        metrics["backbone-version"] = int(metrics["backbone-version"]) + 1
    elif fault == "not-numpy":  # the values as raw bytes, not npy-encoded
        factors[first] = Array(dtype="float32", shape=shape, stype="raw", data=np.zeros(shape, np.float32).tobytes())
    elif fault == "empty-array":
        factors[first] = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=b"")
    elif fault == "header-37gib":  # declared right, but the npy header claims 100000 × 100000 float32
        factors[first] = Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                               data=_with_header(shape, (100_000, 100_000)))
    elif fault == "declared-37gib":  # the Array's own metadata claims the huge shape
        factors[first] = Array(dtype="float32", shape=(100_000, 100_000), stype="numpy.ndarray",
                               data=_with_header(shape, (100_000, 100_000)))
    elif fault in ("float64", "int8", "complex", "string"):
        kind = {"float64": np.float64, "int8": np.int8, "complex": np.complex64, "string": "<U3"}[fault]
        factors[first] = Array(np.zeros(shape, dtype=kind))
    elif fault == "mislabelled-float64":  # says float32, holds float64 npy bytes
        factors[first] = Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                               data=_npy(np.zeros(shape, np.float64)))
    elif fault == "rank-512":
        def wider(key: str, array: Array) -> Array:
            rows, cols = array.shape
            new = (512, cols) if key.endswith("/A") else (rows, 512)
            return Array(np.full(new, 1e-3, np.float32))

        _replace_arrays(factors, wider)
    elif fault in ("pad-rank", "drop-rank"):  # well-formed factors of another rank than the client's
        def resized(key: str, array: Array) -> Array:
            values = array.numpy()
            rank = values.shape[0] if key.endswith("/A") else values.shape[1]
            if fault == "pad-rank":  # twice the rank, the new slots zero: the same product B A
                values = np.concatenate([values, np.zeros_like(values)], 0 if key.endswith("/A") else 1)
            else:
                values = values[: rank - 1] if key.endswith("/A") else values[:, : rank - 1]
            return Array(np.ascontiguousarray(values, dtype=np.float32))

        _replace_arrays(factors, resized)
    elif fault == "scaling":  # the scaling of twice the rank
        metrics["scaling"] = float(metrics["scaling"]) / 2
    elif fault == "extra-record":
        reply.content["extra"] = ConfigRecord({"x": 1})
    elif fault == "no-metrics":
        del reply.content["metrics"]
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return reply


TRAIN_FAULTS = {  # fault → what the rejection says
    "nan": "NaN or Inf",
    "huge-factors": "beyond max-factor-abs",
    "keys": "factors do not match",
    "missing-layer": "factors do not match",
    "inf-examples": "num-examples must be an integer",
    "nan-examples": "num-examples must be an integer",
    "float-examples": "num-examples must be an integer",
    "huge-examples": "num-examples must be between 1 and",
    "zero-examples": "num-examples must be between 1 and",
    "nan-loss": "train-loss must be a finite number",
    "other-partition": "partition-id must be between",
    "stale-version": "backbone-version must be between",
    "not-numpy": "serialised as 'raw'",
    "empty-array": "0 bytes, a ",
    "header-37gib": "npy header says shape (100000, 100000)",
    "declared-37gib": "shape (100000, 100000), expected",
    "float64": "dtype 'float64'",
    "int8": "dtype 'int8'",
    "complex": "dtype 'complex64'",
    "string": "dtype '<U3'",
    "mislabelled-float64": "dtype float64; expected",
    "rank-512": "reply larger than",  # 128 times the client's factors: past the size cap, never downloaded
    "pad-rank": "shape (8, 64), expected (4, 64)",  # small_config: lora_r=4, tiny hidden size 64
    "drop-rank": "shape (3, 64), expected (4, 64)",
    "scaling": "scaling must be 2.0 (the LoRA scaling of the client's rank), got 1.0",
    "extra-record": "unexpected records ['extra']",
    "no-metrics": "needs a MetricRecord 'metrics'",
}


ATTACKS = ("poison-9999", "scaled-30", "examples-1e7", "zeros", "replay", "huge-reply", "loss-1e308")


def attack_train_reply(reply: Message, fault: str, context: Context) -> Message:
    """The real train reply turned into a well-formed attack (``ATTACKS``): factors of ±9999 (inside
    max-factor-abs), the factors ×30, 10⁷ examples (its hello said its real count), all-zero factors, the node's
    round-1 factors sent again in every later round, a 40 MB extra array, a train loss of 1.7e308."""
    factors, metrics = reply.content["factors"], reply.content["metrics"]
    if fault == "poison-9999":
        rng = np.random.default_rng([int(context.node_config["partition-id"]), int(metrics["backbone-version"])])
        _replace_arrays(factors, lambda key, a: Array(
            (9999.0 * rng.choice([-1.0, 1.0], size=a.shape)).astype(np.float32)))
    elif fault == "scaled-30":
        _replace_arrays(factors, lambda key, a: Array((30.0 * a.numpy()).astype(np.float32)))
    elif fault == "examples-1e7":
        metrics["num-examples"] = 10_000_000
    elif fault == "zeros":
        _replace_arrays(factors, lambda key, a: Array(np.zeros(a.shape, np.float32)))
    elif fault == "replay":
        first = context.state.array_records.get("attack.first")
        if first is None:
            context.state["attack.first"] = ArrayRecord({k: Array(a.numpy().copy()) for k, a in factors.items()})
        else:
            _replace_arrays(factors, lambda key, a: Array(first[key].numpy().copy()))
    elif fault == "huge-reply":
        factors["padding/A"] = Array(np.ones((10_000_000,), np.float32))  # 40 MB
    elif fault == "loss-1e308":
        metrics["train-loss"] = 1.7e308
    else:
        raise ValueError(f"unknown attack {fault!r}")
    return reply


FORGED = "\n[2026-01-01 00:00:00] INFO : round   9 | train_loss 0.0001 | eval_loss 0.0001 | 1.0s\x1b[2J"


def corrupt_hello(reply: Message, fault: str) -> Message:
    info = reply.content["node"]
    if fault == "hello-partition-str":
        info["partition-id"] = "zero"
    elif fault == "hello-partition-float":
        info["partition-id"] = 0.5
    elif fault == "hello-no-version":
        del info["backbone-version"]
    elif fault == "hello-negative-version":
        info["backbone-version"] = -3
    elif fault == "hello-no-record":
        del reply.content["node"]
        reply.content["other"] = ConfigRecord({})
    elif fault == "hello-forged-log":  # a whole fake round line for the server's log
        info["error"] = "no data" + FORGED
    elif fault == "hello-long-error":  # 50,000 characters: well under the hello's size cap
        info["error"] = "x" * 50_000
    elif fault == "hello-huge":  # a list of a million numbers: past the hello's size cap
        info["error"] = list(range(1_000_000))
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return reply


HELLO_FAULTS = {
    "hello-partition-str": "partition-id must be an integer",
    "hello-partition-float": "partition-id must be an integer",
    "hello-no-version": "backbone-version must be an integer",
    "hello-negative-version": "backbone-version must be between 0",
    "hello-no-record": "needs a ConfigRecord 'node'",
    "hello-forged-log": "the node reports: no data\\n[2026-01-01 00:00:00] INFO : round   9",
    "hello-long-error": "… (50000 characters)",
    "hello-huge": "reply larger than 65536 bytes",
}
RESYNC_FAULTS = {
    "resync-negative": "resync backbone-version must be between 0",
    "resync-string": "resync backbone-version must be an integer",
}


def faulty_client_app(faults: dict[int, str] | None = None) -> ClientApp:
    """The real ClientApp, with a fault on some nodes: by partition (``faults``) or the node config's ``fault``.

    ``"raise"`` / ``"hello-raise"`` (the ClientApp fails on train / query messages), a key of ``TRAIN_FAULTS``
    (the train reply), of ``HELLO_FAULTS`` (the hello reply), of ``RESYNC_FAULTS`` (the node answers its train
    message with a bad resync) or one of ``ATTACKS`` (a well-formed train reply meant to move the model).
    """
    faults = faults or {}

    def fault_of(context: Context) -> str | None:
        return faults.get(int(context.node_config["partition-id"]), context.node_config.get("fault"))

    app = ClientApp()

    @app.query()
    def _hello(message: Message, context: Context) -> Message:
        fault = fault_of(context)
        if fault == "hello-raise":
            raise RuntimeError("injected failure in the hello")
        reply = flower_client.hello(message, context)
        if fault in HELLO_FAULTS:
            reply = corrupt_hello(reply, fault)
        return reply

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        fault = fault_of(context)
        if fault == "raise":
            raise RuntimeError(f"injected failure on partition {context.node_config['partition-id']}")
        if fault in RESYNC_FAULTS:
            version = -1 if fault == "resync-negative" else "abc"
            return Message(RecordDict({"resync": ConfigRecord({"backbone-version": version, "partition-id": int(
                context.node_config["partition-id"])})}), reply_to=message)
        reply = flower_client.train(message, context)
        if fault in TRAIN_FAULTS and "factors" in reply.content:
            reply = corrupt_train_reply(reply, fault)
        if fault in ATTACKS and "factors" in reply.content:
            reply = attack_train_reply(reply, fault, context)
        return reply

    return app


# --- an in-process grid that speaks Flower's wire format --------------------------------------------------


def over_the_wire(message: Message, sink: list[bytes] | None = None) -> Message:
    """``message`` as the other side gets it: deflated to Flower's wire objects (appended to ``sink``) and
    inflated again."""
    objects = get_all_nested_objects(message)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    if sink is not None:
        sink += contents.values()
    received = inflate_object_from_contents(message.object_id, contents)
    received.metadata.__dict__["_message_id"] = message.metadata.message_id or message.object_id
    return received


class LocalGrid:
    """Stands in for Flower's Grid (``get_node_ids``, ``push_messages``, ``pull_messages``) with every node a
    ``(ClientApp, Context)`` in this process; messages and replies go through Flower's wire format.

    ``events`` maps a number of completed rounds to actions, run once when the strategy is there:
    ``("join", node_id, partition)`` (a node connects), ``("restart", node_id)`` (it loses its state and
    process) at the next ``get_node_ids``; ``("kill", node_id)`` (its SuperNode dies: the SuperLink answers its
    messages with a NODE_UNAVAILABLE error and drops it) at the next ``pull_messages``, i.e. during the wait.
    ``silent`` nodes never answer train messages (a timeout); with ``flaky``, every other call of each Grid method
    raises, as a SuperLink's do when its database is busy. ``hello_delay`` holds every hello reply back for that
    many seconds (a busy machine); ``keys`` gives nodes the public key the SuperLink reports for them (PEM).

    Replies are pulled as ``HttpGrid`` pulls them on a deployment, through Flower's Runtime API (``Runtime``:
    message headers and object trees, then each object's bytes), so the strategy's size cap (``pull``) is
    exercised on the same path; ``runtime.pulled`` counts the object bytes served.
    """

    def __init__(self, app, partitions, clients: int, run_id: int = 1, events=None, silent=(), node_configs=None,
                 flaky: bool = False, hello_delay: float = 0.0, keys: dict[int, bytes] | None = None):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.app, self.run_id, self.clients = app, run_id, clients
        self.run = SimpleNamespace(run_id=run_id)
        self.node = Node(node_id=SUPERLINK_NODE_ID)
        self.runtime = Runtime(self)
        self.hello_delay, self.keys = hello_delay, dict(keys or {})
        self.pushed_at: dict[str, float] = {}
        self.contexts: dict[int, Context] = {}
        for index, partition in enumerate(partitions):
            self.join(100 + index, partition, **(node_configs or {}).get(index, {}))
        self.events = {k: list(v) for k, v in (events or {}).items()}
        self.silent = set(silent)
        self.killed: set[int] = set()
        self.pending: dict[str, Message] = {}
        self.uplink: list[bytes] = []  # every reply as it crossed the wire
        self.received: Counter[tuple[int, str]] = Counter()  # messages delivered, by (node id, message type)
        self.node_polls = 0  # calls of get_node_ids
        self.flaky = flaky  # every other call of each Grid method fails, as a busy SuperLink's do
        self.calls: Counter[str] = Counter()
        self.strategy: LoraStrategy | None = None

    def join(self, node_id: int, partition: int, **node_config) -> None:
        config = {"partition-id": partition, "num-partitions": self.clients, **node_config}
        self.contexts[node_id] = Context(run_id=self.run_id, node_id=node_id, state=RecordDict(), run_config={},
                                         node_config=config)

    def _events(self, kinds: tuple[str, ...]) -> None:
        due = self.events.get(self.strategy.rounds_done if self.strategy else 0, [])
        for action in [a for a in due if a[0] in kinds]:
            due.remove(action)
            if action[0] == "join":
                self.join(action[1], action[2], **(action[3] if len(action) > 3 else {}))
            elif action[0] == "restart":
                self.contexts[action[1]].state = RecordDict()
                flower_client.reset_worker()
            elif action[0] == "kill":
                self.killed.add(action[1])

    def _maybe_fail(self, method: str) -> None:
        self.calls[method] += 1
        if self.flaky and self.calls[method] % 2:
            raise RuntimeError("Server error '500 Internal Server Error' (database is locked)")

    @property
    def _runtime_client(self) -> Runtime:
        return self.runtime

    def get_node_ids(self):
        self._maybe_fail("get_node_ids")
        self.node_polls += 1
        self._events(("join", "restart"))
        return [node_id for node_id in self.contexts if node_id not in self.killed]

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, public_key=self.keys.get(n, b"")) for n in self.get_node_ids()]

    def push_messages(self, messages):
        self._maybe_fail("push_messages")
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[message.metadata.message_id] = message
            self.pushed_at[message.metadata.message_id] = time.monotonic()
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self._maybe_fail("pull_messages")
        self._events(("kill",))
        replies = []
        for message_id in message_ids:
            message = self.pending.get(message_id)
            if message is None:
                continue
            node_id = message.metadata.dst_node_id
            if node_id in self.killed:  # what the SuperLink answers once the node misses its heartbeats
                del self.pending[message_id]
                replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
                continue
            if node_id in self.silent and message.metadata.message_type == "train":
                continue
            if message.metadata.message_type == "query" and \
                    time.monotonic() < self.pushed_at[message_id] + self.hello_delay:
                continue
            del self.pending[message_id]
            self.received[node_id, message.metadata.message_type] += 1
            try:
                reply = self.app(over_the_wire(message), self.contexts[node_id])
            except Exception as error:  # what Flower's engines turn a raising ClientApp into
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"{type(error).__name__}: {error}"), reply_to=message)
            replies.append(over_the_wire(reply, self.uplink))
        return replies


class Runtime:
    """Flower's Runtime API as ``HttpGrid`` uses it to pull replies, over ``LocalGrid``'s replies: the message
    headers and object trees first, then each object's deflated bytes on request; ``pulled`` counts those bytes."""

    def __init__(self, grid: LocalGrid) -> None:
        self.grid = grid
        self.objects: dict[str, object] = {}
        self.pulled = 0

    def PullMessages(self, request):  # noqa: N802 (Flower's name)
        headers, trees = [], []
        for reply in self.grid.pull_messages(list(request.message_ids)):
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.objects.update(get_all_nested_objects(reply))
            headers.append(message_to_proto(remove_content_from_message(reply)))
            trees.append(get_object_tree(reply))
        return PullAppMessagesResponse(messages_list=headers, message_object_trees=trees)

    def PullObject(self, request):  # noqa: N802
        found = self.objects.get(request.object_id)
        if found is None:
            return PullObjectResponse(object_found=False, object_available=False)
        content = found.deflate()
        self.pulled += len(content)
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        return None


def run_local(config: RunConfig, grid: LocalGrid, resume: bool = False, seen: list | None = None,
              **options) -> LoraStrategy:
    """The strategy's whole run on ``grid``, without waiting between polls; ``seen`` collects every update the
    method aggregated."""
    strategy = LoraStrategy(config, **{"node_timeout": 0.1, **options})
    if seen is not None:
        strategy.setup = build.prepare(config, held_out=server_held_out(config, strategy.eval_data))
        aggregate = strategy.setup.method.aggregate

        def spy(lora, updates, **kwargs):
            seen.extend(updates)
            return aggregate(lora, updates, **kwargs)

        strategy.setup.method.aggregate = spy
    grid.strategy = strategy
    pauses = Exchange.poll_seconds, Exchange.node_poll_seconds
    Exchange.poll_seconds = Exchange.node_poll_seconds = 0.0  # LocalGrid answers at once: no need to wait
    try:
        strategy.start(grid, resume=resume)
    finally:  # a real grid (Ray's, later in this process) needs the pauses: a busy loop starves its threads
        Exchange.poll_seconds, Exchange.node_poll_seconds = pauses
    return strategy


def node_backbone(context: Context, config: RunConfig, extra=None) -> dict[str, torch.Tensor]:
    """The backbone a node rebuilds from the base model and the deltas in its state (then ``extra``)."""
    model, _ = build.peft_model(config)
    backbone = backbone_of(model)
    log = wire.record_to_deltas(context.state.array_records[flower_client.STATE_LOG])
    for entry in sorted(log):
        apply_backbone(model, log[entry], backbone)
    apply_backbone(model, extra or {}, backbone)
    return get_backbone(model)


def assert_same_state(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The checkpoints at ``a`` and ``b`` hold the same server state (to ``atol``)."""
    a, b = checkpoint.load(a)[0], checkpoint.load(b)[0]
    assert a.rounds_done == b.rounds_done
    assert set(a.lora) == set(b.lora) and set(a.backbone) == set(b.backbone)
    for name in a.lora:
        torch.testing.assert_close(a.lora[name].A, b.lora[name].A, atol=atol, rtol=1e-4 if atol else 0.0)
        torch.testing.assert_close(a.lora[name].B, b.lora[name].B, atol=atol, rtol=1e-4 if atol else 0.0)
    for name in a.backbone:
        torch.testing.assert_close(a.backbone[name], b.backbone[name], atol=atol, rtol=1e-4 if atol else 0.0)
    for ours, theirs in [(a.method, b.method), *((a.clients[c], b.clients.get(c, {})) for c in a.clients)]:
        assert ours.keys() == theirs.keys()
        for slot, layers in ours.items():
            assert layers.keys() == theirs[slot].keys()
            for name, value in layers.items():
                torch.testing.assert_close(value, theirs[slot][name], atol=atol, rtol=1e-4 if atol else 0.0)
    assert a.clients.keys() == b.clients.keys()


# --- real Flower processes on loopback ---------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (by parent id, so detached children are found too)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal ``process`` and everything below it."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(processes: list[subprocess.Popen]) -> None:
    """Terminate what the test started (and everything those processes started), then kill what is left."""
    targets = []
    for process in processes:
        targets += [process.pid, *descendants(process.pid)]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def processes_using(port: int) -> dict[int, str]:
    """``{pid: command line}`` of the live processes of this environment (``BIN``) that name ``127.0.0.1:<port>``:
    a Flower process of the test, even one its parent left behind (a ServerApp outlives a SuperExec that crashed)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(BIN) in command and f"127.0.0.1:{port} " in command + " ":
                found[int(entry.name)] = command
    return found


class Loopback:
    """Flower processes of one test on 127.0.0.1: each writes its own log; ``close`` stops every one of them (and
    any process left behind that names one of the test's ports)."""

    def __init__(self, root: Path, ports: list[int]) -> None:
        self.root = root
        self.ports = ports
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.processes: list[subprocess.Popen] = []

    def connection(self, name: str, address: str, **settings: str | bool) -> None:
        """A ``[superlink.<name>]`` entry in ``$FLWR_HOME/config.toml`` (the default one: the first)."""
        path = self.home / "config.toml"
        text = path.read_text() if path.exists() else f'[superlink]\ndefault = "{name}"\n'
        text += f'\n[superlink.{name}]\naddress = "{address}"\n'
        for key, value in settings.items():
            text += f"{key} = {json.dumps(value)}\n"
        path.write_text(text)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        handle = (self.logs / f"{name}.log").open("a")
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, cwd=self.root, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def wait_for_log(self, name: str, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return True
            time.sleep(0.5)
        return False

    def submit(self, app: Path, connection: str, run_config: str, name: str, timeout: float = 180) -> FlowerRun:
        """``flwr run app connection --run-config ... --stream`` in the background (its output in ``name``.log),
        retried until the SuperLink takes the run."""
        deadline = time.monotonic() + timeout
        while True:
            process = self.start(name, "flwr", "run", str(app), connection, "--run-config", run_config, "--stream")
            while process.poll() is None and time.monotonic() < deadline and "Successfully started run" not in \
                    self.log(name):
                time.sleep(0.5)
            started = re.search(r"Successfully started run (\d+)", self.log(name))
            if started:
                return FlowerRun(self, name, connection, int(started.group(1)), process)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the SuperLink did not take the run\n{self.dump()}")
            time.sleep(2)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def dump(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.iterdir()))

    def close(self) -> None:
        stop(self.processes)
        for port in self.ports:
            for pid in processes_using(port):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class FlowerRun:
    """A run submitted with ``flwr run --stream``. A busy SuperLink (SQLite "database is locked") can break the
    stream while the run goes on: ``follow`` attaches again with ``flwr log``, as an operator would."""

    def __init__(self, loopback: Loopback, name: str, connection: str, run_id: int,
                 process: subprocess.Popen) -> None:
        self.loopback, self.name, self.connection, self.run_id = loopback, name, connection, run_id
        self.streams = [process]

    def serverapp_alive(self) -> bool:
        return any("flwr-serverapp" in command
                   for port in self.loopback.ports for command in processes_using(port).values())

    def follow(self) -> None:
        if all(p.poll() is not None for p in self.streams) and self.serverapp_alive():
            self.streams.append(self.loopback.start(f"{self.name}-{len(self.streams)}", "flwr", "log",
                                                    str(self.run_id), self.connection, "--stream"))

    def text(self) -> str:
        """What the run's streams showed so far."""
        return "".join(self.loopback.log(f"{self.name}-{i}" if i else self.name) for i in range(len(self.streams)))

    def ended(self, out: Path) -> bool:
        """``summary.json`` has a status and the ServerApp has exited (the exports follow the summary)."""
        self.follow()
        path = out / "summary.json"
        return path.is_file() and '"status"' in path.read_text() and not self.serverapp_alive()

    def full_log(self) -> str:
        """The run's whole log, from the SuperLink (what the streams showed, if it cannot say)."""
        try:
            shown = self.loopback.flwr("log", str(self.run_id), self.connection, "--show")
        except subprocess.TimeoutExpired:
            return self.text()
        return shown.stdout if shown.returncode == 0 and shown.stdout.strip() else self.text()
