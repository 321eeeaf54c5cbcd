"""The one run loop every engine shares: resume, rounds, evaluation, records, checkpoint, summary and exports.

The driver holds the server's state (``state.ServerState``). Each round, an engine (in this process, or over
Flower) trains the sampled clients from it and returns their updates; the driver aggregates them with the method,
applies the result to the server's model, evaluates on schedule, appends a line to ``metrics.jsonl`` and
``aggregation.jsonl``, and writes the state as the checkpoint. After the last round it writes the summary, the
curves and the exports. A change to any of these is made here, once, for every engine.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from . import checkpoint, corrections, plots, report, robust, rundir, stragglers
from .backbone_change import BackboneChange, whole_change
from .build import Setup
from .config import MAY_CHANGE_ON_RESUME, RunConfig, differences
from .evaluate import evaluate
from .models import DEFAULT_MODEL_ID, resolve_dtype
from .momentum import measure
from .peft_io import (
    ADAPTER,
    BackboneWeights,
    apply_backbone,
    attach_change,
    backbone_of,
    export_adapter,
    export_merged,
    get_lora,
    save_adapter,
    set_backbone,
    set_lora,
)
from .records import Records
from .schedule import round_lr
from .state import Pending, ServerState
from .types import Aggregate, ClientUpdate, LoraPair

CHECKPOINT = rundir.CHECKPOINT
FOR_ORIGINAL_BASE = "adapter_for_original_base"


@dataclass
class ClientRound:
    """What an engine returns for one round: the usable updates (sorted by client) and what it measured; with
    stragglers, also the updates that arrive in a later round and how many sampled clients were busy."""

    updates: list[ClientUpdate]
    losses: list[float]  # the mean training loss of each client trained: the updates', then the late ones'
    record: dict = field(default_factory=dict)  # extra fields for the round's metrics.jsonl line
    late: list[ClientUpdate] = field(default_factory=list)  # stragglers' updates, aggregated straggler_delay later
    busy: int = 0  # sampled clients still busy with a late update of an earlier round (not trained)


class Engine:
    """Trains the sampled clients of a round; ``run`` does everything else. One method to implement:

    - ``train_round(t, state, trainable, lr)``: train round ``t``'s sampled clients, each from the global adapter
      ``state.lora`` (and what it keeps, ``state.clients``), and return their updates; an engine with the feature
      "stream" also takes ``fold=``: in a round that streams (``streams``), it calls ``fold(update)`` on each
      accepted update as soon as it has it, and returns the updates without their factors (``folded``);

    and hooks for an engine that keeps files or talks to remote clients (the Flower engine):

    - ``restore(out, done)``: resuming after round ``done``: reload the engine's own files;
    - ``after_start(result)``: a method's start (``Method.start``) was applied to the server's model, before round 1;
    - ``after_round(t, previous, result, record, out)``: round ``t``'s aggregate was applied; called before the round
      is recorded and checkpointed (the engine may add to ``record``);
    - ``finish(summary, rows)``: adjust the run's summary before it is written;
    - ``log(line)``: where progress lines go.
    """

    name = "simulation"
    progress_bar = True  # a tqdm bar over rounds (else only the per-round lines)
    # what the engine can do beyond plain rounds (``check_engine``): "start" (pass a method's change before round 1,
    # ``Method.start``, on to the clients), "client_state" (clients keep factors between rounds, ``Method.local``),
    # "client_ranks" (clients of other LoRA ranks), "stream" (fold each update as it arrives, see ``train_round``),
    # "stragglers" (``straggler_rate``: return stragglers' updates in ``ClientRound.late``, skip busy clients)
    features: frozenset[str] = frozenset()

    def train_round(self, t: int, state: ServerState, trainable: dict[str, bool], lr: float) -> ClientRound:
        raise NotImplementedError

    def restore(self, out: Path, done: int) -> None:
        pass

    def after_start(self, result: Aggregate) -> None:
        pass

    def after_round(self, t: int, previous: dict[str, LoraPair], result: Aggregate, record: dict, out: Path) -> None:
        pass

    def finish(self, summary: dict, rows: list[dict]) -> None:
        pass

    def log(self, line: str) -> None:
        tqdm.write(line)


def run(setup: Setup, engine: Engine, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run every round in ``config.out``, or, with ``resume``, continue the run there from its checkpoint (a run
    that stopped before its first checkpoint starts over). A new run refuses a folder that holds files unless
    ``overwrite`` (then the old run is deleted first). Returns the summary."""
    config, out, started = setup.config, Path(setup.config.out), time.perf_counter()
    log = (lambda _: None) if quiet else engine.log
    check_engine(setup, engine)
    state, spent, resume = open_run(setup, engine, out, resume, overwrite)
    records = Records(out, keep_rounds=state.rounds_done if resume else None, report_to=config.report_to)
    if not resume:
        records.append({"round": 0, "method": config.method,
                        **evaluate(setup, accuracy=config.accuracy_every > 0, state=state)})
        if "eval_loss" in records.rows[0]:
            log(f"round   0 | eval_loss {records.rows[0]['eval_loss']:.4f} (before training)")
    log(f"{config.method}: {config.rounds} rounds, {config.clients_per_round}/{config.clients} clients a round, "
        f"out={out}" + (f", resuming after round {state.rounds_done}" if resume else ""))
    rounds = range(state.rounds_done + 1, config.rounds + 1)
    if engine.progress_bar and not quiet:
        rounds = tqdm(rounds, desc=config.method, unit="round", initial=state.rounds_done, total=config.rounds)
    for t in rounds:
        previous = state.lora
        state, result, record = run_round(setup, engine, state, t)
        engine.after_round(t, previous, result, record, out)
        records.append(record, result.stats["layers"])
        checkpoint.save(out / CHECKPOINT, state, {"config": comparable(config),
                                                  "seconds": spent + time.perf_counter() - started})
        log(report.round_line(record))
    records.close()
    return finish(setup, engine, state, records.rows, spent + time.perf_counter() - started, log)


