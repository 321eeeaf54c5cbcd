"""One run's configuration: a dataclass, read from TOML/YAML, overridden from the command line.

Each key is declared once (``keys.key``): its type (allowed values as ``Literal``), default, meaning and range, which
``fedmomentum keys`` lists. Every value from a file or the command line is converted to its key's type (``coerce``)
or refused in one line naming the key; ``validate`` checks types, ranges and the keys that depend on each other.
Nothing here imports torch, unless the config asks for a CUDA device, per-client ranks or stragglers.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from . import keys
from .coerce import convert
from .data.files import client_sources
from .data.forms import FORMATS
from .data.partition import SCHEMES
from .keys import Rule, above, at_least, between, key
from .methods.option_specs import Weighting

DEFAULT_FAMILIES = ["basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "gcd"]
DEFAULT_CLIENTS_PER_ROUND = 4  # or every client, when there are fewer
DEFAULT_ACCURACY_PER_FAMILY = 8  # or none with the random tiny model

Partition = Literal[SCHEMES]  # type: ignore[valid-type]
DataFormat = Literal[("", *FORMATS)]  # type: ignore[valid-type]  # "" = detect per file
LrSchedule = Literal["constant", "cosine", "linear"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
QuantizationKind = Literal["none", "nf4", "fp4", "int8"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
Clip = Literal["none", "median"]
Stream = Literal["auto", "always", "never"]
NOT_EMPTY = Rule("non-empty", bool)

# Other libraries' names for the keys, for the "did you mean" of an unknown one.
ALIASES = {"learning_rate": "lr", "num_rounds": "rounds", "n_rounds": "rounds", "num_clients": "clients",
           "n_clients": "clients", "num_partitions": "clients", "fraction_fit": "clients_per_round",
           "local_epochs": "local_steps", "steps": "local_steps", "max_steps": "local_steps", "rank": "lora_r",
           "r": "lora_r", "lora_rank": "lora_r", "per_device_train_batch_size": "batch_size", "bs": "batch_size",
           "micro_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "max_seq_length": "max_length", "max_seq_len": "max_length", "seq_len": "max_length",
           "model_name": "model", "model_name_or_path": "model", "base_model": "model", "output_dir": "out",
           "output": "out", "out_dir": "out", "algorithm": "method", "strategy": "method", "aggregation": "method",
           "dataset": "data", "datasets": "data", "train_file": "data", "train_files": "data", "tasks": "families",
           "task": "families", "torch_dtype": "dtype", "precision": "dtype", "lr_scheduler_type": "lr_schedule",
           "lr_scheduler": "lr_schedule", "scheduler": "lr_schedule", "grad_clip": "max_grad_norm",
           "clip_grad_norm": "max_grad_norm", "lora_target_modules": "target_modules", "use_rslora": "rslora",
           "dropout": "lora_dropout", "eval_steps": "eval_every", "eval_interval": "eval_every",
           "dirichlet_alpha": "alpha", "partitioner": "partition", "random_seed": "seed", "options": "method_options",
           "method_option": "method_options", "report": "report_to", "merged": "export_merged"}


@dataclass
class TrainConfig:
    """What each client does in a round (``RunConfig`` holds these keys too: they are declared here once)."""

    local_steps: int = key(4, "optimizer steps per client per round", at_least(1))
    batch_size: int = key(4, "examples per micro-batch", at_least(1))
    grad_accum: int = key(1, "micro-batches per optimizer step", at_least(1))
    lr: float = key(1e-3, "AdamW learning rate (of the first round; see lr_schedule)", above(0))
    weight_decay: float = key(0.0, "AdamW weight decay", at_least(0))
    max_grad_norm: float = key(1.0, "gradient clipping norm (0: none)", at_least(0))
    bf16: bool = key(False, "bfloat16 autocast of the forward pass (the base's own precision is dtype)")
    prox_mu: float = key(0.0, "FedProx: μ of the proximal term μ/2 ‖w − w₀‖² on the clients' trained factors "
                              "(0: none)", at_least(0))
    scaffold: bool = key(False, "SCAFFOLD: control variates on the clients' trained factors")


@dataclass
class RunConfig(TrainConfig):
    """Every knob of a federated run. The defaults are the README's main job (≤ 10 min on 2 CPU cores).

    ``may_change`` marks the keys that do not change the training a checkpoint holds: a resumed run may change them,
    and a Flower node's model does not depend on them.
    """

    # what is trained
    model: str | None = key(None, "base model: a local HF causal-LM folder, a .gguf file, 'tiny' (a small random "
                                  "Llama), or none for SmolLM2-135M-Instruct")
    method: str = key("fedmomentum", "aggregation method (fedmomentum methods)")
    method_options: dict = key({}, "the method's options (fedmomentum methods), e.g. {residual_energy = 0.99}")
    weighting: Weighting = key("examples", "client weights p_i: by example count, or equal")
    clip: Clip = key("median", "bound each client's update: none, or median (at most clip_k × the round's median "
                               "update norm; docs/flower.md)")
    clip_k: float = key(2.0, "median clipping: the multiple of the round's median norm an update may reach",
                        at_least(1))
    lora_r: int = key(8, "LoRA rank of the global adapter", at_least(1))
    lora_alpha: float = key(16.0, "LoRA alpha: scaling α/r (α/√r with rslora)", above(0))
    target_modules: list[str] = key(["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get a LoRA adapter",
                                    NOT_EMPTY)
    rslora: bool = key(False, "rank-stabilised scaling α/√r")
    lora_dropout: float = key(0.0, "dropout on the LoRA branch", between(0, 1, open_high=True))
    client_ranks: list[int] | str | None = key(None, "per-client LoRA ranks: a list, or 'cycle:4,8' / 'random:4,8' "
                                                     "(none: every client at lora_r)")
    # federation
    rounds: int = key(10, "federated rounds", at_least(1), may_change=True)
    clients: int = key(8, "number of clients (follows client_data when that is set)", at_least(1))
    clients_per_round: int | None = key(None, "clients sampled per round (none: 4, or every client when fewer)")
    straggler_rate: float = key(0.0, "chance that a sampled client is a straggler: its update arrives "
                                     "straggler_delay rounds late (simulation only; docs/methods.md#stragglers)",
                                between(0, 1, open_high=True))
    straggler_delay: int = key(1, "rounds a straggler's update arrives late (it is busy in between)", at_least(1))
    partition: Partition = key("dirichlet", "how the pooled examples are split across clients")
    alpha: float = key(0.5, "Dirichlet concentration of the non-IID split (lower: more skewed)", above(0))
    # data
    families: list[str] = key(DEFAULT_FAMILIES, "reasoning-gym task families (docs/data.md)")
    jsonl: list[str] = key([], "training files, read like data (the older key)")
    data: list[str] = key([], "training files or folders: JSONL, JSON, Parquet, save_to_disk (docs/data.md)")
    data_format: DataFormat = key("", "record form of the data files ('': detected per file)")
    client_data: str = key("", "a folder with one data file per client (file name = client id)")
    train_per_family: int = key(200, "training examples generated per task family", at_least(1))
    eval_per_family: int = key(8, "held-out examples per family (and at most per data file)", at_least(1))
    eval_fraction: float = key(0.1, "held-out share of each data / client_data file", between(0, 1, open_high=True))
    max_length: int = key(128, "tokens per training example (longer ones are cut)", at_least(8))
    # local training: TrainConfig's keys
    lr_schedule: LrSchedule = key("cosine", "learning rate over rounds: constant, or decay to 0.1·lr")
    # evaluation
    eval_every: int = key(1, "rounds between held-out loss evaluations", at_least(1), may_change=True)
    accuracy_every: int = key(0, "rounds between exact-match accuracy evaluations (0: after the last round only)",
                              at_least(0), may_change=True)
    accuracy_per_family: int | None = key(None, "questions per family scored for accuracy (none: 8, or 0 with the "
                                                "random 'tiny' model, whose answers mean nothing)", at_least(0),
                                          may_change=True)
    gsm8k_eval: int = key(0, "GSM8K test questions scored for accuracy (0: none)", at_least(0), may_change=True)
    max_new_tokens: int = key(32, "tokens generated per accuracy question", at_least(1), may_change=True)
    eval_batch_size: int = key(16, "held-out examples per forward pass and prompts per generate() call",
                               at_least(1), may_change=True)
    # running
    seed: int = key(0, "seed of data, partition, sampling and initialisation", at_least(0))
    device: str = key("cpu", "cpu, cuda or cuda:N", may_change=True)
    stream: Stream = key("auto", "fold each update into the aggregate as it arrives instead of holding the round's: "
                                 "auto (from 64 clients a round), always (every round that can), never",
                         may_change=True)
    dtype: ModelDtype = key("auto", "the base model's weights (auto: bfloat16 on CUDA, float32 on CPU)")
    quantization: QuantizationKind = key("none", "the base's linear layers held by bitsandbytes (QLoRA): none, nf4, "
                                                 "fp4 or int8")
    double_quant: bool = key(True, "nf4 / fp4: quantize the quantization constants too")
    compute_dtype: ComputeDtype = key("auto", "nf4 / fp4: the dtype a quantized layer computes in (auto: dtype)")
    gradient_checkpointing: bool = key(False, "recompute activations in the backward pass: less memory, more time",
                                       may_change=True)
    out: str = key("", "output folder ('': runs/<method>)", may_change=True)
    export_merged: bool = key(False, "also save the full model with the adapter merged in (merged/)", may_change=True)
    export_rank: int = key(0, "rank cap of adapter_for_original_base/ (0: the change's numerical rank)", at_least(0),
                           may_change=True)
    report_to: str | list[str] = key("none", "'tensorboard': per-round scalars also as TensorBoard events",
                                     may_change=True)

    def __post_init__(self) -> None:
        if self.clients_per_round is None and isinstance(self.clients, int):
            self.clients_per_round = min(DEFAULT_CLIENTS_PER_ROUND, self.clients)
        if self.accuracy_per_family is None:
            self.accuracy_per_family = 0 if self.model == "tiny" else DEFAULT_ACCURACY_PER_FAMILY

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{name: getattr(self, name) for name in TRAIN_KEYS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        values = {**self.to_dict(), **changes}
        if "clients" in changes and "clients_per_round" not in changes \
                and self.clients_per_round == min(DEFAULT_CLIENTS_PER_ROUND, self.clients):
            values["clients_per_round"] = None  # it followed clients: it still does
        if "model" in changes and "accuracy_per_family" not in changes \
                and self.accuracy_per_family == (0 if self.model == "tiny" else DEFAULT_ACCURACY_PER_FAMILY):
            values["accuracy_per_family"] = None  # it followed the model: it still does
        return from_dict(values)

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for a value of the wrong type, out of range, or naming no device here."""
        from . import methods, records

        keys.check(self, lambda name: f"config key {name}", lambda name: f"bad config: {name}")
        methods.check_options(self.method, self.method_options)  # unknown method or option → ValueError
        records.check_report_to(self.report_to)
        checks = [
            (1 <= self.clients_per_round <= self.clients, "clients_per_round must be between 1 and clients"),
            (self.families or self.jsonl or self.data or self.client_data,
             "give at least one task family, data file or client_data folder"),
            (all(p for p in self.data), "data must be a list of file or folder paths"),
            (self.compute_dtype == "auto" or self.quantization in ("nf4", "fp4"),
             "compute_dtype applies to nf4 and fp4 only (int8 and unquantized layers compute in dtype)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad config: {message}")
        if self.client_data:
            count = len(client_sources(self.client_data))
            if count != self.clients:
                raise ValueError(f"bad config: client_data {self.client_data} holds {count} clients but clients = "
                                 f"{self.clients}; leave clients out (it follows the folder) or make them agree")
        check_device(self.device)
        if self.client_ranks not in (None, []):  # the method decides which ranks it can mix (imports torch)
            from . import schedule

            methods.create(self.method, **self.method_options).check_ranks(self.lora_r, schedule.client_ranks(self))
            if self.scaffold and set(schedule.client_ranks(self)) != {self.lora_r}:
                raise ValueError("bad config: scaffold keeps one control variate per factor of the global adapter: "
                                 "every client needs lora_r (no client_ranks)")
        if self.straggler_rate > 0:  # which methods can take a late update (imports torch)
            from . import stragglers

            refused = stragglers.refusal(self, methods.create(self.method, **self.method_options))
            if refused:
                raise ValueError(f"bad config: straggler_rate > 0, but {refused}")


def default_out(config: RunConfig) -> RunConfig:
    """``config`` with its output folder, ``runs/<method>`` when none is given."""
    return config if config.out else config.replace(out=f"runs/{config.method}")


def check_device(device: str) -> None:
    """``cpu``, or a CUDA device this machine has; anything else is a one-line ``ValueError``."""
    if device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"bad config: device must be cpu, cuda or cuda:N, got {device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device here; "
                         "use --device cpu")
    if index and int(index) >= count:
        raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA device(s)")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
