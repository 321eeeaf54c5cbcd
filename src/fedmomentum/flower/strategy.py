"""A Flower strategy (Message API) that drives any fedmomentum aggregation method.

Each round, following the structure of Flower's ``FedAvg``:

1. ``configure_train``: learn which partition each connected node holds (a ``query`` message to new nodes),
   pick the round's clients with ``simulation.sample_clients`` (the same clients as ``fedmomentum run``), and
   build one train message per node: the global adapter (float32), the backbone deltas of the rounds that node has
   not applied (factored, never dense), the round's trainable factors, the learning rate, the client's seed and
   the run's configuration.
2. the messages go out through the ``Grid``; a node whose backbone version is not what the server believed
   replies ``resync`` and is sent the deltas from its own version (see ``client_app`` for the scheme).
3. ``aggregate_train``: failed or silent nodes are left out, replies with bad factors (wrong keys or shapes, NaN
   or Inf) are rejected with a logged reason, the rest (sorted by client) go to ``method.aggregate`` with the
   weights renormalised over them; the server's own model takes the backbone delta and the new adapter.

The strategy keeps the method (and its state), the round, the global adapter and the log of every round's
backbone delta; ``start`` evaluates on the server-held model and writes the same ``metrics.jsonl``,
``aggregation.jsonl``, ``summary.json``, ``curves.png``, checkpoint and exports as ``fedmomentum run``, so a run
can be resumed from its folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from safetensors import safe_open
from safetensors.torch import save_file

from .. import checkpoint, report, simulation
from ..client import round_lr
from ..config import RunConfig, save
from ..peft_io import apply_backbone, export_adapter, export_merged, get_backbone, get_lora, set_backbone, set_lora
from ..types import Aggregate, ClientUpdate, LoraPair, LowRank, UpdateError
from . import wire

BACKBONE_LOG = "backbone_log.safetensors"


class RoundFailed(RuntimeError):
    """Fewer than ``min_clients`` usable updates in a round; the run stops (resume it from its checkpoint)."""


@dataclass
class Node:
    node_id: int
    partition: int
    version: int  # the backbone version the server believes the node has
    failures: int = 0  # consecutive rounds it failed or went silent (another node for its partition goes first)


def client_id(partition: int) -> str:
    return f"client-{partition}"


class LoraStrategy(Strategy):
    """Federated LoRA with any ``fedmomentum.methods`` method, over Flower's Message API.

    Parameters
    ----------
    config : RunConfig
        The run (model, method, data, rounds, ...); the same object ``fedmomentum run`` takes.
    min_clients : int
        A round needs at least this many accepted updates, otherwise ``RoundFailed`` stops the run.
    round_timeout : float
        Seconds to wait for the train replies of a round; a node that has not replied by then is left out.
    node_timeout : float
        Seconds to wait, at the start of a round, for the nodes holding the sampled partitions to connect.
    setup : simulation.Setup, optional
        A prepared server-side setup (model, method, evaluation data); built from ``config`` when omitted.
    """

    def __init__(self, config: RunConfig, *, min_clients: int = 1, round_timeout: float = 3600.0,
                 node_timeout: float = 60.0, setup: simulation.Setup | None = None) -> None:
        config.validate()
        if not config.out:
            config = config.replace(out=f"runs/flower-{config.method}")
        if min_clients < 1:
            raise ValueError("min_clients must be ≥ 1")
        self.config = config
        self.min_clients = min_clients
        self.round_timeout = float(round_timeout)
        self.node_timeout = float(node_timeout)
        self.setup = setup
        self.fingerprint = wire.fingerprint(config)
        self.round = 0  # completed rounds = the backbone version
        self.global_lora: dict[str, LoraPair] = {}
        self.backbone_log: list[dict[str, LowRank]] = []  # index t: the delta of round t (empty dict for none)
        self.adapter_changes: list[dict[str, bool]] = []  # index t: did round t change the global A / B?
        self.nodes: dict[int, Node] = {}
        self._ignored: dict[int, str] = {}  # node id → why it is not used
        self._round: dict = {}  # bookkeeping of the round in progress
        self.last: tuple[Aggregate, dict] | None = None

    @property
    def method(self):
        return self.setup.method if self.setup is not None else None

    def summary(self) -> None:
        log(INFO, "\t├──> fedmomentum method: %s %s", self.config.method, self.config.method_options or "")
        log(INFO, "\t├──> rounds: %d, clients: %d per round of %d", self.config.rounds,
            self.config.clients_per_round, self.config.clients)
        log(INFO, "\t├──> min clients: %d, round timeout: %.0fs, node timeout: %.0fs", self.min_clients,
            self.round_timeout, self.node_timeout)
        log(INFO, "\t└──> out: %s", self.config.out)

    # --- nodes ----------------------------------------------------------------------------------------

    def _hello(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
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
                self._ignored[node_id] = "its hello reply has no 'node' record"
                log(WARNING, "ignoring node %d: %s", node_id, self._ignored[node_id])
                continue
            pid, count = int(info["partition-id"]), int(info["num-partitions"])
            if not 0 <= pid < self.config.clients or count not in (-1, self.config.clients):
                self._ignored[node_id] = (f"its node config partition-id={pid} num-partitions={count} does not fit "
                                          f"the run's clients={self.config.clients}")
                log(WARNING, "ignoring node %d: %s", node_id, self._ignored[node_id])
                continue
            self.nodes[node_id] = Node(node_id, pid, int(info["backbone-version"]))
            log(INFO, "node %d holds partition %d (backbone version %d)", node_id, pid,
                self.nodes[node_id].version)

    def discover(self, grid: Grid, wanted: set[int]) -> None:
        """Track connected nodes; wait up to ``node_timeout`` for nodes holding every ``wanted`` partition."""
        deadline = time.monotonic() + self.node_timeout
        while True:
            connected = set(grid.get_node_ids())
            for gone in set(self.nodes) - connected:
                log(INFO, "node %d (partition %d) left", gone, self.nodes.pop(gone).partition)
            new = connected - set(self.nodes) - set(self._ignored)
            if new:
                self._hello(grid, sorted(new), deadline - time.monotonic())
            if wanted <= {node.partition for node in self.nodes.values()} or time.monotonic() >= deadline:
                return
            time.sleep(0.5)

    def node_for(self, partition: int) -> Node | None:
        """The node that trains ``partition``; when several hold it, the most reliable, then most up-to-date one."""
        holders = [node for node in self.nodes.values() if node.partition == partition]
        return max(holders, key=lambda node: (-node.failures, node.version, -node.node_id)) if holders else None

    # --- messages -------------------------------------------------------------------------------------

    def train_settings(self, round: int) -> ConfigRecord:
        """What every node gets this round, besides its own seed and backbone range."""
        trainable = self.method.trainable(round)
        return ConfigRecord({
            "run-config": wire.config_json(self.config),
            "fingerprint": self.fingerprint,
            "round": round,
            "lr": round_lr(self.config.lr, self.config.lr_schedule, round, self.config.rounds),
            "train-A": bool(trainable["A"]),
            "train-B": bool(trainable["B"]),
            "adapter-digest": wire.adapter_digest(self.global_lora),
        })

    def train_message(self, node: Node, arrays: ArrayRecord, settings: ConfigRecord, server_round: int,
                      full: bool = False) -> Message:
        """One node's message: the settings, its seed, and the adapter factors and backbone deltas it lacks.

        A node at version ``v`` holds the global adapter of version ``v`` (the one it last trained from; version 0
        is the seeded LoRA init, which every node builds itself), so a factor goes out only if a round since
        ``v`` changed it (``full`` sends both). The settings carry the adapter's digest for the node to check.
        """
        version = len(self.backbone_log)
        start = min(node.version, version)
        config = ConfigRecord(dict(settings.items()))
        config["seed"] = simulation.client_seed(self.config, server_round - 1, node.partition)
        config["partition-id"] = node.partition
        config["backbone-from"] = start
        config["backbone-to"] = version
        deltas = {t: self.backbone_log[t] for t in range(start, version) if self.backbone_log[t]}
        content = RecordDict({"config": config, "backbone": wire.deltas_to_record(deltas)})
        for factor, record in wire.split_factors(arrays).items():
            if full or any(self.adapter_changes[t][factor] for t in range(start, version)):
                content[f"global-{factor}"] = record
        return Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(server_round))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample this round's partitions and build one message per node holding one of them."""
        round = server_round - 1
        sampled = simulation.sample_clients(self.config, round)
        self.discover(grid, set(sampled))
        targets, missing = {}, []
        for partition in sampled:
            node = self.node_for(partition)
            if node is None:
                missing.append(partition)
            else:
                targets[node.node_id] = node
        for partition in missing:
            log(WARNING, "round %d: no connected node holds partition %d; it is left out", server_round, partition)
        self._round.update(sampled=sampled, targets=targets, missing=missing, arrays=arrays, settings=config)
        log(INFO, "configure_train: %d of %d sampled partitions have a node", len(targets), len(sampled))
        return [self.train_message(node, arrays, config, server_round) for node in targets.values()]

    def exchange(self, grid: Grid, messages: list[Message], server_round: int) -> list[Message]:
        """Send, wait up to ``round_timeout``, and resend to nodes that ask for a resync; counts the bytes."""
        deadline = time.monotonic() + self.round_timeout
        down, up = self._round.setdefault("down", {}), self._round.setdefault("up", {})
        replies: dict[int, Message] = {}
        attempts: dict[int, int] = {}
        pending = list(messages)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for message in pending:
                cid = client_id(self.nodes[message.metadata.dst_node_id].partition)
                down[cid] = down.get(cid, 0) + wire.array_bytes(message.content)
            retry = []
            for reply in grid.send_and_receive(pending, timeout=remaining):
                node = self.nodes.get(reply.metadata.src_node_id)
                if node is None:  # not a node this round wrote to
                    continue
                cid = client_id(node.partition)
                if reply.has_content():
                    up[cid] = up.get(cid, 0) + wire.array_bytes(reply.content)
                if reply.has_content() and "resync" in reply.content:
                    attempts[node.node_id] = attempts.get(node.node_id, 0) + 1
                    resync = reply.content["resync"]
                    node.version = int(resync["backbone-version"])
                    full = bool(resync.get("full-adapter", False))
                    self._round["resyncs"] = self._round.get("resyncs", 0) + 1
                    log(INFO, "node %d (%s) has backbone version %d%s; resending from there", node.node_id, cid,
                        node.version, " and needs the whole adapter" if full else "")
                    if attempts[node.node_id] <= 2:
                        retry.append(self.train_message(node, self._round["arrays"], self._round["settings"],
                                                        server_round, full=full))
                        continue
                replies[node.node_id] = reply
            pending = retry
        return list(replies.values())

    # --- replies --------------------------------------------------------------------------------------

    def parse_reply(self, reply: Message, round: int) -> tuple[ClientUpdate, float]:
        """A train reply as a ``ClientUpdate`` (frozen factors filled in from the global adapter); checks keys."""
        node = self.nodes[reply.metadata.src_node_id]
        cid = client_id(node.partition)
        content = reply.content
        if "resync" in content:
            raise UpdateError(f"client {cid!r}: still asks for a backbone resync after two resends")
        if "factors" not in content.array_records or "metrics" not in content.metric_records:
            raise UpdateError(f"client {cid!r}: the reply needs an ArrayRecord 'factors' and a MetricRecord "
                              f"'metrics', got {sorted(content)}")
        metrics = content.metric_records["metrics"]
        version = metrics.get("backbone-version")
        if version != len(self.backbone_log):
            raise UpdateError(f"client {cid!r}: trained on backbone version {version}, "
                              f"expected {len(self.backbone_log)}")
        count = metrics.get("num-examples")
        if not isinstance(count, int | float) or count != int(count):
            raise UpdateError(f"client {cid!r}: num-examples must be an integer, got {count!r}")
        try:
            sent = wire.record_to_factors(content.array_records["factors"])
        except ValueError as error:
            raise UpdateError(f"client {cid!r}: {error}") from None
        trainable = self.method.trainable(round)
        expected = {f for f in ("A", "B") if trainable[f]}
        missing, extra = sorted(set(self.global_lora) - set(sent)), sorted(set(sent) - set(self.global_lora))
        if missing or extra:
            raise UpdateError(f"client {cid!r}: layers do not match the global adapter (missing {missing[:3]}, "
                              f"extra {extra[:3]})")
        factors = {}
        for name, pair in self.global_lora.items():
            if set(sent[name]) != expected:
                raise UpdateError(f"client {cid!r}, layer {name!r}: sent factors {sorted(sent[name])}, "
                                  f"this round trains {sorted(expected)}")
            factors[name] = LoraPair(sent[name].get("A", pair.A), sent[name].get("B", pair.B))
        loss = float(metrics.get("train-loss", math.nan))
        return ClientUpdate(factors, num_examples=int(count), client_id=cid), loss

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject bad replies, aggregate the rest with the method, update the server model and the delta log."""
        round = server_round - 1
        failed = {client_id(p): "no connected node holds this partition" for p in self._round.get("missing", [])}
        rejected: dict[str, str] = {}
        accepted: list[tuple[int, ClientUpdate, float]] = []
        answered = set()
        for reply in replies:
            node = self.nodes[reply.metadata.src_node_id]
            answered.add(node.node_id)
            cid = client_id(node.partition)
            if reply.has_error():
                node.failures += 1
                failed[cid] = f"error reply: {reply.error.reason}"
                log(WARNING, "round %d: %s failed and is left out: %s", server_round, cid, reply.error.reason)
                continue
            try:
                update, loss = self.parse_reply(reply, round)
                self.method.validate(self.global_lora, [update])
            except UpdateError as error:
                rejected[cid] = str(error)
                log(WARNING, "round %d: rejected the update of %s: %s", server_round, cid, error)
                continue
            node.version, node.failures = len(self.backbone_log), 0
            accepted.append((node.partition, update, loss))
        for node_id, node in self._round.get("targets", {}).items():
            if node_id not in answered:
                node.failures += 1
                failed[client_id(node.partition)] = f"no reply within {self.round_timeout:.0f}s"
                log(WARNING, "round %d: %s did not reply in time and is left out", server_round,
                    client_id(node.partition))
        if len(accepted) < self.min_clients:
            raise RoundFailed(f"round {server_round}: {len(accepted)} usable update(s), fewer than min_clients="
                              f"{self.min_clients} (failed: {failed}, rejected: {rejected})")
        accepted.sort(key=lambda item: item[0])
        updates = [update for _, update, _ in accepted]
        started = time.perf_counter()
        result = self.method.aggregate(self.global_lora, updates, scaling=self.setup.scaling, round=round)
        aggregation_seconds = time.perf_counter() - started
        apply_backbone(self.setup.model, result.backbone)
        set_lora(self.setup.model, result.lora)
        self.backbone_log.append(result.backbone)
        self.adapter_changes.append({factor: any(not torch.equal(getattr(result.lora[name], factor),
                                                                 getattr(pair, factor))
                                                 for name, pair in self.global_lora.items())
                                     for factor in ("A", "B")})
        self.global_lora = result.lora
        self.round = round + 1
        record = self._record(round, result, accepted, failed, rejected, aggregation_seconds)
        self.last = (result, record)
        return wire.lora_to_record(result.lora), _metric_record(record)

    def _record(self, round, result, accepted, failed, rejected, aggregation_seconds) -> dict:
        """The metrics.jsonl row: ``fedmomentum run``'s keys, bytes measured on the messages, and the faults."""
        stats = {k: v for k, v in result.stats.items()
                 if k not in ("layers", "round", "method", "uplink_bytes_per_client")}
        ids = [update.client_id for _, update, _ in accepted]
        down, up = self._round.get("down", {}), self._round.get("up", {})
        return {
            "round": round + 1,
            "method": self.config.method,
            **stats,
            "client_ids": ids,
            "lr": round_lr(self.config.lr, self.config.lr_schedule, round, self.config.rounds),
            "train_loss": sum(loss for _, _, loss in accepted) / len(accepted),
            "uplink_bytes": sum(up.get(c, 0) for c in ids) / len(ids),
            "downlink_bytes": sum(down.get(c, 0) for c in ids) / len(ids),
            "uplink_bytes_total": sum(up.values()),
            "downlink_bytes_total": sum(down.values()),
            "uplink_bytes_per_client": dict(sorted(up.items())),
            "downlink_bytes_per_client": dict(sorted(down.items())),
            "method_uplink_bytes": stats.get("uplink_bytes"),
            "method_downlink_bytes": stats.get("downlink_bytes"),
            "sampled": [client_id(p) for p in self._round.get("sampled", [])],
            "failed": failed,
            "rejected": rejected,
            "resyncs": self._round.get("resyncs", 0),
            "aggregation_seconds": aggregation_seconds,
            "round_seconds": time.perf_counter() - self._round.get("started", time.perf_counter()),
        }

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server evaluates its own model (as ``fedmomentum run`` does)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # --- one round and the whole run ------------------------------------------------------------------

    def train_round(self, grid: Grid, round: int) -> tuple[Aggregate, dict]:
        """Configure, send (with resyncs), aggregate; returns the method's result and the round's record."""
        self._round = {"started": time.perf_counter()}
        server_round = round + 1
        arrays = wire.lora_to_record(self.global_lora)
        messages = list(self.configure_train(server_round, arrays, self.train_settings(round), grid))
        replies = self.exchange(grid, messages, server_round)
        self.aggregate_train(server_round, replies)
        return self.last

    def save_backbone_log(self, path: Path) -> None:
        tensors = {f"{t}/{name}/{side}": getattr(delta, attr).contiguous()
                   for t, deltas in enumerate(self.backbone_log) for name, delta in deltas.items()
                   for side, attr in (("L", "left"), ("R", "right"))}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"rounds": str(len(self.backbone_log)), "format": "fedmomentum-log/1",
                                               "adapter_changes": json.dumps(self.adapter_changes)})
        tmp.replace(path)

    def load_backbone_log(self, path: Path, rounds: int) -> None:
        """The deltas of the first ``rounds`` rounds, as saved by ``save_backbone_log``."""
        if not path.is_file():
            raise ValueError(f"cannot resume on Flower without {path}: late or restarted nodes need every round's "
                             "backbone delta (a run started by `fedmomentum run` cannot continue on Flower)")
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            saved = int(metadata.get("rounds", -1))
            if saved < rounds:
                raise ValueError(f"{path} holds {saved} rounds of backbone deltas, the checkpoint needs {rounds}")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        self.adapter_changes = json.loads(metadata["adapter_changes"])[:rounds]
        log_: list[dict[str, LowRank]] = [{} for _ in range(rounds)]
        for key, left in tensors.items():
            t, rest = key.split("/", 1)
            name, _, side = rest.rpartition("/")
            if side == "L" and int(t) < rounds:
                log_[int(t)][name] = LowRank(left, tensors[f"{t}/{name}/R"])
        self.backbone_log = log_

    def start(self, grid: Grid, *, resume: bool = False) -> Result:  # type: ignore[override]
        """Run (or, with ``resume``, continue from the checkpoint in ``config.out``) all rounds."""
        config = self.config
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log(INFO, "Starting %s:", type(self).__name__)
        self.summary()
        if self.setup is None:
            self.setup = simulation.prepare(config)
        setup, done = self.setup, 0
        if resume:
            state = checkpoint.load(out / simulation.CHECKPOINT)
            if state.info.get("config") != simulation._comparable(config):
                raise ValueError(f"{out / simulation.CHECKPOINT} was written by a different config; "
                                 "resume with the same one")
            set_backbone(setup.model, state.backbone)
            set_lora(setup.model, state.lora)
            setup.method.load_state_dict(state.method_state)
            done = state.round
            self.load_backbone_log(out / BACKBONE_LOG, done)
            log(INFO, "resuming after round %d", done)
        self.round = done
        save(config, out / "config.json")
        records = simulation.Records(out, keep_rounds=done if resume else None)
        self.global_lora = get_lora(setup.model)
        result = Result()
        if not resume:
            record = {"round": 0, "method": config.method}
            simulation.evaluate(setup, record, accuracy=config.accuracy_every > 0)
            records.append(record)
            result.evaluate_metrics_serverapp[0] = _metric_record(record)
        for round in range(done, config.rounds):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", round + 1, config.rounds)
            aggregate, record = self.train_round(grid, round)
            last = round + 1 == config.rounds
            if (round + 1) % config.eval_every == 0 or last:
                due = config.accuracy_every and (round + 1) % config.accuracy_every == 0
                simulation.evaluate(setup, record, accuracy=bool(due) or last)
                result.evaluate_metrics_serverapp[round + 1] = _metric_record(record)
            records.append(record, aggregate.stats["layers"])
            result.train_metrics_clientapp[round + 1] = _metric_record(record)
            self.save_backbone_log(out / BACKBONE_LOG)  # before the checkpoint: the log may run ahead, never behind
            checkpoint.save(out / simulation.CHECKPOINT, checkpoint.Checkpoint(
                round + 1, self.global_lora, get_backbone(setup.model), setup.method.state_dict(),
                {"config": simulation._comparable(config)}))
            log(INFO, "%s", report.round_line(record))
            for what in ("failed", "rejected"):
                if record[what]:
                    log(WARNING, "round %d %s: %s", round + 1, what, record[what])
        summary = report.summarize(records.rows, config, seconds=time.perf_counter() - started,
                                   peak_rss_mb=simulation.peak_rss_mb())
        trained = [row for row in records.rows if row["round"] > 0]
        summary["uplink_bytes"] = sum(row.get("uplink_bytes_total", 0) for row in trained)  # measured, all replies
        summary["downlink_bytes"] = sum(row.get("downlink_bytes_total", 0) for row in trained)
        summary["engine"] = "flower"
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        report.plot_curves(records.rows, out / "curves.png", title=f"{config.method} (flower)")
        backbone_changed = any(row.get("residual_rank") for row in records.rows)
        if backbone_changed:
            export_merged(setup.model, out / "base", setup.tokenizer, merge=False)
        export_adapter(setup.model, out / "adapter", base=(out / "base").resolve() if backbone_changed else None)
        if config.export_merged:
            export_merged(setup.model, out / "merged", setup.tokenizer)
        result.arrays = wire.lora_to_record(self.global_lora)
        log(INFO, "fedmomentum on flower: %d rounds in %.1fs, records in %s", config.rounds - done,
            summary["seconds"], out)
        return result


def _metric_record(record: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in record.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)})


__all__ = ["BACKBONE_LOG", "LoraStrategy", "Node", "RoundFailed", "client_id"]
