"""The Flower ClientApp: one client of the federation, training with the same ``client.train_round``.

A node is one client of the run: ``partition-id`` in its node config names it (its seed, its LoRA rank from
``client_ranks``, when it is sampled), and it trains on its own data, the file or folder ``data`` of its node config
(``local_data``), or without ``data`` on its seeded synthetic partition (simulation). It tells the server its
example count, never its examples. Each train message carries the global adapter factors the node lacks, the
backbone deltas of the entries the server believes the node has not applied, the round's trainable factors,
learning rate and seed, and the run's configuration. The node starts where the method says
(``Method.client_start``: the global adapter at the client's own rank, with what the client keeps between rounds)
and replies with the factors it trained, ``num-examples`` and its LoRA scaling.

Backbone versions. The backbone version is the number of log entries whose deltas have been applied (the method's
start, if it has one, then one per round). The node keeps its version and the deltas it has applied in
``context.state`` (local to the node, kept by Flower across the messages of a run), so a fresh ClientApp process
(Flower's deployment engine starts one per message) rebuilds the exact backbone from the base model without any
network traffic. A message says which versions its deltas span (``backbone-from`` to ``backbone-to``):

- node version in ``[from, to]``: apply the deltas of the entries it lacks, train;
- node version ``< from`` (it restarted, or lost its state): reply ``resync`` with its version; the server resends
  the deltas from there (it keeps every entry's delta);
- node version ``> to`` (its state comes from another history): forget it and ask for everything from 0.

What a client keeps between rounds (``Method.local``, FedSA-LoRA's ``B``) is in ``context.state`` too; the message
names the copy the server expects by digest, and a node that lacks it says so in its resync and is sent the
server's copy.

The model itself is cached per process (keyed by run and config fingerprint) and brought to the node's version by
applying the logged deltas in order, so every node ends with bit-identical backbone weights. On a quantized base
(``quantization``) the node keeps the whole change in its own ``BackboneChange``, which its quantized layers compute
beside their weights (``change_branch.py``), as the server does with its state's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..backbone_change import BackboneChange
from ..build import client_id, encode_all, make_method, peft_model
from ..client import train_round
from ..config import RunConfig, from_dict
from ..methods import Method
from ..peft_io import apply_backbone, attach_change, backbone_of, get_lora, quantized_layers
from ..schedule import client_ranks
from ..types import LoraPair, LowRank, Tensor
from . import wire
from .local_data import node_examples

STATE_NODE = "fedmomentum.node"  # ConfigRecord: backbone version and the config fingerprint it belongs to
STATE_LOG = "fedmomentum.backbone"  # ArrayRecord: every delta this node applied, keyed like wire.deltas_to_record
STATE_ADAPTER = "fedmomentum.adapter"  # ArrayRecord: the global adapter of the node's version
STATE_OWN = "fedmomentum.own"  # ArrayRecord: what the client keeps between rounds (``Method.local``), if anything


@dataclass
class _Worker:
    """What a process keeps between messages: the model at some backbone version, the method (where a client starts),
    and encoded training data."""

    key: tuple
    config: RunConfig
    model: object
    tokenizer: object
    method: Method
    version: int = 0
    data: dict[tuple, list[dict]] = field(default_factory=dict)
    initial: dict = field(default_factory=dict)  # the seeded LoRA init: the global adapter of version 0
    backbone: dict = field(default_factory=dict)  # the model's backbone mapping (``peft_io.apply_backbone``)
    change: BackboneChange | None = None  # a quantized base's whole change, computed beside its quantized layers

    def apply(self, deltas: dict[str, LowRank]) -> None:
        """Add one log entry's deltas to the backbone: into the mapping, and a quantized base's into its change."""
        apply_backbone(self.model, deltas, self.backbone)
        if self.change is not None:
            self.change.add(deltas)

    def examples(self, node_config, pid: int) -> list[dict]:
        """The node's training examples, encoded (cached per partition and data path)."""
        key = (pid, str(node_config.get("data", "")))
        if key not in self.data:
            examples, _ = node_examples(self.config, node_config, pid)
            self.data[key] = encode_all(examples, self.tokenizer, self.config)
        return self.data[key]