TYPES = typing.get_type_hints(RunConfig)
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# What a resumed run may change: where it is, what it exports, how often and how much it evaluates, its device and
# how many rounds it runs. Anything else would change the training a checkpoint holds.
MAY_CHANGE_ON_RESUME = tuple(name for name, f in FIELDS.items() if f.metadata.get("may_change"))


def describe() -> dict[str, keys.Declared]:
    """Every config key with its type, default, meaning and range, by name."""
    return dict(sorted(keys.declared(RunConfig).items()))


def from_dict(values: dict) -> RunConfig:
    """A config from plain values (a file's, or text from the command line), each converted to its field's type;
    an unknown key is an error naming it and the key it probably meant, a value that does not convert one naming
    the key, the value and the type expected."""
    from . import methods

    unknown = [name for name in values if name not in FIELDS]
    if unknown:
        raise ValueError(f"unknown config key(s): {keys.unknown(unknown, FIELDS, ALIASES)} "
                         "(see: fedmomentum keys)")
    typed = {name: convert(value, TYPES[name], f"config key {name}") for name, value in values.items()}
    if typed.get("client_data") and "clients" not in typed:  # the folder says how many clients there are
        typed["clients"] = len(client_sources(typed["client_data"]))
    method = typed.get("method", FIELDS["method"].default)
    if typed.get("method_options") and method in methods.names():
        typed["method_options"] = methods.parse_options(method, typed["method_options"])
    return RunConfig(**typed)


