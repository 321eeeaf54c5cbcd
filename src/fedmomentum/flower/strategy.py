"""A Flower strategy (Message API) that drives any fedmomentum aggregation method through the shared run loop.

``LoraStrategy.start`` hands the run to ``driver.run`` (the loop ``fedmomentum run`` uses: resume, evaluation,
records, checkpoint, summary, exports) with the strategy as its engine. Each round, following Flower's ``FedAvg``:

1. ``configure_train``: learn which partition each connected node holds (``nodes``), pick the round's partitions
   with ``schedule.sample_clients`` (the same clients as ``fedmomentum run``), and build one train message per
   node with what it lacks (``resync``);
2. the messages go out through the ``Grid``; nodes that ask for a resync are resent from their own version;
3. ``collect``: failed or silent nodes are left out, bad replies are rejected with the reason logged and recorded
   (``replies``), and the accepted updates, sorted by client, go back to the driver, which aggregates them with
   the method (weights renormalised over them) and updates the server's model. The backbone delta goes into the
   log late or restarted nodes replay (``backbone_log``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from .. import driver
from ..build import Setup, prepare
from ..config import RunConfig
from ..records import read_metrics
from ..schedule import client_seed, sample_clients
from ..types import Aggregate, ClientUpdate, LoraPair, UpdateError
from . import wire
from .backbone_log import FILE as BACKBONE_LOG
from .backbone_log import BackboneLog
from .nodes import Node, Nodes, client_id
from .replies import parse_train_reply
from .resync import Exchange, train_message


class RoundFailed(RuntimeError):
    """Fewer than ``min_clients`` usable updates in a round; the run stops (resume it from its checkpoint)."""


class LoraStrategy(Strategy, driver.Engine):
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
    setup : build.Setup, optional
        A prepared server-side setup (model, method, evaluation data); built from ``config`` when omitted.
    overwrite : bool
        Delete the run already in ``config.out`` and start over (a new run refuses a folder that holds files).
    """

    name = "flower"
    progress_bar = False  # per-round lines go to Flower's log

    def __init__(self, config: RunConfig, *, min_clients: int = 1, round_timeout: float = 3600.0,
                 node_timeout: float = 60.0, setup: Setup | None = None, overwrite: bool = False) -> None:
        config.validate()
        if not config.out:
            config = config.replace(out=f"runs/flower-{config.method}")
        if min_clients < 1:
            raise ValueError("min_clients must be ≥ 1")
        self.config = config
        self.min_clients = min_clients
        self.round_timeout = float(round_timeout)
        self.setup = setup
        self.overwrite = overwrite
        self.fingerprint = wire.fingerprint(config)
        self.nodes = Nodes(config.clients, self.fingerprint, float(node_timeout))
        self.backbone_log = BackboneLog()
        self.global_lora: dict[str, LoraPair] = {}
        self.grid: Grid | None = None
        self._round: dict = {}  # bookkeeping of the round in progress

    @property
    def method(self):
        return self.setup.method if self.setup is not None else None

    @property
    def round(self) -> int:
        """Completed rounds (= the backbone version)."""
        return self.backbone_log.version

    def summary(self) -> None:
        log(INFO, "\t├──> fedmomentum method: %s %s", self.config.method, self.config.method_options or "")
        log(INFO, "\t├──> rounds: %d, clients: %d per round of %d", self.config.rounds,
            self.config.clients_per_round, self.config.clients)
        log(INFO, "\t├──> min clients: %d, round timeout: %.0fs, node timeout: %.0fs", self.min_clients,
            self.round_timeout, self.nodes.node_timeout)
        log(INFO, "\t└──> out: %s", self.config.out)

    # --- Flower's Strategy ----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample this round's partitions and build one message per node holding one of them."""
        round = server_round - 1
        sampled = sample_clients(self.config, round)
        self.nodes.discover(grid, set(sampled))
        targets, missing = {}, []
        for partition in sampled:
            node = self.nodes.for_partition(partition)
            if node is None:
                missing.append(partition)
            else:
                targets[node.node_id] = node
        for partition in missing:
            log(WARNING, "round %d: no connected node holds partition %d; it is left out", server_round, partition)

        def message(node: Node, full: bool = False) -> Message:
            seed = client_seed(self.config, round, node.partition)
            return train_message(node, config, arrays, self.backbone_log, seed, server_round, full)

        self._round = {"sampled": sampled, "targets": targets, "missing": missing,
                       "exchange": Exchange(self.nodes, message)}
        log(INFO, "configure_train: %d of %d sampled partitions have a node", len(targets), len(sampled))
        return [message(node) for node in targets.values()]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: the accepted replies aggregated into the new global adapter (applied to the server's
        model). ``start`` runs the same two steps, ``collect`` and ``driver.aggregate``, inside the shared loop."""
        trained = self.collect(server_round, replies)
        result, _ = driver.aggregate(self.setup, self.global_lora, trained.updates, server_round - 1)
        return wire.lora_to_record(result.lora), _metric_record(result.stats)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server evaluates its own model (as ``fedmomentum run`` does)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def start(self, grid: Grid, *, resume: bool = False) -> Result:  # type: ignore[override]
        """Run (or, with ``resume``, continue from the checkpoint in ``config.out``) all rounds."""
        log(INFO, "Starting %s:", type(self).__name__)
        self.summary()
        self.grid = grid
        if self.setup is None:
            self.setup = prepare(self.config)
        driver.run(self.setup, self, resume=resume, overwrite=self.overwrite)
        result = Result(arrays=wire.lora_to_record(self.global_lora))
        for row in read_metrics(self.config.out):
            if "eval_loss" in row:
                result.evaluate_metrics_serverapp[row["round"]] = _metric_record(row)
            if row["round"] > 0:
                result.train_metrics_clientapp[row["round"]] = _metric_record(row)
        return result

    # --- the round, as the driver's engine ------------------------------------------------------------

    def train_settings(self, round: int, trainable: dict[str, bool], lr: float) -> ConfigRecord:
        """What every node gets this round, besides its own seed and backbone range."""
        return ConfigRecord({
            "run-config": wire.config_json(self.config),
            "fingerprint": self.fingerprint,
            "round": round,
            "lr": lr,
            "train-A": bool(trainable["A"]),
            "train-B": bool(trainable["B"]),
            "adapter-digest": wire.adapter_digest(self.global_lora),
        })

    def train_round(self, round: int, global_lora: dict[str, LoraPair], trainable: dict[str, bool],
                    lr: float) -> driver.ClientRound:
        """Configure, send (with resyncs) and collect the accepted updates of the round."""
        self.global_lora = global_lora
        server_round = round + 1
        arrays = wire.lora_to_record(global_lora)
        messages = list(self.configure_train(server_round, arrays, self.train_settings(round, trainable, lr),
                                             self.grid))
        replies = self._round["exchange"].run(self.grid, messages, self.round_timeout)
        return self.collect(server_round, replies)

    def collect(self, server_round: int, replies: Iterable[Message]) -> driver.ClientRound:
        """The usable updates of the round, sorted by client; failures and rejections are logged and recorded."""
        round = server_round - 1
        trainable = self.method.trainable(round)
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
                update, loss = parse_train_reply(reply, cid, self.global_lora, trainable, self.backbone_log.version)
                self.method.validate(self.global_lora, [update])
            except UpdateError as error:
                rejected[cid] = str(error)
                log(WARNING, "round %d: rejected the update of %s: %s", server_round, cid, error)
                continue
            node.version, node.failures = self.backbone_log.version, 0
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
        exchange = self._round["exchange"]
        ids = [update.client_id for _, update, _ in accepted]
        measured = {  # bytes measured on the messages (npy-encoded), replacing the method's float32 count
            "uplink_bytes": sum(exchange.up.get(c, 0) for c in ids) / len(ids),
            "downlink_bytes": sum(exchange.down.get(c, 0) for c in ids) / len(ids),
            "uplink_bytes_total": sum(exchange.up.values()),
            "downlink_bytes_total": sum(exchange.down.values()),
            "uplink_bytes_per_client": dict(sorted(exchange.up.items())),
            "downlink_bytes_per_client": dict(sorted(exchange.down.items())),
            "sampled": [client_id(p) for p in self._round["sampled"]],
            "failed": failed,
            "rejected": rejected,
            "resyncs": exchange.resyncs,
        }
        return driver.ClientRound([u for _, u, _ in accepted], [loss for _, _, loss in accepted], measured)

    def restore(self, out: Path, done: int) -> None:
        self.backbone_log = BackboneLog.load(out / BACKBONE_LOG, done)
        log(INFO, "resuming after round %d", done)

    def after_round(self, round: int, previous: dict[str, LoraPair], result: Aggregate, record: dict,
                    out: Path) -> None:
        """Log the round's delta (saved before the checkpoint: the log may run ahead of it, never behind)."""
        self.backbone_log.append(result.backbone, previous, result.lora)
        self.backbone_log.save(out / BACKBONE_LOG)
        self.global_lora = result.lora
        record["method_uplink_bytes"] = result.stats["uplink_bytes"]
        record["method_downlink_bytes"] = result.stats["downlink_bytes"]
        for what in ("failed", "rejected"):
            if record[what]:
                log(WARNING, "round %d %s: %s", round + 1, what, record[what])

    def finish(self, summary: dict, rows: list[dict]) -> None:
        trained = [row for row in rows if row["round"] > 0]
        summary["uplink_bytes"] = sum(row.get("uplink_bytes_total", 0) for row in trained)  # measured, all replies
        summary["downlink_bytes"] = sum(row.get("downlink_bytes_total", 0) for row in trained)
        summary["engine"] = "flower"

    def log(self, line: str) -> None:
        log(INFO, "%s", line)


def _metric_record(record: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in record.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)})


__all__ = ["BACKBONE_LOG", "LoraStrategy", "RoundFailed"]