def open_run(setup: Setup, engine: Engine, out: Path, resume: bool, overwrite: bool) -> tuple[ServerState, float,
                                                                                                   bool]:
    """The state the run continues from, the seconds it has taken so far, and whether it resumes (a run that
    stopped before its first checkpoint starts over); a new run takes its folder and applies the method's start."""
    if resume and not (out / CHECKPOINT).is_file():
        if not rundir.started_only(out):
            raise FileNotFoundError(f"nothing to resume in {out}: no {CHECKPOINT}")
        resume, overwrite = False, True  # it stopped before its first round ended: start it over
    if resume:
        state, spent = restore(setup, out)
        engine.restore(out, state.rounds_done)
    else:
        rundir.start(out, overwrite)
        state, spent = start(setup, engine), 0.0
    rundir.write_text(out / rundir.CONFIG, json.dumps(setup.config.to_dict(), indent=2) + "\n")
    return state, spent, resume


STREAM_FROM = 64  # with stream = auto, a round of at least this many clients streams, when it can


def why_not_streamed(setup: Setup) -> str | None:
    """What needs every update of a round at once, so that no round of this run can stream (None: nothing)."""
    config, method = setup.config, setup.method
    if config.clip != "none":
        return "median clipping (clip = median) needs the round's median update norm first"
    if config.scaffold:
        return "SCAFFOLD keeps a control variate per client"
    if method.local:
        return f"{config.method}'s clients keep their own {', '.join(method.local)}"
    if method.start_state and config.client_ranks not in (None, []):
        return f"{config.method}'s clients above the global rank start from the aggregate's next components"
    return None


def streams(setup: Setup, t: int) -> bool:
    """Whether round ``t`` folds each update into the aggregate as it arrives (``Method.open_round``), so the
    server's memory does not grow with the number of clients: ``stream = always``, or ``auto`` from ``STREAM_FROM``
    clients a round; never when something needs every update at once (``why_not_streamed``) or the method cannot
    stream this round (``Method.stream_sums``: FRLoRA, the ``randomized`` SVD route)."""
    config = setup.config
    if config.stream == "never" or (config.stream == "auto" and config.clients_per_round < STREAM_FROM):
        return False
    return why_not_streamed(setup) is None and setup.method.stream_sums(t) is not None


