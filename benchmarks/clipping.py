"""What median clipping (``clip="median"``, ``clip_k``) costs an honest run: the final held-out loss with and
without it, and how close honest clients come to being clipped.

Each cell is a whole ``fedmomentum run`` (in-process) of honest clients, side by side: ``clip="none"``, then the
same run with ``clip="median"`` at each ``k``. For the unclipped run it prints the largest ratio of a client's update
norm to its round's median (``update_norms`` in ``metrics.jsonl``): clipping at ``k`` changes nothing while that
ratio stays below ``k``. For each ``k`` it prints how many client updates were clipped and the final
``eval_loss`` difference from the unclipped run.

    .venv/bin/python benchmarks/clipping.py                        # the tiny random Llama, a few seconds a run
    .venv/bin/python benchmarks/clipping.py --model default --rounds 4 --seeds 0 --partitions dirichlet \
        --methods fedmomentum fedit --k 1.1 1.5 2
    .venv/bin/python benchmarks/clipping.py --methods fedmomentum flexlora --client-ranks cycle:2,8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fedmomentum import simulation
from fedmomentum.config import RunConfig
from fedmomentum.records import read_metrics


def run(config: RunConfig) -> list[dict]:
    simulation.run(config, quiet=True)
    return read_metrics(config.out)


def worst_ratio(rows: list[dict]) -> float:
    """The largest ``norm / median`` of any client in any round."""
    ratios = [max(norms.values()) / statistics.median(norms.values()) for row in rows[1:]
              if (norms := row.get("update_norms")) and statistics.median(norms.values()) > 0]
    return max(ratios, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random test Llama) or 'default' (SmolLM2-135M)")
    parser.add_argument("--methods", nargs="+", default=["fedmomentum", "fedit", "flexlora", "ffa-lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--partitions", nargs="+", default=["dirichlet", "iid"])
    parser.add_argument("--k", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--client-ranks", default=None, help="e.g. cycle:2,8 (clients of other LoRA ranks)")
    args = parser.parse_args()
    base = dict(model=None if args.model == "default" else args.model, rounds=args.rounds, clients=args.clients,
                clients_per_round=args.per_round, families=["basic_arithmetic", "chain_sum"], train_per_family=48,
                eval_per_family=8, max_length=64, local_steps=4, batch_size=4, lr=5e-3 if args.model == "tiny"
                else 1e-3, lora_r=4 if args.model == "tiny" else 8, lora_alpha=8 if args.model == "tiny" else 16,
                accuracy_per_family=0, client_ranks=args.client_ranks)
    header = ["method", "partition", "seed", "worst norm/median", "eval_loss (no clip)"]
    header += [f"k={k:g}: clipped, Δ eval_loss" for k in args.k]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as root:
        for method in args.methods:
            for partition in args.partitions:
                for seed in args.seeds:
                    name = f"{method}-{partition}-{seed}"
                    config = RunConfig(**base, method=method, partition=partition, seed=seed, clip="none",
                                       out=str(Path(root) / name / "none"))
                    plain = run(config)
                    loss = plain[-1]["eval_loss"]
                    cells = [method, partition, str(seed), f"{worst_ratio(plain):.2f}", f"{loss:.6f}"]
                    for k in args.k:
                        clipped = run(config.replace(clip="median", clip_k=k, out=str(Path(root) / name / f"k{k}")))
                        count = sum(len(row.get("clipped", {})) for row in clipped[1:])
                        cells.append(f"{count}, {clipped[-1]['eval_loss'] - loss:+.2e}")
                    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
