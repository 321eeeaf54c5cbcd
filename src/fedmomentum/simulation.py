"""The in-process federated loop: one shared base model, clients trained one after another.

Each round: sample clients, train each from the global adapter (swapping factors, never copying the model),
aggregate with the method, add its backbone delta to the shared model, evaluate, record, checkpoint.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from . import checkpoint, methods, report
from .client import round_lr, train_client
from .config import RunConfig, save
from .data import Example, by_family, encode, load_gsm8k_test, load_jsonl, make_tasks, partition
from .evaluate import family_accuracy, family_losses
from .models import load_model
from .peft_io import (
    add_lora,
    apply_backbone,
    export_adapter,
    export_merged,
    get_backbone,
    get_lora,
    scaling,
    set_backbone,
    set_lora,
)
from .types import Aggregate

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Setup:
    """Everything a run needs, built once from the config (the Flower apps build the same)."""

    config: RunConfig
    model: PeftModel
    tokenizer: object
    method: methods.Method
    scaling: float
    client_data: list[list[dict]]  # encoded training examples, one list per client
    eval_data: dict[str, list[dict]]  # encoded held-out examples per family
    accuracy_examples: dict[str, list[Example]]


def client_examples(config: RunConfig) -> tuple[list[list[Example]], dict[str, list[Example]]]:
    """The seeded training partition (one list per client) and the held-out examples per family."""
    train, held_out = make_tasks(config.families, config.train_per_family, config.eval_per_family, config.seed)
    for path in config.jsonl:
        train += load_jsonl(path)
    parts = partition(train, config.clients, config.partition, alpha=config.alpha, seed=config.seed)
    return parts, by_family(held_out)


def prepare(config: RunConfig, model=None, tokenizer=None) -> Setup:
    """Load (or take) the model, wrap it with LoRA, build the method and every client's data."""
    config.validate()
    if model is None:
        model, tokenizer = load_model(config.model, device=config.device)
    model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, target_modules=config.target_modules,
                     dropout=config.lora_dropout, rslora=config.rslora, seed=config.seed)
    method = methods.create(config.method, **{"weighting": config.weighting, "seed": config.seed,
                                               **config.method_options})
    parts, held_out = client_examples(config)
    client_data = [[encode(e, tokenizer, config.max_length) for e in part] for part in parts]
    eval_data = {family: [encode(e, tokenizer, config.max_length) for e in items]
                 for family, items in held_out.items()}
    accuracy_examples = {family: items[: config.accuracy_per_family] for family, items in held_out.items()}
    if config.gsm8k_eval:
        accuracy_examples["gsm8k"] = load_gsm8k_test()[: config.gsm8k_eval]
    return Setup(config, model, tokenizer, method, scaling(model), client_data, eval_data, accuracy_examples)


