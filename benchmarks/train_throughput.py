"""Client-training throughput, a round's time split and memory, on a random Llama of a named shape (135m, 1b, 7b)
or a real model (``--model default``: SmolLM2-135M-Instruct), unquantized or quantized (``--quantization``).

Runs the project's own round (``simulation.InProcess`` clients, ``driver.aggregate``, ``evaluate``, the checkpoint
the driver writes) on the default task's data, and reports per round: training tokens per second (tokens of the
examples, and with padding), the split train / aggregate / apply / evaluate / generate / checkpoint, and the peak
memory (GPU max allocated, or the process's peak RSS on CPU); then what the memory holds, counted: the base's
weights as stored, the float32 masters, the backbone change, the LoRA factors and AdamW's state. A random model's
loss means nothing.

``--compare SETTING ...`` runs each setting in its own process (a process's peak RSS is its own) with the other
flags given, and prints them side by side with ratios to the first. A setting is a dtype (float32, bfloat16,
float16) or a quantization (nf4, fp4, int8; its other weights in ``--dtype``), ``+gc`` for gradient checkpointing.

    .venv/bin/python benchmarks/train_throughput.py                                   # 135m, CPU, float32
    .venv/bin/python benchmarks/train_throughput.py --model default --compare float32 bfloat16 nf4 int8
    .venv/bin/python benchmarks/train_throughput.py --shape 1b --device cuda --json runs/tp-1b.json
    .venv/bin/python benchmarks/train_throughput.py --shape 7b --device cuda --dtype bfloat16 --local-steps 8
    .venv/bin/python benchmarks/train_throughput.py --shape 7b --device cuda --dtype bfloat16 --quantization nf4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.build import quantization_of
from fedmomentum.client import batches
from fedmomentum.config import RunConfig
from fedmomentum.evaluate import family_accuracy, family_losses
from fedmomentum.models import SHAPES, random_model, resolve_dtype
from fedmomentum.peft_io import lora_layers
from fedmomentum.schedule import client_seed, round_lr, sample_clients

DTYPES = ("float32", "bfloat16", "float16")
KINDS = ("nf4", "fp4", "int8")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="135m", choices=list(SHAPES))
    parser.add_argument("--model", default=None, help="a real model instead of a random one: a HF folder, or "
                        "'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="the base model's dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quantization", default="none", choices=["none", *KINDS],
                        help="the base's linear layers in 4-bit or int8 (bitsandbytes)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compare", nargs="+", default=None, metavar="SETTING",
                        help="run each setting in its own process: float32 | bfloat16 | float16 | nf4 | fp4 | int8, "
                        "+gc for gradient checkpointing (e.g. nf4+gc)")
    parser.add_argument("--method", default="fedmomentum")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients-per-round", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--accuracy-per-family", type=int, default=8, help="prompts per family generated in the "
                        "last round (0: no generation)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a tokenizer folder (default: SmolLM2's, from the model cache)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Timer:
    """Wall seconds of each named part, synchronising the GPU at both ends, and the process's CPU seconds in it (on a
    shared machine, CPU time per token does not depend on what else runs there; wall time does)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.sync()
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_now_gib(device: torch.device) -> float:
    """GPU memory allocated now, or the process's resident set now."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tied weight once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def held(setup, state) -> dict[str, float]:
    """What the run holds, counted, in GiB: the base's weights as stored (a quantized layer's packed data and its
    quantization constants), the float32 masters of low-precision weights, the backbone change (factored, float32),
    the LoRA factors, their gradients and AdamW's two moments (float32; while a client trains)."""
    base = setup.model.get_base_model()
    weights = tensor_bytes(v for k, v in base.state_dict().items() if "lora_" not in k)
    own = {layer.get_base_layer().weight.data_ptr() for layer in lora_layers(setup.model).values()}
    masters = tensor_bytes(v for v in state.backbone.values() if v.data_ptr() not in own)
    deltas = state.change.deltas.values() if state.change is not None else []
    change = tensor_bytes(t for delta in deltas for t in (delta.left, delta.right))
    lora = tensor_bytes(p for n, p in setup.model.named_parameters() if "lora_" in n)
    return {"weights_gib": weights / 2**30, "masters_gib": masters / 2**30, "change_gib": change / 2**30,
            "lora_gib": lora / 2**30, "gradients_gib": lora / 2**30, "adamw_gib": 2 * lora / 2**30}


def tokens_of_round(config: RunConfig, engine, t: int) -> tuple[int, int]:
    """Training tokens of the round's client batches (as ``client.train_client`` draws them): real and padded."""
    real = padded = 0
    cfg = config.train_config()
    for client in sample_clients(config, t):
        data = engine.client_data[client]
        generator = torch.Generator().manual_seed(client_seed(config, t, client))
        for index in batches(len(data), cfg, generator):
            lengths = [len(data[i]["input_ids"]) for i in index]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return real, padded