def run_round(setup: Setup, engine: Engine, state: ServerState, t: int) -> tuple[ServerState, Aggregate, dict]:
    """Round ``t``: train its clients through ``engine``, bound each update's influence (``robust``: norms recorded,
    clipped with ``clip``), aggregate, apply the result to the server's model and evaluate when due; returns the
    next state, the aggregate and the round's record. A round that ``streams`` folds each update into the
    aggregate as the engine hands it over (an engine with the ``stream`` feature, as each client finishes; any
    other, after the round) and drops it; it records no ``noise_share`` (that needs every update at once).

    With stragglers (``straggler_rate``), the late updates due in round ``t`` (``ServerState.pending``) are bounded
    against where they started, re-based onto the current global adapter (``stragglers``) and aggregated with the
    fresh ones; the engine's late updates of this round wait in the next state. A round with no update at all
    (every sampled client busy or late, none arriving) keeps the global adapter and the method's state."""
    config, started = setup.config, time.perf_counter()
    lr = round_lr(config.lr, config.lr_schedule, t, config.rounds)
    arriving = [pending for pending in state.pending if pending.arrives == t]
    if streams(setup, t):
        trained, result, bounded, aggregation_seconds = _streamed_round(setup, engine, state, t, lr, arriving)
        clients, weights = [], []
    else:
        trained = engine.train_round(t, state, setup.method.trainable(t), lr)
        aggregating = time.perf_counter()
        updates, bounded = _arrived(setup, state, t, trained.updates, arriving)
        result = (setup.method.aggregate(state.lora, updates, scaling=setup.scaling, t=t, state=state.method)
                  if updates or not config.straggler_rate else None)  # no straggler, no update: the method refuses
        aggregation_seconds = time.perf_counter() - aggregating
        clients, weights = [u.factors for u in updates], setup.method.client_weights(updates) if updates else []
    measured = None
    if result is None:
        result, momentum = unchanged(state, t), state.momentum
    else:
        _late_uplink(setup.method, result.stats, arriving)
        measured, momentum = measure(state.momentum, state.lora, result.lora, result.backbone, setup.scaling,
                                     clients, weights)
        for name, layer in measured.layers.items():
            result.stats["layers"][name].update(layer)
    state = replace(advance(setup, state, result, trained.updates, t), momentum=momentum,
                    pending=waiting(setup, state, trained.late, t))
    record = {
        "round": t,
        "method": config.method,
        "client_ids": [u.client_id for u in trained.updates] + [pending.update.client_id for pending in arriving],
        "lr": lr,
        "train_loss": sum(trained.losses) / len(trained.losses) if trained.losses else None,
        **{k: v for k, v in result.stats.items() if k not in ("layers", "round", "method")},
        "aggregation_seconds": aggregation_seconds,
        **(measured.record() if measured is not None else {}),
        **bounded,
        "fresh_updates": len(trained.updates),
        "stale_updates": len(arriving),
        "busy_clients": trained.busy,
        **trained.record,
    }
    if t % config.eval_every == 0 or t == config.rounds:
        due = config.accuracy_every and t % config.accuracy_every == 0
        eval_started = time.perf_counter()
        record.update(evaluate(setup, accuracy=bool(due) or t == config.rounds, state=state))
        record["eval_seconds"] = time.perf_counter() - eval_started
    record["round_seconds"] = time.perf_counter() - started  # training, aggregation and evaluation
    return state, result, record


def _streamed_round(setup: Setup, engine: Engine, state: ServerState, t: int, lr: float,
                    arriving: list[Pending]) -> tuple[ClientRound, Aggregate | None, dict, float]:
    """A round that streams (see ``run_round``): the engine's round, its aggregate (None when no update came), the
    record of the updates' norms (``robust``, without clipping) and the seconds spent folding and finishing. The
    late updates due in round ``t`` (``arriving``) are folded after the fresh ones, re-based."""
    method = setup.method
    accumulator = method.open_round(state.lora, scaling=setup.scaling, t=t, state=state.method)
    norms: dict[str, float] = {}
    seconds, folded_count = [0.0], [0]
    how = stragglers.rule(method, setup.config.lora_r)

    def fold(update: ClientUpdate, start: dict[str, LoraPair] | None = None) -> None:
        folding = time.perf_counter()
        _, record = robust.bound_updates(method, state.lora, state.clients, [update], scaling=setup.scaling, t=t,
                                         clip="none", method_state=state.method, starts=[start])
        if start is not None:  # a late update: its norm is of its own change, then it is re-based
            update = stragglers.rebase_update(update, start, state.lora, how, setup.scaling)
        accumulator.fold(update)
        norms.update(record["update_norms"])
        folded_count[0] += 1
        seconds[0] += time.perf_counter() - folding

    if "stream" in engine.features:
        trained = engine.train_round(t, state, method.trainable(t), lr, fold=fold)
    else:
        trained = engine.train_round(t, state, method.trainable(t), lr)
        for update in trained.updates:
            fold(update)
    for pending in arriving:
        fold(pending.update, pending.start)
    finishing = time.perf_counter()
    result = accumulator.finish() if folded_count[0] or not setup.config.straggler_rate else None
    bounded = {"update_norms": norms, "clip_threshold": None, "clipped": {}, "streamed": True}
    return trained, result, bounded, seconds[0] + time.perf_counter() - finishing


