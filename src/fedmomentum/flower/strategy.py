"""A Flower strategy (Message API) that drives any fedmomentum aggregation method through the shared run loop.

``LoraStrategy.start`` hands the run to ``driver.run`` (the loop ``fedmomentum run`` uses: resume, evaluation,
records, checkpoint, summary, exports) with the strategy as its engine. Each round, following Flower's ``FedAvg``:

1. ``configure_train``: pick the round's partitions with ``schedule.sample_clients`` (the same clients as
   ``fedmomentum run``) and prepare the round's ``Exchange``;
2. the exchange asks new nodes which partition they hold (``nodes``), sends each partition's node a train message
   with what it lacks (``resync``), resends to nodes that ask for a resync, notices nodes that disconnect or take
   a partition over, and waits for the replies;
3. ``collect``: every reply passes ``replies.parse_train_reply`` (any fault rejects that reply, with the reason
   logged and recorded; factors at exactly the client's configured rank, ``client_ranks``, and its exact scaling,
   within ``max-factor-abs`` of where the client started); a reply whose factors equal one of that client's earlier
   accepted replies is refused (``replays``); ``num-examples`` counts at most what the node's hello declared; the
   accepted updates, sorted by client, go back to the driver, which bounds each one's influence (``robust``:
   norms recorded, clipped to ``clip_k`` × the round's median), aggregates them with the method (weights
   renormalised over them) and updates the server's model. The backbone delta goes into the log late or restarted
   nodes replay (``backbone_log``). A holder that gave no accepted update ``handover-after`` rounds in a row gives
   its partition to a node waiting for it; with ``node-keys`` only the named key may hold a partition (``nodes``).

A method's start (FRLoRA's ``Method.start``, before round 1) is the log's first entry, so every node applies it
like a round's delta. What a method's clients keep between rounds (``Method.local``, FedSA-LoRA's ``B``) stays on
the nodes (``context.state``); the server's state also holds the copy each client last sent
(``ServerState.clients``, saved in every checkpoint like ``fedmomentum run`` does), which is sent back only to a
node that lost it. The server's state is the driver's (``state.ServerState``); the strategy keeps only what it needs
to talk to the nodes: who holds which partition, and the log of backbone deltas late nodes replay.

A run that fails (too few usable updates, a bad option, a missing file, anything else) leaves ``summary.json`` with
``"status": "failed"`` and the reason, unless its folder holds another run; a run that ends leaves
``"status": "completed"``. ``fedmomentum status OUT`` reads it and exits non-zero unless the run completed.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from .. import corrections, driver, robust, rundir
from ..build import Setup, client_id, prepare
from ..client import kept
from ..config import RunConfig
from ..peft_io import get_lora
from ..records import finite, read_metrics
from ..schedule import client_ranks, client_seed, sample_clients
from ..state import ServerState
from ..types import Aggregate, ClientUpdate, LoraPair
from . import wire
from .backbone_log import FILE as BACKBONE_LOG
from .backbone_log import BackboneLog
from .exchange import Exchange
from .identity import read_node_keys
from .local_data import server_held_out
from .nodes import Node, Nodes
from .replays import FILE as REPLAYS
from .replays import Replays, factors_digest
from .replies import REASON_CHARS, Limits, parse_train_reply, reply_cap, shown
from .resync import train_message


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
        Seconds to wait for a train reply; a node that has not replied by then is left out of the round.
    node_timeout : float
        Seconds to wait, from the start of a round, for nodes holding the sampled partitions to connect.
    limits : replies.Limits, optional
        Bounds on what a reply may claim (example counts, factor magnitudes).
    eval_data : str
        The server's own held-out data: ``""`` for the config's seeded held-out examples, a file or folder on the
        server, or ``"none"`` for no evaluation. Never data from the nodes.
    node_keys : str
        A ``node-keys`` file on the server (``identity``): partition → the public key of the only node that may hold
        it (with SuperNode authentication). Empty: the first node to claim a partition holds it.
    handover_after : int
        Without ``node_keys``: a holder that gave no accepted update this many rounds in a row gives its partition
        to a node waiting for it (0: never).
    setup : build.Setup, optional
        A prepared server-side setup (model, method, evaluation data); built from ``config`` when omitted.
    overwrite : bool
        Delete the run already in ``config.out`` and start over (a new run refuses a folder that holds files).
    """

    name = "flower"
    progress_bar = False  # per-round lines go to Flower's log
    features = frozenset({"start", "client_state", "client_ranks", "stream"})

    def __init__(self, config: RunConfig, *, min_clients: int = 1, round_timeout: float = 3600.0,
                 node_timeout: float = 60.0, limits: Limits | None = None, eval_data: str = "",
                 setup: Setup | None = None, overwrite: bool = False, node_keys: str = "",
                 handover_after: int = 2) -> None:
        config.validate()
        if not config.out:
            config = config.replace(out=f"runs/flower-{config.method}")
        if min_clients < 1:
            raise ValueError(f"min-clients must be ≥ 1, got {min_clients}")
        if not (round_timeout > 0 and node_timeout >= 0 and handover_after >= 0):
            raise ValueError(f"round-timeout must be > 0, node-timeout ≥ 0 and handover-after ≥ 0, got "
                             f"{round_timeout}, {node_timeout}, {handover_after}")
        self.config = config
        self.min_clients = min_clients
        self.round_timeout = float(round_timeout)
        self.node_timeout = float(node_timeout)
        self.limits = limits or Limits()
        self.eval_data = eval_data
        self.setup = setup
        self.overwrite = overwrite
        self.fingerprint = wire.fingerprint(config)
        keys = read_node_keys(node_keys, config.clients) if node_keys else None
        self.nodes = Nodes(config.clients, self.fingerprint, self.limits, wire.config_json(config), keys=keys,
                           handover_after=handover_after)
        self.backbone_log = BackboneLog()
        self.replays = Replays()
        self.ranks = client_ranks(config)  # each partition's LoRA rank
        self.state: ServerState | None = None  # the driver's state the round in progress started from
        self.grid: Grid | None = None
        self._round: dict = {}  # bookkeeping of the round in progress

    @property
    def method(self):
        return self.setup.method if self.setup is not None else None

    @property
    def rounds_done(self) -> int:
        return self.backbone_log.rounds

    @property
    def global_lora(self) -> dict[str, LoraPair]:
        return self.state.lora if self.state is not None else {}

    def summary(self) -> None:
        log(INFO, "\t├──> fedmomentum method: %s %s", self.config.method, self.config.method_options or "")
        log(INFO, "\t├──> rounds: %d, clients: %d per round of %d", self.config.rounds,
            self.config.clients_per_round, self.config.clients)
        log(INFO, "\t├──> min clients: %d, round timeout: %.0fs, node timeout: %.0fs", self.min_clients,
            self.round_timeout, self.node_timeout)
        log(INFO, "\t├──> limits: num-examples ≤ %d (and the hello's count), |factor| ≤ %g past the start",
            self.limits.max_examples, self.limits.max_abs)
        log(INFO, "\t├──> clip: %s (k = %g), weighting: %s", self.config.clip, self.config.clip_k,
            self.config.weighting)
        log(INFO, "\t├──> partitions: %s", "bound to node-keys" if self.nodes.keys is not None else
            f"first claim; handed over after {self.nodes.handover_after} missed rounds")
        log(INFO, "\t└──> out: %s", self.config.out)

    # --- Flower's Strategy ----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample this round's partitions and prepare its ``Exchange``; returns the messages for the partitions
        whose node is known now (``train_round`` lets the exchange send them, and more as nodes appear)."""
        sampled = sample_clients(self.config, server_round)

        def message(node: Node, full: bool = False) -> Message:
            seed = client_seed(self.config, server_round, node.partition)
            sent = train_message(node, config, arrays, self.backbone_log, seed, server_round, full,
                                 own=self.state.clients.get(client_id(node.partition)), local=self.method.local,
                                 control=self.state.control if self.config.scaffold else None)
            start_state = {slot: self.state.method[slot] for slot in self.method.start_state
                           if slot in self.state.method}
            if start_state and self.ranks[node.partition] > self.config.lora_r:  # FlexLoRA's components beyond r
                sent.content["method-state"] = wire.own_to_record(start_state)
            return sent

        trained = self.method.trainable(server_round)
        exchange = Exchange(grid, self.nodes, sampled, message, round_timeout=self.round_timeout,
                            node_deadline=time.monotonic() + self.node_timeout,
                            server_version=self.backbone_log.version,
                            reply_cap=lambda p: reply_cap(self.global_lora, trained, self.ranks[p]))
        self._round = {"sampled": sampled, "exchange": exchange, "lr": float(config["lr"]), "accepted": [],
                       "rejected": {}, "capped": {}}
        return [message(node) for p in sampled if (node := self.nodes.holder(p)) is not None]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: the given replies (taken as final) aggregated into the new global adapter (applied to the
        server's model and state). ``start`` runs the same steps in the shared loop (``driver.run_round``)."""
        trained = self.collect(server_round, self._round["exchange"].settle(list(replies)))
        updates, _ = robust.bound_updates(self.method, self.state.lora, self.state.clients, trained.updates,
                                          scaling=self.setup.scaling, t=server_round, clip=self.config.clip,
                                          k=self.config.clip_k, method_state=self.state.method)
        result = self.method.aggregate(self.state.lora, updates, scaling=self.setup.scaling, t=server_round,
                                       state=self.state.method)
        self.state = driver.advance(self.setup, self.state, result, trained.updates, server_round)
        return wire.lora_to_record(result.lora), _metric_record(result.stats)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server evaluates its own model on its own data."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def start(self, grid: Grid, *, resume: bool = False) -> Result:  # type: ignore[override]
        """Run (or, with ``resume``, continue from the checkpoint in ``config.out``) all rounds.

        ``resume`` without a checkpoint (the run stopped before its first round ended) starts from round 1; a new
        run refuses a folder that holds another run unless ``overwrite``. A failure is written to ``summary.json``
        (``"status": "failed"``, the reason) and raised again, unless the folder holds another run
        (``failure_allowed``).
        """
        log(INFO, "Starting %s:", type(self).__name__)
        self.summary()
        self.grid = grid
        out = Path(self.config.out)
        if not (out / driver.CHECKPOINT).is_file() and _failed_summary(out) and (resume or _only_summary(out)):
            # the note of a run that failed before its first checkpoint: nothing to keep, the run starts over
            (out / "summary.json").unlink()
        began = time.time()
        try:
            if self.setup is None:
                self.setup = prepare(self.config, held_out=server_held_out(self.config, self.eval_data))
            driver.run(self.setup, self, resume=resume, overwrite=self.overwrite)
        except BaseException as error:
            if failure_allowed(out, began):
                write_failure(out, self, error)
            else:  # the folder was refused (another run's, nothing to resume): leave it as it is
                log(ERROR, "the run did not start: %s; %s is left as it was", shown(str(error) or
                                                                                  type(error).__name__, 2000), out)
            raise
        result = Result(arrays=wire.lora_to_record(get_lora(self.setup.model)))  # the final adapter
        for row in read_metrics(self.config.out):
            if "eval_loss" in row:
                result.evaluate_metrics_serverapp[row["round"]] = _metric_record(row)
            if row["round"] > 0:
                result.train_metrics_clientapp[row["round"]] = _metric_record(row)
        return result

    # --- the round, as the driver's engine ------------------------------------------------------------

    def train_settings(self, t: int, trainable: dict[str, bool], lr: float) -> ConfigRecord:
        """What every node gets in round ``t``, besides its own seed and backbone range."""
        return ConfigRecord({
            "run-config": wire.config_json(self.config),
            "fingerprint": self.fingerprint,
            "round": t,
            "lr": lr,
            "train-A": bool(trainable["A"]),
            "train-B": bool(trainable["B"]),
            "digest-A": wire.factor_digest(self.global_lora, "A"),
            "digest-B": wire.factor_digest(self.global_lora, "B"),
        })

    def train_round(self, t: int, state: ServerState, trainable: dict[str, bool], lr: float,
                    fold: Callable[[ClientUpdate], None] | None = None) -> driver.ClientRound:
        """Configure, exchange (hellos, resends, nodes coming and going) and collect the accepted updates. With
        ``fold`` (a round that streams, ``driver.streams``), each reply is parsed, checked and folded into the
        aggregate as soon as it is pulled, and dropped: only its client, example count and loss are kept."""
        self.state = state
        self.configure_train(t, wire.lora_to_record(state.lora), self.train_settings(t, trainable, lr), self.grid)
        exchange = self._round["exchange"]
        if fold is not None:
            self._round["fold"] = fold
            exchange.on_reply = lambda partition, reply: self._take(t, partition, reply, trainable)
        log(INFO, "round %d: training %s", t, ", ".join(client_id(p) for p in exchange.partitions))
        return self.collect(t, exchange.run())

    def _take(self, server_round: int, partition: int, reply: Message, trainable: dict[str, bool]) -> None:
        """One reply as it arrives (a round that streams): accepted and folded, or rejected."""
        taken = self._accept(server_round, partition, reply, trainable)
        if taken is not None:
            self._round["accepted"].append((partition, *taken))

    def _accept(self, server_round: int, partition: int, reply: Message,
                trainable: dict[str, bool]) -> tuple[ClientUpdate, float] | None:
        """One final reply as an accepted update and its loss (folded into the round's aggregate when it
        streams), or None: rejected, with the reason logged and recorded."""
        cid = client_id(partition)
        try:  # any fault in one reply rejects that reply, never the round
            update, loss, digest = self._parse(server_round, partition, reply, trainable)
            declared = self.nodes.declared.get(reply.metadata.src_node_id)
            if declared is not None and update.num_examples > declared:
                self._round["capped"][cid] = [update.num_examples, declared]
                log(WARNING, "round %d: %s claims %d examples, its hello said %d: counted as %d", server_round,
                    cid, update.num_examples, declared, declared)
                update.num_examples = declared
            update.keep = self.kept(update, server_round, trainable)  # the server's copy of what the client keeps
            fold = self._round.get("fold")
            if fold is not None:
                fold(update)
                update = driver.folded(update)
        except Exception as error:
            self._round["rejected"][cid] = shown(str(error) or type(error).__name__, REASON_CHARS)
            log(WARNING, "round %d: rejected the update of %s: %s", server_round, cid, self._round["rejected"][cid])
            return None
        node = self.nodes.holder(partition)
        if node is not None:
            node.version, node.needs_own = self.backbone_log.version, False
        self.replays.add(cid, digest, server_round)
        return update, loss

    def collect(self, server_round: int, replies: dict[int, Message | None]) -> driver.ClientRound:
        """The usable updates of the round (``{partition: final reply}`` in; None for a reply already taken as it
        arrived), sorted by client; failures and rejections are logged and recorded."""
        trainable = self.method.trainable(server_round)
        exchange: Exchange = self._round["exchange"]
        failed = {client_id(p): reason for p, reason in sorted(exchange.failed.items())}
        accepted: list[tuple[int, ClientUpdate, float]] = list(self._round["accepted"])
        for partition, reply in sorted(replies.items()):
            if reply is not None:
                taken = self._accept(server_round, partition, reply, trainable)
                if taken is not None:
                    accepted.append((partition, *taken))
        accepted.sort(key=lambda item: item[0])
        rejected = dict(sorted({**{client_id(p): reason for p, reason in exchange.rejected.items()},
                                **self._round["rejected"]}.items()))
        capped = self._round["capped"]
        self.nodes.end_round(exchange.sent_to, [p for p, _, _ in accepted])
        if len(accepted) < self.min_clients:
            raise RoundFailed(f"round {server_round}: {len(accepted)} usable update(s), fewer than min-clients="
                              f"{self.min_clients} (failed: {failed}, rejected: {rejected})")
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
            "nodes": self.nodes.take_events(),
            "examples_capped": capped,
        }
        return driver.ClientRound([u for _, u, _ in accepted], [loss for _, _, loss in accepted], measured)

    def kept(self, update: ClientUpdate, server_round: int, trainable: dict[str, bool]) -> dict:
        """What the client keeps after this update, as its node computed it (``client.kept``): the method's local
        factors and, with SCAFFOLD, its variate, derived here from the factors it sent (no variate travels up)."""
        own = self.state.clients.get(update.client_id)
        start = self.method.client_start(self.global_lora, own=corrections.method_part(own), t=server_round)
        return kept(self.method, update, start, own, self.state.control, trainable, self.config.train_config(),
                    self._round["lr"])

    def _parse(self, t: int, partition: int, reply: Message,
               trainable: dict[str, bool]) -> tuple[ClientUpdate, float, str]:
        """One train reply as an update, checked (``replies.parse_train_reply``, the method's own checks, not a
        replay of the client's earlier factors), its loss and the digest of its factors."""
        cid, rank = client_id(partition), self.ranks[partition]
        start = robust.client_start(self.method, self.global_lora, rank=rank, client_scaling=self.client_scaling(rank),
                                    scaling=self.setup.scaling, t=t, own=self.state.clients.get(cid),
                                    method_state=self.state.method)
        update, loss = parse_train_reply(reply, cid, partition, self.global_lora, trainable, self.backbone_log.version,
                                         self.limits, rank=rank, scaling=self.client_scaling(rank), start=start)
        self.method.validate(self.global_lora, [update], self.setup.scaling)
        digest = factors_digest(update.factors, trainable)
        earlier = self.replays.earlier(cid, digest)
        if earlier is not None:
            raise ValueError(f"client {cid!r}: its factors are those of its reply accepted in round {earlier} "
                             "(a replay)")
        return update, loss, digest

    def client_scaling(self, rank: int) -> float:
        """The LoRA scaling of a client of ``rank``, as PEFT sets it (``α/r``, or ``α/√r`` with rsLoRA)."""
        if rank == self.config.lora_r:
            return self.setup.scaling
        return self.config.lora_alpha / (math.sqrt(rank) if self.config.rslora else rank)

    def restore(self, out: Path, done: int) -> None:
        self.backbone_log = BackboneLog.load(out / BACKBONE_LOG, done)
        self.replays = Replays.load(out / REPLAYS, done)
        log(INFO, "resuming after round %d", done)

    def after_start(self, result: Aggregate) -> None:
        """The method's start becomes the log's first entry: every node applies it before it trains."""
        self.backbone_log.begin(result.backbone)

    def after_round(self, t: int, previous: dict[str, LoraPair], result: Aggregate, record: dict, out: Path) -> None:
        """Log the round's delta (saved before the checkpoint: the log may run ahead of it, never behind)."""
        self.backbone_log.append(result.backbone, previous, result.lora)
        self.backbone_log.save(out / BACKBONE_LOG)
        self.replays.save(out / REPLAYS)
        record["method_uplink_bytes"] = result.stats["uplink_bytes"]
        record["method_downlink_bytes"] = result.stats["downlink_bytes"]
        for what in ("failed", "rejected", "nodes", "clipped", "examples_capped"):
            if record.get(what):
                log(WARNING, "round %d %s: %s", t, what, record[what])

    def finish(self, summary: dict, rows: list[dict]) -> None:
        trained = [row for row in rows if row["round"] > 0]
        summary["uplink_bytes"] = sum(row.get("uplink_bytes_total", 0) for row in trained)  # measured, all replies
        summary["downlink_bytes"] = sum(row.get("downlink_bytes_total", 0) for row in trained)
        summary["engine"] = "flower"
        summary["status"] = "completed"
        summary.update(finite(summary))  # strict JSON: a loss that overflowed is null

    def log(self, line: str) -> None:
        log(INFO, "%s", line)