def main(argv=None) -> dict:
    args = parse_args(argv)
    return compare(args, sys.argv[1:] if argv is None else argv) if args.compare else measure(args)


def measure(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    dtype = resolve_dtype(args.dtype, device)
    baseline_gib = memory_now_gib(device)  # the interpreter, torch and the libraries, before any model
    out = Path(tempfile.mkdtemp(prefix="fedmomentum-throughput-"))
    config = RunConfig(method=args.method, rounds=args.rounds, clients=max(8, args.clients_per_round),
                       clients_per_round=args.clients_per_round, local_steps=args.local_steps,
                       batch_size=args.batch_size, max_length=args.max_length, eval_batch_size=args.eval_batch_size,
                       accuracy_per_family=args.accuracy_per_family, max_new_tokens=args.max_new_tokens,
                       device=args.device, dtype=str(dtype).removeprefix("torch."), seed=args.seed, out=str(out),
                       model=None if args.model in (None, "default") else args.model, quantization=args.quantization,
                       gradient_checkpointing=args.gradient_checkpointing)
    started = time.perf_counter()
    if args.model is None:  # built (and quantized) here; a real model is loaded by the engine, as a run loads it
        model, tokenizer = random_model(args.shape, seed=args.seed, dtype=dtype, device=device,
                                        tokenizer=args.tokenizer, quantization=quantization_of(config))
        built = time.perf_counter() - started
        setup, engine = simulation.engine(config, model=model, tokenizer=tokenizer)
        name = f"{args.shape} random Llama"
    else:
        setup, engine = simulation.engine(config)
        built, tokenizer, name = 0.0, setup.tokenizer, f"model {args.model}"
    prepared = time.perf_counter() - started - built
    loaded_gib = memory_now_gib(device)
    params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1)  # 4-bit weights: two to a byte
                 for n, p in setup.model.get_base_model().named_parameters() if "lora_" not in n)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    base = f"base {dtype}" + (f" with {args.quantization} linear layers" if args.quantization != "none" else "")
    print(f"{name} ({params / 1e9:.2f} B parameters, {base}, LoRA float32"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}), {args.method}, "
          f"{args.clients_per_round} clients × {args.local_steps} steps × batch {args.batch_size} "
          f"(≤ {args.max_length} tokens)\ndevice: {device.type} ({where}); torch {torch.__version__}; "
          f"model built in {built:.1f} s, loaded, data and LoRA in {prepared:.1f} s\n")

    rows, state = [], driver.start(setup, engine)
    header = (f"{'round':>5} {'train s':>8} {'tokens/s':>9} {'(padded)':>9} {'aggr. s':>8} {'apply s':>8} "
              f"{'eval s':>7} {'gen. s':>7} {'ckpt s':>7} {'round s':>8} {'peak GiB':>9}")
    print(header)
    for t in range(1, args.rounds + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer, last = Timer(device), t == args.rounds
        lr = round_lr(config.lr, config.lr_schedule, t, config.rounds)
        with timer("train"):
            trained = engine.train_round(t, state, setup.method.trainable(t), lr)
        with timer("aggregate"):
            result = setup.method.aggregate(state.lora, trained.updates, scaling=setup.scaling, t=t,
                                            state=state.method)
        with timer("apply"):  # the model's update (backbone, adapter)
            state = driver.advance(setup, state, result, trained.updates, t)
        with timer("evaluate"):
            family_losses(setup.model, setup.eval_data, config.eval_batch_size, tokenizer.pad_token_id)
        if last and args.accuracy_per_family:
            with timer("generate"):
                family_accuracy(setup.model, tokenizer, setup.accuracy_examples, args.max_new_tokens,
                                config.eval_batch_size)
        with timer("checkpoint"):
            checkpoint.save(out / driver.CHECKPOINT, state, {})
        real, padded = tokens_of_round(config, engine, t)
        row = {"round": t, **{f"{k}_s": v for k, v in timer.parts.items()},
               "round_s": sum(timer.parts.values()), "train_tokens": real, "train_tokens_padded": padded,
               "tokens_per_s": real / timer.parts["train"], "padded_tokens_per_s": padded / timer.parts["train"],
               "train_cpu_s": timer.cpu["train"], "tokens_per_cpu_s": real / timer.cpu["train"],
               "peak_memory_gib": peak_memory_gib(device), "train_loss": sum(trained.losses) / len(trained.losses)}
        rows.append(row)
        print(f"{row['round']:>5} {row['train_s']:8.2f} {row['tokens_per_s']:9.0f} {row['padded_tokens_per_s']:9.0f} "
              f"{row['aggregate_s']:8.3f} {row['apply_s']:8.3f} {row['evaluate_s']:7.2f} "
              f"{row.get('generate_s', 0.0):7.2f} {row['checkpoint_s']:7.2f} {row['round_s']:8.2f} "
              f"{row['peak_memory_gib']:9.2f}")
    steady = rows[-1]
    split = {part: steady[f"{part}_s"] / steady["round_s"] for part in
             ("train", "aggregate", "apply", "evaluate", "generate", "checkpoint") if f"{part}_s" in steady}
    print("\nlast round's split: " + ", ".join(f"{part} {share:.0%}" for part, share in split.items()))
    memory = "GPU max allocated" if device.type == "cuda" else "peak RSS"
    counted, peak = held(setup, state), max(r["peak_memory_gib"] for r in rows)
    # the rest of the peak: activations kept for the backward pass, temporaries, the data, allocator slack
    rest = peak - baseline_gib - sum(counted.values())
    print(f"{memory}: {peak:.2f} GiB; before the model: {baseline_gib:.2f} GiB; after loading and setup: "
          f"{loaded_gib:.2f} GiB; held, counted: "
          + ", ".join(f"{key.removesuffix('_gib')} {value:.4f} GiB" for key, value in counted.items())
          + f"; the rest (activations, temporaries): {rest:.2f} GiB")
    if device.type == "cpu":
        print(f"training: {steady['tokens_per_cpu_s']:.1f} tokens per CPU second ({steady['train_cpu_s']:.1f} CPU s, "
              f"{steady['train_s']:.1f} s wall)")
    summary = {"shape": args.shape, "model": args.model, "parameters": params, "device": device.type,
               "device_name": where, "dtype": str(dtype), "quantization": args.quantization,
               "gradient_checkpointing": args.gradient_checkpointing, "method": args.method,
               "torch": torch.__version__, "build_s": built, "prepare_s": prepared, "baseline_gib": baseline_gib,
               "loaded_gib": loaded_gib, "peak_memory_gib": peak, **counted, "rest_gib": rest, "rounds": rows,
               "last_round_split": split,
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}}
    write_json(args.json, summary)
    return summary