def _arrived(setup: Setup, state: ServerState, t: int, fresh: list[ClientUpdate],
             arriving: list[Pending]) -> tuple[list[ClientUpdate], dict]:
    """Round ``t``'s updates to aggregate and the record of their norms: the fresh ones, then the late ones due now,
    each bounded (``robust.bound_updates``, clipped with ``clip``) against where it started, so a late update's
    norm is of its own change; the late ones are then re-based onto the current global adapter (``stragglers``)."""
    config, method = setup.config, setup.method
    updates, bounded = robust.bound_updates(method, state.lora, state.clients,
                                            fresh + [pending.update for pending in arriving], scaling=setup.scaling,
                                            t=t, clip=config.clip, k=config.clip_k, method_state=state.method,
                                            starts=[None] * len(fresh) + [pending.start for pending in arriving])
    how = stragglers.rule(method, config.lora_r)
    late = [stragglers.rebase_update(update, pending.start, state.lora, how, setup.scaling)
            for update, pending in zip(updates[len(fresh):], arriving, strict=True)]
    return updates[:len(fresh)] + late, bounded


def _late_uplink(method, stats: dict, arriving: list[Pending]) -> None:
    """A late update's uplink is what the client sent, its own factors in the round it trained, not the re-based
    ones the method counted; the round's mean follows."""
    if not arriving:
        return
    per_client = stats["uplink_bytes_per_client"]
    for pending in arriving:
        per_client[pending.update.client_id] = method.uplink_bytes(pending.update, pending.trained_in)
    stats["uplink_bytes"] = sum(per_client.values()) / len(per_client)


def unchanged(state: ServerState, t: int) -> Aggregate:
    """Round ``t``'s result when no update arrived: the global adapter and the method's state as they were."""
    stats = {"round": t, "clients": 0, "rank_kept": max(pair.rank for pair in state.lora.values()),
             "residual_rank": 0, "energy_dropped": 0.0, "noise_norm": None, "uplink_bytes": 0, "downlink_bytes": 0,
             "uplink_bytes_per_client": {}, "layers": {}}
    return Aggregate(state.lora, {}, stats, state.method)  # type: ignore[arg-type]


def waiting(setup: Setup, state: ServerState, late: list[ClientUpdate], t: int) -> tuple[Pending, ...]:
    """The late updates still to arrive after round ``t``: those of ``state`` not due in ``t``, then round ``t``'s
    stragglers (``late``), each with the adapter it trained from (``state``'s, at the client's rank) and its id
    marked with its round (``client-3@2``), as the same client may also train fresh in the round it arrives."""
    method, config = setup.method, setup.config
    first = next(iter(state.lora))
    new = tuple(Pending(replace(update, client_id=f"{update.client_id}@{t}", keep={}),
                        robust.client_start(method, state.lora, rank=update.factors[first].rank,
                                            client_scaling=update.scaling, scaling=setup.scaling, t=t,
                                            own=state.clients.get(update.client_id), method_state=state.method),
                        trained_in=t, arrives=t + config.straggler_delay)
                for update in late)
    return tuple(pending for pending in state.pending if pending.arrives != t) + new


def folded(update: ClientUpdate) -> ClientUpdate:
    """What an engine that streams keeps of an update once it is folded: everything but the factors."""
    return replace(update, factors={})


