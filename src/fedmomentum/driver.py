"""The one run loop every engine shares: resume, rounds, evaluation, records, checkpoint, summary and exports.

An engine trains the sampled clients of a round (in this process, or over Flower) and returns their updates; the
driver aggregates them with the method, updates the server's model, evaluates on schedule, appends a line to
``metrics.jsonl`` and ``aggregation.jsonl``, writes the checkpoint, and after the last round writes the summary,
the curves and the exports. A change to any of these is made here, once, for every engine.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from . import checkpoint, report, rundir
from .backbone_change import BackboneChange, whole_change
from .build import Setup
from .config import MAY_CHANGE_ON_RESUME, differences
from .evaluate import evaluate
from .models import default_model_dir
from .peft_io import (
    ADAPTER,
    BackboneWeights,
    apply_backbone,
    export_adapter,
    export_merged,
    get_backbone,
    get_lora,
    save_adapter,
    set_backbone,
    set_lora,
)
from .records import Records
from .schedule import round_lr
from .types import Aggregate, ClientUpdate, LoraPair, LowRank, Tensor

CHECKPOINT = "checkpoint.safetensors"
FOR_ORIGINAL_BASE = "adapter_for_original_base"


@dataclass
class ClientRound:
    """What an engine returns for one round: the usable updates (sorted by client) and what it measured."""

    updates: list[ClientUpdate]
    losses: list[float]  # each update's mean training loss
    record: dict = field(default_factory=dict)  # extra fields for the round's metrics.jsonl line


class Engine:
    """Trains the sampled clients of a round. The hooks let an engine keep files of its own beside the checkpoint."""

    name = "simulation"
    progress_bar = True  # a tqdm bar over rounds (else only the per-round lines)
    # what the engine can do beyond plain rounds (``check_engine``): "start" (pass a method's change before round 0,
    # ``Method.start``, on to the clients), "client_state" (clients keep factors between rounds, ``Method.local``),
    # "client_ranks" (clients of other LoRA ranks)
    features: frozenset[str] = frozenset()

    def train_round(self, round: int, global_lora: dict[str, LoraPair], trainable: dict[str, bool],
                    lr: float) -> ClientRound:
        raise NotImplementedError

    def restore(self, out: Path, done: int) -> None:
        """Resuming after round ``done``: reload what the engine saved in ``out``."""

    def after_start(self, result: Aggregate) -> None:
        """The method's start (``Method.start``: a new adapter and backbone deltas) is applied to the server's model,
        before round 0."""

    def client_state(self) -> dict[str, dict[str, dict[str, Tensor]]]:
        """What the clients keep between rounds (client id → factor → layer → tensor), for the checkpoint: an engine
        with the "client_state" feature holds it in ``self.kept``."""
        return getattr(self, "kept", {})

    def load_client_state(self, state: dict[str, dict[str, dict[str, Tensor]]]) -> None:
        """Resuming: what ``client_state`` returned when the checkpoint was written."""
        self.kept = {client: {factor: dict(layers) for factor, layers in factors.items()}
                     for client, factors in state.items()}

    def after_round(self, round: int, previous: dict[str, LoraPair], result: Aggregate, record: dict,
                    out: Path) -> None:
        """The round's aggregate is applied to the server's model; called before the round is recorded and
        checkpointed (an engine may add to ``record``)."""

    def finish(self, summary: dict, rows: list[dict]) -> None:
        """Adjust the run's summary before it is written."""

    def log(self, line: str) -> None:
        tqdm.write(line)


def comparable(config) -> dict:
    """The config fields that must match to resume (what ``config.MAY_CHANGE_ON_RESUME`` lists may change)."""
    return {k: v for k, v in config.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}


def check_engine(setup: Setup, engine: Engine) -> None:
    """A one-line error when the run needs something of the engine that it cannot do (see ``Engine.features``)."""
    config, method = setup.config, setup.method
    needs = {
        "start": (method.uses_backbone, f"{config.method} changes the backbone before round 0"),
        "client_state": (bool(method.local), f"{config.method}'s clients keep their own "
                                             f"{', '.join(method.local)} between rounds"),
        "client_ranks": (config.client_ranks not in (None, []), "client_ranks gives clients their own LoRA ranks"),
    }
    for feature, (needed, why) in needs.items():
        if needed and feature not in engine.features:
            raise ValueError(f"the {engine.name} engine cannot run this yet: {why}")


