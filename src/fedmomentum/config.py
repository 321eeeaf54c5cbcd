"""One run's configuration: a dataclass, read from TOML/YAML, overridden from the command line."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .client import TrainConfig

DEFAULT_FAMILIES = ["basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "gcd"]


@dataclass
class RunConfig:
    """Every knob of a federated run. The defaults are the README's main job (≤ 10 min on 2 CPU cores)."""

    # what is trained
    model: str | None = None  # a local HF folder; None = the embedded SmolLM2-135M-Instruct
    method: str = "fedmomentum"
    method_options: dict = field(default_factory=dict)
    weighting: str = "examples"  # or "uniform"
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False
    lora_dropout: float = 0.0
    # federation
    rounds: int = 10
    clients: int = 8
    clients_per_round: int = 4
    partition: str = "dirichlet"  # iid | dirichlet | family
    alpha: float = 0.5
    # data
    families: list[str] = field(default_factory=lambda: list(DEFAULT_FAMILIES))
    jsonl: list[str] = field(default_factory=list)  # extra local JSONL training files (prompt/response)
    train_per_family: int = 200
    eval_per_family: int = 8
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

    def train_config(self) -> TrainConfig:
        return TrainConfig(local_steps=self.local_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           lr=self.lr, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                           bf16=self.bf16)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        return from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        from . import methods

        methods.create(self.method, **self.method_options)  # unknown method or option → ValueError
        checks = [
            (self.rounds >= 1, "rounds must be ≥ 1"),
            (self.clients >= 1, "clients must be ≥ 1"),
            (1 <= self.clients_per_round <= self.clients, "clients_per_round must be between 1 and clients"),
            (self.partition in ("iid", "dirichlet", "family"), "partition must be iid, dirichlet or family"),
            (self.local_steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1,
             "local_steps, batch_size and grad_accum must be ≥ 1"),
            (self.lr_schedule in ("constant", "cosine", "linear"), "lr_schedule must be constant, cosine or linear"),
            (self.lora_r >= 1, "lora_r must be ≥ 1"),
            (self.eval_every >= 1, "eval_every must be ≥ 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be ≥ 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "dtype must be auto, float32, bfloat16 or float16"),
            (self.families or self.jsonl, "give at least one task family or JSONL file"),
            (self.device == "cpu" or self.device.startswith("cuda"), "device must be cpu or cuda[:N]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad config: {message}")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def from_dict(values: dict) -> RunConfig:
    """A config from plain values; an unknown key is an error that names it and the nearest known keys."""
    import difflib

    unknown = [key for key in values if key not in FIELDS]
    if unknown:
        hints = {key: difflib.get_close_matches(key, FIELDS, n=1) for key in unknown}
        listed = ", ".join(f"{key!r}" + (f" (did you mean {hints[key][0]!r}?)" if hints[key] else "")
                           for key in unknown)
        raise ValueError(f"unknown config key(s): {listed}")
    return RunConfig(**values)


def load(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Read a TOML or YAML file (or nothing), then apply ``overrides`` (e.g. from CLI flags)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"cannot parse config file {path}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
    config = from_dict({**values, **(overrides or {})})
    config.validate()
    return config


def save(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