def write_json(path: Path | None, summary: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")


def setting_flags(setting: str) -> list[str]:
    """The flags of one ``--compare`` setting."""
    name, _, extra = setting.partition("+")
    if extra not in ("", "gc") or name not in (*DTYPES, *KINDS):
        raise SystemExit(f"--compare: unknown setting {setting!r} ({' | '.join((*DTYPES, *KINDS))}, optionally +gc)")
    flags = ["--quantization", name] if name in KINDS else ["--dtype", name]
    return flags + (["--gradient-checkpointing"] if extra else [])


def common_flags(argv: list[str]) -> list[str]:
    """The command line without ``--compare``'s settings and ``--json``'s path."""
    kept, dropping = [], False
    for item in argv:
        if item in ("--compare", "--json"):
            dropping = True
        elif item.startswith("--") or not dropping:
            dropping = False
            kept.append(item)
    return kept


def compare(args, argv: list[str]) -> dict:
    """Each setting in its own process, then one table, with ratios to the first setting."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for setting in args.compare:
            path = Path(folder) / "result.json"
            command = [sys.executable, __file__, *common_flags(argv), *setting_flags(setting), "--json", str(path)]
            print(f"$ {' '.join(command[1:-2])}", flush=True)
            subprocess.run(command, check=True)
            results[setting] = json.loads(path.read_text())
    first, reference = results[args.compare[0]], args.compare[0]
    cpu = first["device"] == "cpu"
    memory = "peak RSS" if cpu else "GPU max allocated"
    speed = "train tokens per CPU s" if cpu else "train tokens/s"
    print(f"\n| setting | {memory}, GiB | × {reference} | weights | masters | change | LoRA state | the rest | "
          f"{speed} | × {reference} | a round, s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rate = "tokens_per_cpu_s" if cpu else "tokens_per_s"
    for setting, result in results.items():
        last, first_last, peak = result["rounds"][-1], first["rounds"][-1], result["peak_memory_gib"]
        state = result["lora_gib"] + result["gradients_gib"] + result["adamw_gib"]
        print(f"| {setting} | {peak:.2f} | {peak / first['peak_memory_gib']:.2f} | {result['weights_gib']:.3f} "
              f"| {result['masters_gib']:.3f} | {result['change_gib']:.4f} | {state:.4f} | {result['rest_gib']:.2f} "
              f"| {last[rate]:.1f} | {last[rate] / first_last[rate]:.2f} | {last['round_s']:.1f} |")
    print("(GiB. weights, masters, change and LoRA state (factors, gradients, AdamW's moments) are counted from the "
          "tensors; the rest is the peak less those and less what the process held before the model: activations, "
          f"temporaries, data. A round's time is wall time{', under whatever else the machine ran' if cpu else ''}.)")
    summary = {"settings": results}
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