_WORKER: _Worker | None = None  # one model per process: the backbone is global, so every node can share it


def shared_worker(run_id: int, fp: str, config: RunConfig) -> _Worker:
    global _WORKER
    key = (run_id, fp)
    if _WORKER is None or _WORKER.key != key:
        _WORKER = None  # free the old model first
        model, tokenizer = peft_model(config)
        change = BackboneChange() if quantized_layers(model) else None
        attach_change(model, change)
        _WORKER = _Worker(key, config, model, tokenizer, make_method(config), initial=get_lora(model),
                          backbone=backbone_of(model), change=change)
    return _WORKER


def reset_worker() -> None:
    global _WORKER
    _WORKER = None


# --- node state (context.state) ---------------------------------------------------------------------------


def node_version(context: Context, fp: str) -> int:
    """The backbone version this node has applied under config fingerprint ``fp`` (0 for none or another one)."""
    state = context.state.config_records.get(STATE_NODE)
    if state is None or state.get("fingerprint") != fp:
        return 0
    return int(state["backbone-version"])


def _node_log(context: Context, fp: str) -> dict[int, dict[str, LowRank]]:
    if node_version(context, fp) == 0 or STATE_LOG not in context.state.array_records:
        return {}
    return wire.record_to_deltas(context.state.array_records[STATE_LOG])


def _save_node(context: Context, fp: str, version: int, log_: dict[int, dict[str, LowRank]],
               adapter: dict[str, LoraPair] | None = None) -> None:
    context.state[STATE_NODE] = ConfigRecord({"fingerprint": fp, "backbone-version": version})
    context.state[STATE_LOG] = wire.deltas_to_record(log_)
    context.state[STATE_ADAPTER] = wire.lora_to_record(adapter or {})


def _partition(context: Context, config: RunConfig) -> tuple[int, int]:
    try:
        pid = int(context.node_config["partition-id"])
        count = int(context.node_config.get("num-partitions", config.clients))
    except (KeyError, TypeError, ValueError):
        raise ValueError("this SuperNode has no integer 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=0 num-partitions=2\")") from None
    if count != config.clients or not 0 <= pid < config.clients:
        raise ValueError(f"node config partition-id={pid} num-partitions={count} does not fit the run's "
                         f"clients={config.clients}")
    return pid, count


# --- handlers ---------------------------------------------------------------------------------------------


