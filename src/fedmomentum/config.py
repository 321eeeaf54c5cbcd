"""One run's configuration: a dataclass, read from TOML/YAML, overridden from the command line.

Every value from a file or the command line is converted to its field's type (``coerce``) or refused in one line
naming the key; ``validate`` checks ranges and that the values a Python caller gave have the right types.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .client import TrainConfig
from .coerce import check, convert
from .data import FORMATS, client_sources

DEFAULT_FAMILIES = ["basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "gcd"]
DEFAULT_CLIENTS_PER_ROUND = 4  # or every client, when there are fewer
# What a resumed run may change: where it is, what it exports, how often and how much it evaluates, its device and
# how many rounds it runs. Anything else would change the training a checkpoint holds.
MAY_CHANGE_ON_RESUME = ("out", "rounds", "export_merged", "export_rank", "device", "eval_every", "accuracy_every",
                        "accuracy_per_family", "gsm8k_eval", "max_new_tokens", "report_to")


@dataclass
class RunConfig:
    """Every knob of a federated run. The defaults are the README's main job (≤ 10 min on 2 CPU cores)."""

    # what is trained
    model: str | None = None  # a local HF folder; None = the embedded SmolLM2-135M-Instruct
    method: str = "fedmomentum"
    method_options: dict = field(default_factory=dict)
    weighting: str = "examples"  # or "uniform"
    clip: str = "median"  # "none", or "median": each client's update at most clip_k × the round's median (robust.py)
    clip_k: float = 2.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False
    lora_dropout: float = 0.0
    client_ranks: list[int] | str | None = None  # per-client LoRA ranks: a list, or "cycle:4,8" / "random:4,8"
    # federation
    rounds: int = 10
    clients: int = 8
    clients_per_round: int | None = None  # None = min(4, clients)
    partition: str = "dirichlet"  # iid | dirichlet | family
    alpha: float = 0.5
    # data
    families: list[str] = field(default_factory=lambda: list(DEFAULT_FAMILIES))
    jsonl: list[str] = field(default_factory=list)  # read like data (the older key)
    data: list[str] = field(default_factory=list)  # training files or folders (JSONL, JSON, Parquet, save_to_disk)
    data_format: str = ""  # "" = detect per file; alpaca | chat | prompt-response
    client_data: str = ""  # a folder with one file per client (file name = client id); clients follows it
    train_per_family: int = 200
    eval_per_family: int = 8
    eval_fraction: float = 0.1  # held-out share of each data / client_data file (at most eval_per_family)
    max_length: int = 128
    # local training
    local_steps: int = 4
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # constant | cosine | linear, over rounds (to 0.1·lr)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False  # bfloat16 autocast of the forward pass (the base's own precision is ``dtype``)
    # evaluation
    eval_every: int = 1
    accuracy_every: int = 0  # 0 = only after the last round
    accuracy_per_family: int = 8
    gsm8k_eval: int = 0  # GSM8K test questions scored with accuracy (0 = none)
    max_new_tokens: int = 32
    eval_batch_size: int = 16  # held-out examples per forward pass and prompts per generate() call
    # running
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # the base model's weights: float32 | bfloat16 | float16; auto = bfloat16 on CUDA, else float32
    out: str = ""  # "" = runs/<method>
    export_merged: bool = False
    export_rank: int = 0  # adapter_for_original_base/: 0 = the change's numerical rank, else at most this
    report_to: str | list[str] = "none"  # "tensorboard": per-round scalars also as TensorBoard events

    def __post_init__(self) -> None:
        if self.clients_per_round is None and isinstance(self.clients, int):
            self.clients_per_round = min(DEFAULT_CLIENTS_PER_ROUND, self.clients)

    def train_config(self) -> TrainConfig:
        return TrainConfig(local_steps=self.local_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           lr=self.lr, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                           bf16=self.bf16)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        values = {**self.to_dict(), **changes}
        if "clients" in changes and "clients_per_round" not in changes \
                and self.clients_per_round == min(DEFAULT_CLIENTS_PER_ROUND, self.clients):
            values["clients_per_round"] = None  # it followed clients: it still does
        return from_dict(values)

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for a value of the wrong type, out of range, or naming no device here."""
        from . import methods, records, schedule

        for name, kind in TYPES.items():
            check(getattr(self, name), kind, f"config key {name}")
        method = methods.create(self.method, **self.method_options)  # unknown method or option → ValueError
        method.check_ranks(self.lora_r, schedule.client_ranks(self))
        records.check_report_to(self.report_to)
        checks = [
            (self.rounds >= 1, "rounds must be ≥ 1"),
            (self.clients >= 1, "clients must be ≥ 1"),
            (1 <= self.clients_per_round <= self.clients, "clients_per_round must be between 1 and clients"),
            (self.partition in ("iid", "dirichlet", "family"), "partition must be iid, dirichlet or family"),
            (self.alpha > 0, "alpha (the Dirichlet concentration) must be > 0"),
            (self.weighting in ("examples", "uniform"), "weighting must be examples or uniform"),
            (self.clip in ("none", "median") and self.clip_k >= 1, "clip must be none or median, clip_k ≥ 1"),
            (self.local_steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1,
             "local_steps, batch_size and grad_accum must be ≥ 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be ≥ 0"),
            (self.lr_schedule in ("constant", "cosine", "linear"), "lr_schedule must be constant, cosine or linear"),
            (self.lora_r >= 1, "lora_r must be ≥ 1"),
            (self.export_rank >= 0, "export_rank must be ≥ 0"),
            (self.lora_alpha > 0, "lora_alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (bool(self.target_modules), "target_modules must name at least one module"),
            (self.train_per_family >= 1, "train_per_family must be ≥ 1"),
            (self.eval_per_family >= 1, "eval_per_family must be ≥ 1 (the held-out loss needs examples)"),
            (self.max_length >= 8, "max_length must be ≥ 8 tokens"),
            (self.eval_every >= 1, "eval_every must be ≥ 1"),
            (min(self.accuracy_every, self.accuracy_per_family, self.gsm8k_eval) >= 0,
             "accuracy_every, accuracy_per_family and gsm8k_eval must be ≥ 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1"),
            (self.seed >= 0, "seed must be ≥ 0"),
            (self.families or self.jsonl or self.data or self.client_data,
             "give at least one task family, data file or client_data folder"),
            (all(p for p in self.data), "data must be a list of file or folder paths"),
            (self.data_format in ("", *FORMATS), f"data_format must be empty (detect) or one of {', '.join(FORMATS)}"),
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (self.eval_batch_size >= 1, "eval_batch_size must be ≥ 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "dtype must be auto, float32, bfloat16 or float16"),
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


def from_dict(values: dict) -> RunConfig:
    """A config from plain values (a file's, or text from the command line), each converted to its field's type;
    an unknown key is an error naming it and the nearest known key, a value that does not convert one naming the
    key, the value and the type expected."""
    import difflib

    from . import methods

    unknown = [key for key in values if key not in FIELDS]
    if unknown:
        hints = {key: difflib.get_close_matches(key, FIELDS, n=1) for key in unknown}
        listed = ", ".join(f"{key!r}" + (f" (did you mean {hints[key][0]!r}?)" if hints[key] else "")
                           for key in unknown)
        raise ValueError(f"unknown config key(s): {listed}")
    typed = {key: convert(value, TYPES[key], f"config key {key}") for key, value in values.items()}
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
        for key, value in layer.items():
            if key == "method_options" and "method_options" in merged:
                what = "config key method_options"
                value = {**convert(merged[key], dict, what), **convert(value, dict, what)}
            merged[key] = value
    return merged


def load(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Read a TOML or YAML file (or nothing), then apply ``overrides`` (e.g. from CLI flags)."""
    values = read(path) if path is not None else {}
    config = from_dict(merge(values, overrides or {}))
    config.validate()
    return config


def differences(old: dict, new: dict, keys=None) -> list[str]:
    """``key (old → new)`` for each key (of ``keys``, default all) that differs, leaving out what a resume may
    change."""
    missing = object()
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{key} ({_show(old.get(key, missing))} → {_show(new.get(key, missing))})" for key in keys
            if key not in MAY_CHANGE_ON_RESUME and old.get(key, missing) != new.get(key, missing)]


def resumed(saved: dict, given: dict, out: str) -> RunConfig:
    """The config to continue a run with: the run's own (``saved``, its ``config.json``), with the keys of ``given``
    (a config file and command-line flags) that a resume may change; any other key of ``given`` that differs from
    the run's is one error listing them all."""
    base = from_dict(saved)
    wanted = from_dict({**base.to_dict(), **given})
    changed = differences(base.to_dict(), wanted.to_dict(), keys=[key for key in given if key != "out"])
    if changed:
        raise ValueError(f"cannot resume {out} with other settings: {', '.join(changed)}; a resumed run may only "
                         f"change {', '.join(k for k in MAY_CHANGE_ON_RESUME if k != 'out')} "
                         "(start a new run with --out for the rest)")
    config = wanted.replace(out=out)
    config.validate()
    return config


def _show(value) -> str:
    return "unset" if not isinstance(value, str | int | float | bool | list | dict | type(None)) else json.dumps(value)