def sample_clients(config: RunConfig, round: int) -> list[int]:
    """The clients of ``round``: a seeded sample of ``clients_per_round``, the same for every method."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + round)
    return sorted(torch.randperm(config.clients, generator=generator)[: config.clients_per_round].tolist())


def client_seed(config: RunConfig, round: int, client: int) -> int:
    return config.seed * 1_000_003 + round * 1_009 + client


def evaluate(setup: Setup, record: dict, accuracy: bool) -> None:
    """Add ``eval_loss``, per-family losses and (when asked) accuracies to a record."""
    losses = family_losses(setup.model, setup.eval_data, pad_id=setup.tokenizer.pad_token_id)
    record["eval_loss"] = sum(losses.values()) / len(losses)
    record.update({f"loss/{family}": value for family, value in losses.items()})
    if accuracy and setup.config.accuracy_per_family:
        scores = family_accuracy(setup.model, setup.tokenizer, setup.accuracy_examples,
                                 max_new_tokens=setup.config.max_new_tokens)
        record["accuracy"] = sum(scores.values()) / len(scores)
        record.update({f"accuracy/{family}": value for family, value in scores.items()})


def run_round(setup: Setup, global_lora: dict, round: int) -> tuple[Aggregate, dict]:
    """Train the sampled clients from ``global_lora``, aggregate, update the shared model; returns the record."""
    config, started = setup.config, time.perf_counter()
    trainable = setup.method.trainable(round)
    lr = round_lr(config.lr, config.lr_schedule, round, config.rounds)
    updates, losses = [], []
    for client in sample_clients(config, round):
        update, loss = train_client(setup.model, setup.client_data[client], global_lora, trainable,
                                    config.train_config(), lr=lr, seed=client_seed(config, round, client),
                                    client_id=f"client-{client}", pad_id=setup.tokenizer.pad_token_id)
        updates.append(update)
        losses.append(loss)
    aggregation_started = time.perf_counter()
    result = setup.method.aggregate(global_lora, updates, scaling=setup.scaling, round=round)
    aggregation_seconds = time.perf_counter() - aggregation_started
    apply_backbone(setup.model, result.backbone)
    set_lora(setup.model, result.lora)
    stats = {k: v for k, v in result.stats.items() if k not in ("layers", "round", "method")}
    record = {
        "round": round + 1,
        "method": config.method,
        "client_ids": [u.client_id for u in updates],
        "lr": lr,
        "train_loss": sum(losses) / len(losses),
        **stats,
        "aggregation_seconds": aggregation_seconds,
        "round_seconds": time.perf_counter() - started,
    }
    return result, record


class Records:
    """``metrics.jsonl`` (a line per round) and ``aggregation.jsonl`` (per-layer stats) in the output folder."""

    def __init__(self, out: Path, keep_rounds: int | None = None):
        self.metrics, self.layers = out / "metrics.jsonl", out / "aggregation.jsonl"
        self.rows: list[dict] = []
        if keep_rounds is None:
            self.metrics.write_text("")
            self.layers.write_text("")
            return
        for path in (self.metrics, self.layers):  # resume: drop rounds the checkpoint does not hold
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
            rows = [row for row in rows if row["round"] <= keep_rounds]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            if path == self.metrics:
                self.rows = rows

    def append(self, record: dict, layers: dict | None = None) -> None:
        self.rows.append(record)
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if layers is not None:
            with self.layers.open("a") as handle:
                handle.write(json.dumps({"round": record["round"], "layers": layers}) + "\n")


def run(config: RunConfig, *, resume: bool = False, setup: Setup | None = None, quiet: bool = False) -> dict:
    """Run (or continue) a federated fine-tuning job; writes its records into ``config.out``."""
    if not config.out:
        config = config.replace(out=f"runs/{config.method}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setup = setup or prepare(config)
    done = 0
    if resume:
        state = checkpoint.load(out / CHECKPOINT)
        if state.info.get("config") != _comparable(config):
            raise ValueError(f"{out / CHECKPOINT} was written by a different config; resume with the same one")
        set_backbone(setup.model, state.backbone)
        set_lora(setup.model, state.lora)
        setup.method.load_state_dict(state.method_state)
        done = state.round
    save(config, out / "config.json")
    records = Records(out, keep_rounds=done if resume else None)
    global_lora = get_lora(setup.model)
    if not resume:
        record = {"round": 0, "method": config.method}
        evaluate(setup, record, accuracy=config.accuracy_every > 0)
        records.append(record)
    log = (lambda *_: None) if quiet else tqdm.write
    log(f"{config.method}: {config.rounds} rounds, {config.clients_per_round}/{config.clients} clients a round, "
        f"out={out}" + (f", resuming after round {done}" if resume else ""))
    for round in tqdm(range(done, config.rounds), desc=config.method, unit="round", disable=quiet,
                      initial=done, total=config.rounds):
        result, record = run_round(setup, global_lora, round)
        global_lora = result.lora
        last = round + 1 == config.rounds
        if (round + 1) % config.eval_every == 0 or last:
            due = config.accuracy_every and (round + 1) % config.accuracy_every == 0
            evaluate(setup, record, accuracy=bool(due) or last)
        records.append(record, result.stats["layers"])
        checkpoint.save(out / CHECKPOINT, checkpoint.Checkpoint(
            round + 1, global_lora, get_backbone(setup.model), setup.method.state_dict(),
            {"config": _comparable(config)}))
        log(report.round_line(record))
    summary = report.summarize(records.rows, config, seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.plot_curves(records.rows, out / "curves.png", title=config.method)
    backbone_changed = any(row.get("residual_rank") for row in records.rows)
    if backbone_changed:  # the adapter only reproduces the model on top of the updated backbone
        export_merged(setup.model, out / "base", setup.tokenizer, merge=False)
    export_adapter(setup.model, out / "adapter", base=(out / "base").resolve() if backbone_changed else None)
    if config.export_merged:
        export_merged(setup.model, out / "merged", setup.tokenizer)
    return summary


def _comparable(config: RunConfig) -> dict:
    """The config fields that must match to resume (output, export, device and the number of rounds may change)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("out", "export_merged", "device", "rounds")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