def start_method(setup: Setup, engine: Engine) -> dict[str, LowRank]:
    """Before round 0: a method that initialises from the backbone (FRLoRA) changes the adapter and backbone;
    returns the backbone deltas it applied."""
    if not setup.method.uses_backbone:
        return {}
    result = setup.method.start(get_lora(setup.model), BackboneWeights(setup.model), scaling=setup.scaling)
    if result is None:
        return {}
    apply_backbone(setup.model, result.backbone)
    set_lora(setup.model, result.lora)
    engine.after_start(result)
    return result.backbone


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def restore(setup: Setup, out: Path, engine: Engine | None = None) -> tuple[int, float, dict[str, LowRank] | None]:
    """Load the checkpoint in ``out`` into the server's model and method (and the clients' state into ``engine``);
    returns the rounds it holds, the seconds the run has taken so far, and the backbone's whole change (None when the
    checkpoint did not track it)."""
    state = checkpoint.load(out / CHECKPOINT)
    saved = state.info.get("config")
    changed = differences(saved, comparable(setup.config)) if isinstance(saved, dict) else ["its config is missing"]
    if changed:
        raise ValueError(f"{out / CHECKPOINT} was written by a different config: {', '.join(changed)}; "
                         "resume with the run's own config")
    if state.round > setup.config.rounds:
        raise ValueError(f"the run in {out} has done {state.round} rounds already; --rounds must be at least "
                         f"{state.round}")
    set_backbone(setup.model, state.backbone)
    set_lora(setup.model, state.lora)
    setup.method.held = state.held
    if engine is not None:
        engine.load_client_state(state.clients)
    seconds = state.info.get("seconds", 0.0)
    return state.round, float(seconds) if isinstance(seconds, int | float) else 0.0, state.change


def aggregate(setup: Setup, global_lora: dict[str, LoraPair], updates: list[ClientUpdate],
              round: int) -> tuple[Aggregate, float]:
    """Aggregate ``updates`` with the method and apply the result to the server's model; also the seconds it took."""
    started = time.perf_counter()
    result = setup.method.aggregate(global_lora, updates, scaling=setup.scaling, round=round)
    seconds = time.perf_counter() - started
    apply_backbone(setup.model, result.backbone)
    set_lora(setup.model, result.lora)
    return result, seconds


def run_round(setup: Setup, engine: Engine, global_lora: dict[str, LoraPair], round: int) -> tuple[Aggregate, dict]:
    """Train the round's clients through ``engine``, aggregate, update the server's model; returns the record."""
    config, started = setup.config, time.perf_counter()
    lr = round_lr(config.lr, config.lr_schedule, round, config.rounds)
    trained = engine.train_round(round, global_lora, setup.method.trainable(round), lr)
    result, seconds = aggregate(setup, global_lora, trained.updates, round)
    stats = {k: v for k, v in result.stats.items() if k not in ("layers", "round", "method")}
    record = {
        "round": round + 1,
        "method": config.method,
        "client_ids": [u.client_id for u in trained.updates],
        "lr": lr,
        "train_loss": sum(trained.losses) / len(trained.losses),
        **stats,
        "aggregation_seconds": seconds,
        **trained.record,
    }
    record["round_seconds"] = time.perf_counter() - started
    return result, record


