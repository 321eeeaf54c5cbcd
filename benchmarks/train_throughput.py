"""Client-training throughput and a round's time split on a random Llama of a named shape (135m, 1b, 7b).

Runs the project's own round (``simulation.InProcess`` clients, ``driver.aggregate``, ``evaluate``, the checkpoint
the driver writes) on the default task's data, and reports per round: training tokens per second (tokens of the
examples, and with padding), the split train / aggregate / apply / evaluate / generate / checkpoint, and the peak
memory (GPU max allocated, or the process's peak RSS on CPU). The model is random: its loss means nothing.

    .venv/bin/python benchmarks/train_throughput.py                                   # 135m, CPU, float32
    .venv/bin/python benchmarks/train_throughput.py --shape 1b --device cuda --json runs/tp-1b.json
    .venv/bin/python benchmarks/train_throughput.py --shape 7b --device cuda --dtype bfloat16 --local-steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.client import batches
from fedmomentum.config import RunConfig
from fedmomentum.evaluate import family_accuracy, family_losses
from fedmomentum.models import SHAPES, random_model, resolve_dtype
from fedmomentum.schedule import client_seed, round_lr, sample_clients


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="135m", choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the base model's dtype (auto: bfloat16 on CUDA, float32 on CPU)")
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
    """Wall seconds of each named part, synchronising the GPU at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    dtype = resolve_dtype(args.dtype, device)
    out = Path(tempfile.mkdtemp(prefix="fedmomentum-throughput-"))
    config = RunConfig(method=args.method, rounds=args.rounds, clients=max(8, args.clients_per_round),
                       clients_per_round=args.clients_per_round, local_steps=args.local_steps,
                       batch_size=args.batch_size, max_length=args.max_length, eval_batch_size=args.eval_batch_size,
                       accuracy_per_family=args.accuracy_per_family, max_new_tokens=args.max_new_tokens,
                       device=args.device, dtype=str(dtype).removeprefix("torch."), seed=args.seed, out=str(out))
    started = time.perf_counter()
    model, tokenizer = random_model(args.shape, seed=args.seed, dtype=dtype, device=device, tokenizer=args.tokenizer)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - started
    setup, engine = simulation.engine(config, model=model, tokenizer=tokenizer)
    prepared = time.perf_counter() - started - built
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"{args.shape} random Llama ({params / 1e9:.2f} B parameters, base {dtype}, LoRA float32), "
          f"{args.method}, {args.clients_per_round} clients × {args.local_steps} steps × batch {args.batch_size} "
          f"(≤ {args.max_length} tokens)\ndevice: {device.type} ({where}); torch {torch.__version__}; "
          f"model built in {built:.1f} s, data and LoRA in {prepared:.1f} s\n")

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
    print(f"{memory}: {max(r['peak_memory_gib'] for r in rows):.2f} GiB; base weights "
          f"{sum(p.numel() * p.element_size() for p in setup.model.get_base_model().parameters()) / 2**30:.2f} GiB")
    summary = {"shape": args.shape, "parameters": params, "device": device.type, "device_name": where,
               "dtype": str(dtype), "method": args.method, "torch": torch.__version__, "build_s": built,
               "prepare_s": prepared, "rounds": rows, "last_round_split": split,
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
