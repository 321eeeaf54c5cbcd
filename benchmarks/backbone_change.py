"""What keeping the backbone's whole change factored costs (for ``adapter_for_original_base/``), next to the
aggregation it follows, measured side by side in one run.

SmolLM2-135M-shaped adapter (q, k, v, o of 30 layers: 576×576 and 192×576), N clients of rank r a round with
random factors, FedMomentum's aggregate then ``BackboneChange.add`` of its residual, for R rounds::

    .venv/bin/python benchmarks/backbone_change.py --rounds 30
"""

from __future__ import annotations

import argparse
import time

import torch

import fedmomentum as fm
from fedmomentum.backbone_change import BackboneChange, whole_change

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = {f"model.layers.{i}.self_attn.{m}": shape for i in range(args.layers) for m, shape in SHAPES.items()}
    r = args.rank
    lora = {n: fm.LoraPair(torch.randn(r, k) / k**0.5, torch.zeros(d, r)) for n, (d, k) in names.items()}
    method = fm.methods.create("fedmomentum")
    change, spent = BackboneChange(), {"aggregate": 0.0, "accumulate": 0.0}
    for t in range(args.rounds):
        updates = [fm.ClientUpdate({n: fm.LoraPair(p.A + 0.01 * torch.randn_like(p.A), torch.randn(p.B.shape) * 0.01)
                                    for n, p in lora.items()}, num_examples=10 + i) for i in range(args.clients)]
        started = time.perf_counter()
        result = method.aggregate(lora, updates, scaling=2.0, t=t + 1)
        spent["aggregate"] += time.perf_counter() - started
        started = time.perf_counter()
        change.add(result.backbone)
        spent["accumulate"] += time.perf_counter() - started
        lora = result.lora
        if (t + 1) % 10 == 0 or t + 1 == args.rounds:
            ranks = [delta.rank for delta in change.deltas.values()]
            ratio = spent["accumulate"] / spent["aggregate"]
            print(f"round {t + 1:3d}: aggregate {spent['aggregate'] / (t + 1):.3f} s/round, accumulate "
                  f"{spent['accumulate'] / (t + 1):.3f} s/round (ratio {ratio:.2f}); "
                  f"change width mean {sum(ranks) / len(ranks):.0f}, max {max(ranks)}")
    started = time.perf_counter()
    factors, _ = whole_change(change.deltas, lora, 2.0)
    print(f"export factors: {time.perf_counter() - started:.2f} s, "
          f"{sum(p.A.numel() + p.B.numel() for p in factors.values()) * 4 / 2**20:.1f} MiB (float32); "
          f"dense adapted weights: {sum(d * k for d, k in names.values()) * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