def run(setup: Setup, engine: Engine, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Run every round in ``config.out``, or, with ``resume``, continue the run there from its checkpoint (a run
    that stopped before its first checkpoint starts over). A new run refuses a folder that holds files unless
    ``overwrite`` (then the old run is deleted first). Returns the summary."""
    config = setup.config
    out = Path(config.out)
    started = time.perf_counter()
    check_engine(setup, engine)
    if resume and not (out / CHECKPOINT).is_file():
        if not rundir.started_only(out):
            raise FileNotFoundError(f"nothing to resume in {out}: no {CHECKPOINT}")
        resume, overwrite = False, True  # it stopped before its first round ended: start it over
    if resume:
        done, spent, saved = restore(setup, out, engine)
        engine.restore(out, done)
    else:
        done, spent, saved = 0, 0.0, {}
        rundir.start(out, overwrite)
    change = None if saved is None else BackboneChange(saved)  # the backbone's whole change, for the export
    if not resume:
        change.add(start_method(setup, engine))
    rundir.write_text(out / rundir.CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
    records = Records(out, keep_rounds=done if resume else None, report_to=config.report_to)
    log = (lambda _: None) if quiet else engine.log
    if not resume:
        records.append({"round": 0, "method": config.method, **evaluate(setup, accuracy=config.accuracy_every > 0)})
    log(f"{config.method}: {config.rounds} rounds, {config.clients_per_round}/{config.clients} clients a round, "
        f"out={out}" + (f", resuming after round {done}" if resume else ""))
    global_lora = get_lora(setup.model)
    rounds = range(done, config.rounds)
    if engine.progress_bar and not quiet:
        rounds = tqdm(rounds, desc=config.method, unit="round", initial=done, total=config.rounds)
    for round in rounds:
        previous = global_lora
        round_started = time.perf_counter()
        result, record = run_round(setup, engine, global_lora, round)
        global_lora = result.lora
        if change is not None:
            change.add(result.backbone)
        last = round + 1 == config.rounds
        if (round + 1) % config.eval_every == 0 or last:
            due = config.accuracy_every and (round + 1) % config.accuracy_every == 0
            eval_started = time.perf_counter()
            record.update(evaluate(setup, accuracy=bool(due) or last))
            record["eval_seconds"] = time.perf_counter() - eval_started
        record["round_seconds"] = time.perf_counter() - round_started  # training, aggregation and evaluation
        engine.after_round(round, previous, result, record, out)
        records.append(record, result.stats["layers"])
        checkpoint.save(out / CHECKPOINT, checkpoint.Checkpoint(
            round + 1, global_lora, get_backbone(setup.model), result.held,
            {"config": comparable(config), "seconds": spent + time.perf_counter() - started},
            engine.client_state(), None if change is None else change.deltas))
        log(report.round_line(record))
    records.close()
    seconds = spent + time.perf_counter() - started  # the whole run, across resumes
    summary = report.summarize(records.rows, config, seconds=seconds, peak_rss_mb=peak_rss_mb())
    engine.finish(summary, records.rows)
    rundir.write_file(out / "curves.png", lambda path: report.plot_curves(records.rows, path, title=config.method))
    backbone_changed = any(row.get("residual_rank") for row in records.rows)
    exported = export(setup, out, backbone_changed, None if change is None else change.deltas)
    if exported:
        summary[FOR_ORIGINAL_BASE] = exported
        log(f"{FOR_ORIGINAL_BASE}/: rank ≤ {exported['rank']} over {exported['layers']} layers, "
            f"energy dropped {exported['energy_dropped']:.3g}")
    elif backbone_changed:
        log(f"no {FOR_ORIGINAL_BASE}/: the checkpoint this run resumed from did not track the backbone's change")
    rundir.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def original_base(config) -> str:
    """Where the run's original base model is (what ``adapter_for_original_base/`` belongs to)."""
    if config.model is None:
        return str(default_model_dir())
    return config.model if config.model == "tiny" else str(Path(config.model).expanduser().resolve())


EXPORTS = ("adapter", "base", "merged", FOR_ORIGINAL_BASE)


def export(setup: Setup, out: Path, backbone_changed: bool, change: dict[str, LowRank] | None = None) -> dict | None:
    """``adapter/`` (and ``base/`` when the backbone changed: the adapter belongs to it), ``merged/`` on request;
    built aside and swapped in together, so the folder never holds exports of two different states.

    When the backbone changed and its whole change is known, also ``adapter_for_original_base/``: one LoRA adapter
    holding every backbone delta plus the final ``s·B·A``, for the original base model; returns its ranks and the
    energy ``export_rank`` dropped (``None`` when not written)."""
    factors, layers = {}, {}
    if backbone_changed and change is not None:
        factors, layers = whole_change(change, get_lora(setup.model), setup.scaling,
                                       setup.config.export_rank or None)

    def build(staging: Path) -> None:
        if backbone_changed:
            with rundir.writing(out / "base"):
                export_merged(setup.model, staging / "base", setup.tokenizer, merge=False)
        with rundir.writing(out / "adapter"):
            export_adapter(setup.model, staging / "adapter", base=staging / "base" if backbone_changed else None)
            if backbone_changed:  # the adapter belongs to base/ where it will be, not where it is built
                settings = staging / "adapter" / "adapter_config.json"
                values = json.loads(settings.read_text())
                settings.write_text(json.dumps({**values, "base_model_name_or_path": str((out / "base").resolve())},
                                               indent=2) + "\n")
        if setup.config.export_merged:
            with rundir.writing(out / "merged"):
                export_merged(setup.model, staging / "merged", setup.tokenizer)
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
