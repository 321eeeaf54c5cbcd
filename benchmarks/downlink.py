"""What FedMomentum's downlink options cost in bytes and in exactness, on SmolLM2-135M-shaped adapters.

One aggregation round of random LoRA-like client factors (q, k, v, o of 30 layers: 576×576 and 192×576, rank r)
for N clients, through FedIT and FedMomentum with each downlink option. For each: the downlink per client as a
multiple of FedIT's (from the method's own ``downlink_bytes``), and how far the clients' new model is from the exact
average, ``‖D + s B'A' − s Σ p_i B_i A_i‖_F / ‖s Σ p_i B_i A_i‖_F`` against a dense float64 reference, worst layer.

Clients start from one global adapter and each moves it by its own training-like step, so the sum has a shared
part and client-specific parts (the energy-truncated options depend on that spectrum; real runs report their own
``energy_dropped`` and ``rounding_error`` in ``aggregation.jsonl``).

    .venv/bin/python benchmarks/downlink.py
    .venv/bin/python benchmarks/downlink.py --clients 2 4 8 --rank 8
"""

from __future__ import annotations

import argparse

import torch

import fedmomentum as fm

SCALING = 2.0  # lora_alpha / r = 16 / 8
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
OPTIONS = {
    "fedit": ("fedit", {}),
    "fedmomentum (default)": ("fedmomentum", {}),
    "compress_residual": ("fedmomentum", {"compress_residual": True}),
    "compress + bfloat16": ("fedmomentum", {"compress_residual": True, "residual_dtype": "bfloat16"}),
    "compress + float16": ("fedmomentum", {"compress_residual": True, "residual_dtype": "float16"}),
    "residual_energy=0.99": ("fedmomentum", {"residual_energy": 0.99}),
    "residual_energy=0.9": ("fedmomentum", {"residual_energy": 0.9}),
}


def make_round(clients: int, rank: int, layers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"model.layers.{i}.self_attn.{name}": shape for i in range(layers) for name, shape in SHAPES.items()}
    global_lora, updates = {}, [{} for _ in range(clients)]
    for name, (d, k) in shapes.items():
        A = (torch.rand(rank, k, generator=g) * 2 - 1) / k**0.5
        B = torch.randn(d, rank, generator=g) * 1e-2
        global_lora[name] = fm.LoraPair(A, B)
        for update in updates:  # a client's move: half shared direction, half its own
            update[name] = fm.LoraPair(A + torch.randn(rank, k, generator=g) * 1e-2 / k**0.5,
                                       B + torch.randn(d, rank, generator=g) * 5e-3)
    return global_lora, [fm.ClientUpdate(u, 100 + 10 * i, f"client-{i}") for i, u in enumerate(updates)]


def exactness(agg: fm.Aggregate, global_lora, updates) -> float:
    """Worst layer's relative distance of ``D + s B'A'`` from ``s Σ p_i B_i A_i`` (dense float64)."""
    total = sum(u.num_examples for u in updates)
    worst = 0.0
    for name in global_lora:
        exact = SCALING * sum(u.num_examples / total * (u.factors[name].B.double() @ u.factors[name].A.double())
                              for u in updates)
        pair = agg.lora[name]
        got = SCALING * pair.B.double() @ pair.A.double()
        if name in agg.backbone:
            got = got + agg.backbone[name].left.double() @ agg.backbone[name].right.double()
        worst = max(worst, float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)))
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{args.layers} layers × q,k,v,o of SmolLM2-135M, r = {args.rank}, float32 aggregation; "
          "error: worst layer, against float64 dense")
    for clients in args.clients:
        global_lora, updates = make_round(clients, args.rank, args.layers, args.seed)
        print(f"\nN = {clients} clients a round")
        print(f"{'option':24s} {'downlink MB':>11s} {'× fedit':>8s} {'rel. error':>11s}")
        fedit_bytes = None
        for label, (name, options) in OPTIONS.items():
            agg = fm.methods.create(name, **options).aggregate(global_lora, updates, scaling=SCALING)
            sent = agg.stats["downlink_bytes"]
            fedit_bytes = fedit_bytes or sent
            print(f"{label:24s} {sent / 1e6:11.2f} {sent / fedit_bytes:8.2f} "
                  f"{exactness(agg, global_lora, updates):11.2e}")


if __name__ == "__main__":
    main()
