"""A round streamed through the methods against the same round collected: the server's peak memory against N.

Each cell is one simulated round of N clients whose replies are made one client at a time (each client moves the
global adapter by a training-like step, as in ``aggregation.py``), run in a fresh process so that its peak memory
is its own:

* ``collect``: every reply is kept, then ``method.aggregate`` (what a round that does not stream does);
* ``stream``: ``method.open_round`` folds each reply as it arrives and drops it, then ``finish()`` (what
  ``driver.run_round`` does from ``driver.STREAM_FROM`` clients on, when nothing in the round needs every reply).

Printed per cell: the bytes held when the last reply is in (the replies, or the round's sums), the peak resident
memory above the start of the round (folding and finishing included), the CPU seconds of folding and of
finishing, the routes taken and, against the collected round of the same N where it was run, the largest
difference of the round's model change ``s B'A' + D`` (first layer, sampled entries) relative to its largest
entry. Shapes: ``tiny`` (the test model's
8 adapted layers, r = 4) and ``7b`` (``--layers`` of the 7B round's 4096×4096 layers, r = 16).

    .venv/bin/python benchmarks/streaming.py --clients 10,40,160,320,1000 --threads 1
    .venv/bin/python benchmarks/streaming.py --clients 10,40 --shapes tiny --methods fedit   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import fedmomentum as fm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import TINY_BLOCKS, TINY_RANK, TINY_SHAPES, Memory, client_step, lora_like  # noqa: E402

METHODS = {"fedmomentum": {}, "fedit": {}, "fedmomentum-sketch": {"svd": "sketch"}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,40,160,320,1000", help="comma-separated client counts")
    parser.add_argument("--shapes", default="tiny,7b", help="tiny and/or 7b")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--layers", type=int, default=1, help="4096×4096 layers in the 7b round")
    parser.add_argument("--collect-up-to", type=int, default=1000,
                        help="collect (hold every reply) only up to this N on the 7b shapes (memory)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="write the measurements here (JSON)")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def shapes_of(spec) -> tuple[dict[str, tuple[int, int]], int]:
    if spec["shapes"] == "tiny":
        return ({f"model.layers.{b}.self_attn.{p}": s for b in range(TINY_BLOCKS) for p, s in TINY_SHAPES.items()},
                TINY_RANK)
    return {f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj": (4096, 4096) for i in range(spec["layers"])}, 16


def cell(spec) -> dict:
    """One round (see the module notes); returns its measurements and, for comparison, its model change."""
    torch.set_num_threads(spec["threads"])
    shapes, r = shapes_of(spec)
    g = torch.Generator().manual_seed(spec["seed"])
    global_lora = {name: fm.LoraPair(*lora_like(g, d, k, r, "cpu", torch.float32)) for name, (d, k) in shapes.items()}
    method = fm.methods.create(spec["method"].split("-")[0], **METHODS[spec["method"]])
    scaling = 2.0
    memory = Memory(torch.device("cpu"))
    base = memory.reset()
    cpu = time.process_time()
    held: list[fm.ClientUpdate] = []
    accumulator = method.open_round(global_lora, scaling=scaling, stream=True) if spec["mode"] == "stream" else None
    for i in range(spec["clients"]):
        update = fm.ClientUpdate({name: client_step(g, p.A, p.B) for name, p in global_lora.items()},
                                 num_examples=100 + 37 * i, client_id=f"c{i}")  # arrives
        if accumulator is None:
            held.append(update)
        else:
            accumulator.fold(update)
        del update
    if accumulator is None:
        held_bytes = sum(4 * (p.A.numel() + p.B.numel()) for u in held for p in u.factors.values())
    else:
        held_bytes = accumulator.nbytes
    fold_cpu, cpu = time.process_time() - cpu, time.process_time()
    result = method.aggregate(global_lora, held, scaling=scaling) if accumulator is None else accumulator.finish()
    finish_cpu = time.process_time() - cpu
    peak = memory.peak() - base
    routes = sorted({str(s.get("svd")) for s in result.stats["layers"].values() if s.get("svd")})
    errors = [s["svd_error"] for s in result.stats["layers"].values() if "svd_error" in s]
    first = next(iter(shapes))
    change = scaling * result.lora[first].B.double() @ result.lora[first].A.double()
    if first in result.backbone:
        change += result.backbone[first].left.double() @ result.backbone[first].right.double()
    return {**spec, "held_mib": held_bytes / 2**20, "memory_mib": peak, "fold_cpu": fold_cpu,
            "finish_cpu": finish_cpu, "routes": routes, "svd_error": max(errors) if errors else None,
            "change": change.flatten()[:: max(1, change.numel() // 4096)].tolist(),
            "change_max": float(change.abs().max())}


def run_cell(spec) -> dict:
    done = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"measurement {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(cell(json.loads(args.cell))))
        return
    counts = [int(n) for n in args.clients.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s); peak memory in fresh processes")
    print(f"{'shapes':22} {'method':19} {'N':>5}  {'mode':8} {'held MiB':>9} {'memory MiB':>11} {'fold s':>7} "
          f"{'finish s':>8}  {'vs collect':>10}  routes")
    rows = []
    for shapes in args.shapes.split(","):
        for name in args.methods.split(","):
            for n in counts:
                collected = None
                for mode in ("collect", "stream"):
                    if mode == "collect" and shapes == "7b" and n > args.collect_up_to:
                        continue
                    spec = {"shapes": shapes, "method": name, "clients": n, "mode": mode, "layers": args.layers,
                            "threads": args.threads, "seed": args.seed}
                    row = run_cell(spec)
                    if mode == "collect":
                        collected = row
                    gap = ""
                    if mode == "stream" and collected is not None:
                        diff = max(abs(a - b) for a, b in zip(row["change"], collected["change"], strict=True))
                        gap = f"{diff / max(collected['change_max'], 1e-30):.1e}"
                    title = ("tiny (8 layers, r=4)" if shapes == "tiny" else f"7B ({args.layers} of 4096², r=16)")
                    error = f" (sketch error {row['svd_error']:.1e})" if row["svd_error"] is not None else ""
                    print(f"{title:22} {name:19} {n:5d}  {mode:8} {row['held_mib']:9.2f} {row['memory_mib']:11.0f} "
                          f"{row['fold_cpu']:7.2f} {row['finish_cpu']:8.2f}  {gap:>10}  "
                          f"{','.join(row['routes'])}{error}", flush=True)
                    rows.append({k: v for k, v in row.items() if k != "change"})
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
