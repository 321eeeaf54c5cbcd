"""Everything a run needs, built from its config: the PEFT model, the method, the clients' data, the held-out data.

The simulation, the Flower ServerApp and every Flower ClientApp build their model and data here, so they all
start from the same weights, the same LoRA init and the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import methods
from .config import RunConfig
from .data import (
    Example,
    by_family,
    client_sources,
    data_sources,
    load_examples,
    load_gsm8k_test,
    make_tasks,
    partition,
    split_held_out,
)

if TYPE_CHECKING:  # the model parts import torch when used, so a plan of the data (``client_examples``) does not
    from peft import PeftModel

    from .quantization import Quantization


@dataclass
class Setup:
    """The server side of a run: the model it holds, the method, and the data it evaluates on."""

    config: RunConfig
    model: PeftModel
    tokenizer: object
    method: methods.Method
    scaling: float
    eval_data: dict[str, list[dict]]  # encoded held-out examples per family
    accuracy_examples: dict[str, list[Example]]
    # client id → its share of training examples per family: the weights of its held-out slice (``evaluate``);
    # empty where the server does not know the clients' data (Flower)
    client_mixtures: dict[str, dict[str, float]] = field(default_factory=dict)


def quantization_of(config: RunConfig) -> Quantization | None:
    """The run's ``Quantization`` (None: an unquantized base); ``compute_dtype`` auto is the base's ``dtype``."""
    if config.quantization == "none":
        return None
    from .models import resolve_dtype
    from .quantization import Quantization

    dtype = resolve_dtype(config.dtype, config.device)
    compute = dtype if config.compute_dtype == "auto" else resolve_dtype(config.compute_dtype, config.device)
    return Quantization(config.quantization, compute_dtype=compute, double_quant=config.double_quant)


def peft_model(config: RunConfig, model=None, tokenizer=None) -> tuple[PeftModel, object]:
    """The base model (loaded from ``config.model`` unless given) in the config's ``dtype``, quantized as the config
    says (then prepared for k-bit training, PEFT's way), with activation checkpointing if asked, wrapped with the run's
    seeded LoRA adapter (float32 factors whatever the base's dtype: PEFT upcasts them)."""
    from .models import load_model, resolve_dtype
    from .peft_io import add_lora
    from .quantization import kind_of, prepare_for_training, quantize

    dtype, quantization = resolve_dtype(config.dtype, config.device), quantization_of(config)
    given = "none" if model is None else kind_of(model)
    if model is None:
        model, tokenizer = load_model(config.model, device=config.device, dtype=dtype, quantization=quantization)
    elif given != "none":  # quantized already (a benchmark's random model, quantized as it was built): used as it is
        if given != config.quantization:
            raise ValueError(f"the model given is quantized as {given}, but the config says quantization = "
                             f"{config.quantization}")
    elif quantization is not None:
        model = quantize(model, quantization, config.device, dtype)
    elif model.dtype != dtype:
        model.to(dtype)
    if quantization is not None:
        model = prepare_for_training(model)
    if config.gradient_checkpointing:  # non-reentrant: the frozen inputs need no gradient, dropout's RNG is replayed
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, target_modules=config.target_modules,
                     dropout=config.lora_dropout, rslora=config.rslora, seed=config.seed)
    return model, tokenizer


def make_method(config: RunConfig) -> methods.Method:
    """The run's aggregation method with its options (the server aggregates with it; a client asks it where to
    start, ``Method.client_start``)."""
    return methods.create(config.method, **{"weighting": config.weighting, "seed": config.seed,
                                            **config.method_options})


def _split(config: RunConfig, examples: list[Example], name: str) -> tuple[list[Example], list[Example]]:
    """A data file's training examples and its seeded held-out slice (``eval_fraction``, ≤ ``eval_per_family``)."""
    return split_held_out(examples, config.eval_fraction, config.eval_per_family, config.seed, name)


def client_examples(config: RunConfig) -> tuple[list[list[Example]], dict[str, list[Example]]]:
    """The seeded training partition (one list per client) and the held-out examples per family.

    The reasoning-gym families and the ``jsonl`` / ``data`` files are pooled and split across the clients by
    ``config.partition``; with ``client_data``, client ``i`` also holds the ``i``-th file of that folder (by
    name). Every file keeps a seeded held-out slice for evaluation, reported under its family (by default the
    file's name).
    """
    fmt = config.data_format or None
    train, held_out = (make_tasks(config.families, config.train_per_family, config.eval_per_family, config.seed)
                       if config.families else ([], []))
    for source in [s for path in [*config.jsonl, *config.data] for s in data_sources(path)]:
        kept, held = _split(config, load_examples(source, fmt), source.name)
        train += kept
        held_out += held
    own = client_sources(config.client_data) if config.client_data else {}
    if own and len(own) != config.clients:
        raise ValueError(f"client_data {config.client_data} holds {len(own)} clients but clients = {config.clients}")
    parts = (partition(train, config.clients, config.partition, alpha=config.alpha, seed=config.seed) if train
             else [[] for _ in range(config.clients)])
    for part, source in zip(parts, own.values(), strict=False):
        kept, held = _split(config, load_examples(source, fmt), source.name)
        part += kept
        held_out += held
    if not held_out:
        raise ValueError("no held-out examples to evaluate on: give task families with eval_per_family ≥ 1, or "
                         "data files with eval_fraction > 0 (a file needs at least 2 examples to lend one)")
    return parts, by_family(held_out)


def client_id(index: int) -> str:
    """The id of the client at ``index`` (a partition, on Flower) when its data has no name of its own."""
    return f"client-{index}"


def client_ids(config: RunConfig) -> list[str]:
    """Each client's id: its file's name with ``client_data``, else ``client_id(index)``."""
    if config.client_data:
        return list(client_sources(config.client_data))
    return [client_id(index) for index in range(config.clients)]


def encode_all(examples: list[Example], tokenizer, config: RunConfig) -> list[dict]:
    from .data import encode

    return [encode(e, tokenizer, config.max_length) for e in examples]


def prepare(config: RunConfig, model=None, tokenizer=None,
            held_out: dict[str, list[Example]] | None = None) -> Setup:
    """The server's ``Setup``: the PEFT model, the method, and the encoded held-out data (``held_out``, or the
    config's own held-out examples)."""
    from .peft_io import scaling

    config.validate()
    model, tokenizer = peft_model(config, model, tokenizer)
    method = make_method(config)
    if held_out is None:
        held_out = client_examples(config)[1]
    eval_data = {family: encode_all(items, tokenizer, config) for family, items in held_out.items()}
    accuracy_examples = {family: items[: config.accuracy_per_family] for family, items in held_out.items()}
    if config.gsm8k_eval:
        accuracy_examples["gsm8k"] = load_gsm8k_test()[: config.gsm8k_eval]
    return Setup(config, model, tokenizer, method, scaling(model), eval_data, accuracy_examples)