def failure_allowed(out: Path, began: float) -> bool:
    """Whether a run that failed may write its ``summary.json`` into ``out``: it took the folder itself (the
    driver wrote ``config.json`` after ``began``), or the folder holds no other run (missing, empty, or only the
    note of an earlier failure)."""
    config = out / rundir.CONFIG
    if config.is_file() and config.stat().st_mtime >= began:
        return True
    if not out.exists():
        return True
    return out.is_dir() and (not any(out.iterdir()) or (_only_summary(out) and _failed_summary(out)))


def write_failure(out: Path, strategy: LoraStrategy | None, error: BaseException) -> None:
    """``summary.json`` saying the run failed, why, and after how many rounds (the checkpoint holds those)."""
    reason = shown(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__, 4000)
    log(ERROR, "the run failed: %s", reason)
    log(ERROR, "%s", "".join(traceback.format_exception(error)).rstrip())
    summary = {"status": "failed", "reason": reason, "engine": "flower"}
    if strategy is not None:
        summary.update(method=strategy.config.method, rounds=strategy.config.rounds,
                       rounds_completed=strategy.rounds_done, out=str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as write_error:
        log(ERROR, "could not write %s: %s", out / "summary.json", write_error)


def _only_summary(out: Path) -> bool:
    return out.is_dir() and [entry.name for entry in out.iterdir()] == ["summary.json"]


def _failed_summary(out: Path) -> bool:
    try:
        return json.loads((out / "summary.json").read_text()).get("status") == "failed"
    except (OSError, ValueError, AttributeError):
        return False


def _metric_record(record: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in record.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)})


__all__ = ["BACKBONE_LOG", "LoraStrategy", "RoundFailed", "failure_allowed", "write_failure"]