def read(path: str | Path) -> dict:
    """The keys and values of a TOML or YAML config file, as written (``from_dict`` converts them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot parse config file {path}: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return values


def merge(*layers: dict) -> dict:
    """Config values laid over each other, later ones winning; ``method_options`` are merged key by key (a file's
    options and ``-o`` flags add up)."""
    merged: dict = {}
    for layer in layers:
        for name, value in layer.items():
            if name == "method_options" and "method_options" in merged:
                what = "config key method_options"
                value = {**convert(merged[name], dict, what), **convert(value, dict, what)}
            merged[name] = value
    return merged


def load(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Read a TOML or YAML file (or nothing), then apply ``overrides`` (e.g. from CLI flags)."""
    values = read(path) if path is not None else {}
    config = from_dict(merge(values, overrides or {}))
    config.validate()
    return config


def differences(old: dict, new: dict, names=None) -> list[str]:
    """``key (old → new)`` for each key (of ``names``, default all) that differs, leaving out what a resume may
    change."""
    missing = object()
    names = sorted(set(old) | set(new)) if names is None else names
    return [f"{name} ({_show(old.get(name, missing))} → {_show(new.get(name, missing))})" for name in names
            if name not in MAY_CHANGE_ON_RESUME and old.get(name, missing) != new.get(name, missing)]


def resumed(saved: dict, given: dict, out: str) -> RunConfig:
    """The config to continue a run with: the run's own (``saved``, its ``config.json``), with the keys of ``given``
    (a config file and command-line flags) that a resume may change; any other key of ``given`` that differs from
    the run's is one error listing them all."""
    base = from_dict(saved)
    wanted = from_dict({**base.to_dict(), **given})
    changed = differences(base.to_dict(), wanted.to_dict(), names=[name for name in given if name != "out"])
    if changed:
        raise ValueError(f"cannot resume {out} with other settings: {', '.join(changed)}; a resumed run may only "
                         f"change {', '.join(k for k in MAY_CHANGE_ON_RESUME if k != 'out')} "
                         "(start a new run with --out for the rest)")
    config = wanted.replace(out=out)
    config.validate()
    return config


def _show(value) -> str:
    return "unset" if not isinstance(value, str | int | float | bool | list | dict | type(None)) else json.dumps(value)