def advance(setup: Setup, state: ServerState, result: Aggregate, updates: list[ClientUpdate], t: int) -> ServerState:
    """The state after round ``t``: the aggregate applied to the server's model (backbone in place), the method's
    new state, what the clients keep, SCAFFOLD's server variate."""
    apply_backbone(setup.model, result.backbone, state.backbone)
    set_lora(setup.model, result.lora)
    if state.change is not None:
        state.change.add(result.backbone)
    kept = {u.client_id: u.keep for u in updates if u.keep}
    control = (corrections.server_variate(state.control, state.clients, kept, setup.config.clients)
               if setup.config.scaffold else state.control)
    return replace(state, rounds_done=t, lora=result.lora, method=result.state, clients={**state.clients, **kept},
                   control=control)


def start(setup: Setup, engine: Engine) -> ServerState:
    """The state before round 1; a method that initialises from the backbone (FRLoRA) changes the adapter and the
    backbone first."""
    state = ServerState(0, get_lora(setup.model), backbone=backbone_of(setup.model), change=BackboneChange())
    attach_change(setup.model, state.change)  # a quantized layer computes its change beside its weight
    if not setup.method.uses_backbone:
        return state
    result = setup.method.checked_start(state.lora, BackboneWeights(setup.model), scaling=setup.scaling)
    if result is None:
        return state
    apply_backbone(setup.model, result.backbone, state.backbone)
    set_lora(setup.model, result.lora)
    state.change.add(result.backbone)
    engine.after_start(result)
    return replace(state, lora=result.lora)


def restore(setup: Setup, out: Path) -> tuple[ServerState, float]:
    """The state in the checkpoint in ``out``, loaded into the server's model, and the seconds the run has taken."""
    state, info = checkpoint.load(out / CHECKPOINT)
    saved = info.get("config")
    if isinstance(saved, dict):  # keys added to RunConfig since the checkpoint was written read as their defaults
        saved = {**comparable(RunConfig()), **saved}
    changed = differences(saved, comparable(setup.config)) if isinstance(saved, dict) else ["its config is missing"]
    if changed:
        raise ValueError(f"{out / CHECKPOINT} was written by a different config: {', '.join(changed)}; "
                         "resume with the run's own config")
    if state.rounds_done > setup.config.rounds:
        raise ValueError(f"the run in {out} has done {state.rounds_done} rounds already; --rounds must be at least "
                         f"{state.rounds_done}")
    set_lora(setup.model, state.lora)
    state = replace(state, backbone=set_backbone(setup.model, state.backbone))
    attach_change(setup.model, state.change)
    seconds = info.get("seconds", 0.0)
    return state, float(seconds) if isinstance(seconds, int | float) else 0.0


def finish(setup: Setup, engine: Engine, state: ServerState, rows: list[dict], seconds: float, log) -> dict:
    """After the last round: the summary, the curves and the exports."""
    config, out = setup.config, Path(setup.config.out)
    summary = report.summarize(rows, config, seconds=seconds, peak_rss_mb=peak_rss_mb())
    engine.finish(summary, rows)
    rundir.write_file(out / "curves.png", lambda path: plots.plot_curves(rows, path, title=config.method))
    backbone_changed = any(row.get("residual_rank") for row in rows)
    exported = export(setup, out, state, backbone_changed)
    if exported:
        summary[FOR_ORIGINAL_BASE] = exported
        log(f"{FOR_ORIGINAL_BASE}/: rank ≤ {exported['rank']} over {exported['layers']} layers, "
            f"energy dropped {exported['energy_dropped']:.3g}")
    elif backbone_changed:
        log(f"no {FOR_ORIGINAL_BASE}/: the checkpoint this run resumed from did not track the backbone's change")
    notes = quantized_exports(setup, backbone_changed)
    if notes:
        summary["exports_of_quantized_base"] = notes
    rundir.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def comparable(config) -> dict:
    """The config fields that must match to resume (what ``config.MAY_CHANGE_ON_RESUME`` lists may change)."""
    return {k: v for k, v in config.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}


