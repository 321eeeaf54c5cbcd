"""What a server optimizer (``server_opt``) costs per round, against the method alone, measured side by side.

SmolLM2-135M-shaped adapter (q, k, v, o of 30 layers: 576×576 and 192×576), N clients of rank r a round whose
factors are the global adapter plus noise. For each method, ``none``, ``avgm`` and ``adam`` aggregate the same
rounds interleaved; printed per round: the aggregation's CPU seconds on one thread (``time.process_time``: the work
done, whatever else loads the machine) and their ratio to ``none``, the optimizer state's size, the downlink per
client and the backbone delta's width::

    .venv/bin/python benchmarks/server_opt.py --rounds 12
"""

from __future__ import annotations

import argparse
import time

import torch

import fedmomentum as fm

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
OPTS = ("none", "avgm", "adam")


def state_mib(state: dict) -> float:
    return sum(t.numel() * t.element_size() for layers in state.values() for t in layers.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--methods", default="fedit,fedmomentum")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time on one thread measures the work alone
    names = {f"model.layers.{i}.self_attn.{m}": shape for i in range(args.layers) for m, shape in SHAPES.items()}
    dense_mib = sum(d * k for d, k in names.values()) * 4 / 2**20
    print(f"{len(names)} layers, {args.clients} clients of rank {args.rank}; the adapted weights take "
          f"{dense_mib:.1f} MiB in float32")
    for method_name in args.methods.split(","):
        torch.manual_seed(0)
        r = args.rank
        start = {n: fm.LoraPair(torch.randn(r, k) / k**0.5, 0.01 * torch.randn(d, r)) for n, (d, k) in names.items()}
        methods = {opt: fm.methods.create(method_name, server_opt=opt) for opt in OPTS}
        lora = dict.fromkeys(OPTS, start)
        state = {opt: {} for opt in OPTS}
        spent = dict.fromkeys(OPTS, 0.0)
        for t in range(1, args.rounds + 1):
            noise = [{n: (0.01 * torch.randn(r, k), 0.01 * torch.randn(d, r)) for n, (d, k) in names.items()}
                     for _ in range(args.clients)]
            line = {}
            for opt in OPTS:
                updates = [fm.ClientUpdate({n: fm.LoraPair(p.A + noise[i][n][0], p.B + noise[i][n][1])
                                            for n, p in lora[opt].items()}, num_examples=10 + i)
                           for i in range(args.clients)]
                started = time.process_time()
                result = methods[opt].aggregate(lora[opt], updates, scaling=2.0, t=t, state=state[opt])
                seconds = time.process_time() - started
                spent[opt] += seconds
                lora[opt], state[opt] = result.lora, result.state
                widths = [d.rank for d in result.backbone.values()] or [0]
                line[opt] = (seconds, state_mib(result.state), result.stats["downlink_bytes"] / 2**20, max(widths))
            if t in (1, 2, 4) or t % 4 == 0 or t == args.rounds:
                base = line["none"][0]
                print(f"{method_name:12s} round {t:3d}: " + "; ".join(
                    f"{opt} {s:.3f} CPU s (×{s / base:.2f}), state {m:.1f} MiB, downlink {dl:.2f} MiB, delta width {w}"
                    for opt, (s, m, dl, w) in line.items()))
        base = spent["none"]
        print(f"{method_name:12s} mean over {args.rounds} rounds: " + "; ".join(
            f"{opt} {spent[opt] / args.rounds:.3f} CPU s/round (×{spent[opt] / base:.2f})" for opt in OPTS))


if __name__ == "__main__":
    main()