def hello(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, which backbone version it has and how many examples.

    A node that cannot take part (no ``partition-id``, unreadable data) says why in ``error``.
    """
    settings = message.content["config"]
    fp = str(settings["fingerprint"])
    info = ConfigRecord({"backbone-version": node_version(context, fp)})
    try:
        info["partition-id"] = int(context.node_config["partition-id"])
        info["num-partitions"] = int(context.node_config.get("num-partitions", -1))
    except (KeyError, TypeError, ValueError):
        info["error"] = ("no integer 'partition-id' in its node config (start it with "
                         "--node-config \"partition-id=0 num-partitions=2\")")
        return Message(RecordDict({"node": info}), reply_to=message)
    if settings.get("run-config"):
        try:
            config = from_dict(json.loads(settings["run-config"]))
            examples, _ = node_examples(config, context.node_config, info["partition-id"])
            info["num-examples"] = len(examples)
        except Exception as error:  # the server logs it and leaves the node out
            info["error"] = f"cannot read its data: {type(error).__name__}: {error}"
    return Message(RecordDict({"node": info}), reply_to=message)


def _resync(message: Message, pid: int, version: int, full_adapter: bool = False, own: bool = False) -> Message:
    info = ConfigRecord({"backbone-version": version, "partition-id": pid, "full-adapter": full_adapter,
                         "own-state": own})
    return Message(RecordDict({"resync": info}), reply_to=message)


def _own(message: Message, context: Context, expected: str) -> tuple[dict[str, dict[str, Tensor]] | None, bool]:
    """What the client keeps between rounds, the copy the server expects (digest ``expected``): the one the message
    carries, else the node's own; and whether the node has it. ``(None, True)`` when the server expects nothing (the
    client has not trained yet, or its replies were not accepted: it starts from the global adapter)."""
    if not expected:
        return None, True
    records = [message.content.array_records.get("own"), context.state.array_records.get(STATE_OWN)]
    for record in [r for r in records if r is not None]:
        own = wire.record_to_own(record)
        if wire.own_digest(own) == expected:
            return own, True
    return None, False


def train(message: Message, context: Context) -> Message:
    """Bring the backbone to the server's version, train the partition from where the method starts it, reply."""
    settings = message.content["config"]
    config = from_dict(json.loads(settings["run-config"]))
    fp = str(settings["fingerprint"])
    pid, _ = _partition(context, config)
    start, end = int(settings["backbone-from"]), int(settings["backbone-to"])
    version = node_version(context, fp)
    if version > end:  # a backbone from another history: start over from the base model
        _save_node(context, fp, 0, {})
        return _resync(message, pid, 0)
    own, has_own = _own(message, context, str(settings["own-digest"]))
    if version < start:
        return _resync(message, pid, version, own=not has_own)
    worker = shared_worker(context.run_id, fp, config)
    # the global adapter: the factors the message carries, the others as the node last had them
    held = context.state.array_records.get(STATE_ADAPTER)
    held = wire.record_to_lora(held) if version > 0 and held else worker.initial
    factors = {name: {"A": pair.A, "B": pair.B} for name, pair in held.items()}
    for factor in ("A", "B"):
        if f"global-{factor}" in message.content:
            for name, sent in wire.record_to_factors(message.content[f"global-{factor}"]).items():
                factors.setdefault(name, {})[factor] = sent[factor]
    global_lora = {name: LoraPair(pair["A"], pair["B"]) for name, pair in factors.items()}
    used = [f for f in ("A", "B") if own is None or f not in worker.method.local]  # the client's own replace the rest
    if any(wire.factor_digest(global_lora, f) != settings[f"digest-{f}"] for f in used):
        _save_node(context, fp, 0, {})  # e.g. another PEFT init: ask for it all
        return _resync(message, pid, 0, full_adapter=True, own=not has_own)
    if not has_own:
        return _resync(message, pid, version, own=True)
    applied = _node_log(context, fp)
    incoming = wire.record_to_deltas(message.content["backbone"]) if "backbone" in message.content else {}
    for entry in range(version, end):
        applied[entry] = incoming.get(entry, {})
    _save_node(context, fp, end, applied, global_lora)

    if worker.version > end:
        reset_worker()
        worker = shared_worker(context.run_id, fp, config)
    for entry in range(worker.version, end):
        worker.apply(applied.get(entry, {}))
    worker.version = end

    trainable = {"A": bool(settings["train-A"]), "B": bool(settings["train-B"])}
    examples = worker.examples(context.node_config, pid)
    control = wire.record_to_own(message.content["control"]) if "control" in message.content else None
    method_state = wire.record_to_own(message.content["method-state"]) if "method-state" in message.content else None
    update, loss = train_round(worker.model, worker.method, examples, global_lora, trainable, config.train_config(),
                               rank=client_ranks(config)[pid], own=own, control=control, t=int(settings["round"]),
                               lr=float(settings["lr"]), seed=int(settings["seed"]), client_id=client_id(pid),
                               pad_id=worker.tokenizer.pad_token_id, method_state=method_state)
    if update.keep:
        context.state[STATE_OWN] = wire.own_to_record(update.keep)
    factors = tuple(f for f in ("A", "B") if trainable[f])
    reply = RecordDict({
        "factors": wire.lora_to_record(update.factors, factors),
        "metrics": MetricRecord({"num-examples": update.num_examples, "train-loss": float(loss),
                                 "backbone-version": end, "partition-id": pid, "scaling": float(update.scaling)}),
    })
    return Message(reply, reply_to=message)


def make_client_app() -> ClientApp:
    """A ClientApp: ``hello`` answers the server's queries, ``train`` its train messages."""
    app = ClientApp()
    app.query()(hello)
    app.train()(train)
    return app


app = make_client_app()

__all__ = ["app", "hello", "make_client_app", "node_version", "train"]