def check_engine(setup: Setup, engine: Engine) -> None:
    """A one-line error when the run needs something of the engine that it cannot do (see ``Engine.features``)."""
    config, method = setup.config, setup.method
    needs = {
        "start": (method.uses_backbone, f"{config.method} changes the backbone before round 1"),
        "client_state": (bool(method.local) or config.scaffold,
                         f"{config.method}'s clients keep their own {', '.join(method.local)} between rounds"
                         if method.local else "scaffold's clients keep their control variates between rounds"),
        "client_ranks": (config.client_ranks not in (None, []), "client_ranks gives clients their own LoRA ranks"),
        "stragglers": (config.straggler_rate > 0, "straggler_rate > 0 simulates updates that arrive rounds late "
                                                  "(use the in-process simulation)"),
    }
    for feature, (needed, why) in needs.items():
        if needed and feature not in engine.features:
            raise ValueError(f"the {engine.name} engine cannot run this yet: {why}")
    blocked = why_not_streamed(setup) if config.stream == "always" else None
    if blocked:
        raise ValueError(f"stream = always, but no round can stream: {blocked}; use stream = auto or never")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def original_base(config) -> str:
    """The run's original base model as a user elsewhere names it (what ``adapter_for_original_base/`` belongs to):
    the model as the config gives it, or the embedded default's hub id. No path of this machine's cache."""
    return config.model if config.model is not None else DEFAULT_MODEL_ID


EXPORTS = ("adapter", "base", "merged", FOR_ORIGINAL_BASE)


def export(setup: Setup, out: Path, state: ServerState, backbone_changed: bool) -> dict | None:
    """``adapter/`` (and ``base/`` when the backbone changed: the adapter belongs to it), ``merged/`` on request;
    built aside and swapped in together, so the folder never holds exports of two different states.

    When the backbone changed and its whole change is known, also ``adapter_for_original_base/``: one LoRA adapter
    holding every backbone delta plus the final ``s·B·A``, for the original base model; returns its ranks and the
    energy ``export_rank`` dropped (``None`` when not written). On a quantized base, ``base/`` and ``merged/`` are the
    dequantized base plus its change (``peft_io.export_merged``; ``quantized_exports`` says so in the summary)."""
    factors, layers = {}, {}
    if backbone_changed and state.change is not None:
        factors, layers = whole_change(state.change.deltas, state.lora, setup.scaling,
                                       setup.config.export_rank or None)

    def build(staging: Path) -> None:
        if backbone_changed:
            with rundir.writing(out / "base"):
                export_merged(setup.model, staging / "base", setup.tokenizer, merge=False, backbone=state.backbone)
        with rundir.writing(out / "adapter"):
            # an adapter that belongs to base/ names it relative to itself: no path of this machine
            export_adapter(setup.model, staging / "adapter",
                           base="../base" if backbone_changed else original_base(setup.config))
        if setup.config.export_merged:
            with rundir.writing(out / "merged"):
                export_merged(setup.model, staging / "merged", setup.tokenizer, backbone=state.backbone)
        if factors:
            with rundir.writing(out / FOR_ORIGINAL_BASE):
                save_adapter(staging / FOR_ORIGINAL_BASE, factors, setup.model.peft_config[ADAPTER],
                             original_base(setup.config))

    rundir.replace_folders(out, build, EXPORTS)
    if not factors:
        return None
    energy = sum(layer["energy"] for layer in layers.values())
    dropped = sum(layer["energy"] * layer["energy_dropped"] for layer in layers.values())
    return {"rank": max(layer["rank"] for layer in layers.values()), "layers": len(layers),
            "mean_rank": sum(layer["rank"] for layer in layers.values()) / len(layers),
            "energy_dropped": dropped / energy if energy > 0 else 0.0}


def quantized_exports(setup: Setup, backbone_changed: bool) -> dict | None:
    """For the summary of a run on a quantized base: what each export is (none of them is quantized)."""
    config = setup.config
    kind = config.quantization
    if kind == "none":
        return None
    dtype = str(resolve_dtype(config.dtype, config.device)).removeprefix("torch.")
    change = " plus the backbone change" if backbone_changed else ""
    notes = {"quantization": kind,
             "adapter": "for base/" if backbone_changed else f"for the original base (trained on its {kind} "
                                                              "quantization)"}
    if backbone_changed:
        notes["base"] = f"the dequantized {kind} base plus the backbone change, unquantized, in {dtype}"
        notes[FOR_ORIGINAL_BASE] = (f"for the unquantized original base: the run trained on its {kind} quantization, "
                                    "so on the original the model differs by that quantization's error")
    if config.export_merged:
        notes["merged"] = f"the dequantized {kind} base{change} with the adapter merged, unquantized, in {dtype}"
    return notes
