"""What a Flower train message carries after one FedMomentum round, measured on the records, against the method's
own count (``downlink_bytes``), for each residual dtype.

One aggregation round of random LoRA-like client factors on SmolLM2-135M-shaped adapters (``downlink.make_round``:
q, k, v, o of 30 layers, rank r, N clients), then the records a node gets in the next round's message, encoded as
the strategy encodes them (``wire.lora_to_record`` for the adapter, ``wire.deltas_to_record`` for the backbone
delta), and their bytes as the strategy measures them (``wire.array_bytes``). The difference from the method's
count should be the npy header of each array, nothing else.

    .venv/bin/python benchmarks/wire_bytes.py
"""

from __future__ import annotations

import argparse

from flwr.app import RecordDict

import fedmomentum as fm
from downlink import SCALING, make_round
from fedmomentum.flower import wire

OPTIONS = {
    "float32 (default)": {},
    "bfloat16": {"residual_dtype": "bfloat16"},
    "float16": {"residual_dtype": "float16"},
    "compress + bfloat16": {"compress_residual": True, "residual_dtype": "bfloat16"},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    global_lora, updates = make_round(args.clients, args.rank, args.layers, args.seed)
    print(f"{args.layers} layers × q,k,v,o of SmolLM2-135M, r = {args.rank}, N = {args.clients}: the next round's "
          "message (adapter + residual)")
    print(f"{'residual':22s} {'counted MB':>10s} {'measured MB':>11s} {'arrays':>6s} {'measured − counted':>19s} "
          f"{'dtypes on the wire':s}")
    for label, options in OPTIONS.items():
        agg = fm.methods.create("fedmomentum", **options).aggregate(global_lora, updates, scaling=SCALING)
        adapter = wire.split_factors(wire.lora_to_record(agg.lora))
        backbone = wire.deltas_to_record({0: agg.backbone})
        content = RecordDict({"global-A": adapter["A"], "global-B": adapter["B"], "backbone": backbone})
        measured, counted = wire.array_bytes(content), agg.stats["downlink_bytes"]
        arrays = sum(len(record) for record in content.array_records.values())
        dtypes = sorted({array.dtype for array in backbone.values()})
        print(f"{label:22s} {counted / 1e6:10.2f} {measured / 1e6:11.2f} {arrays:6d} "
              f"{measured - counted:10d} = {(measured - counted) / arrays:g} × {arrays} {'/'.join(dtypes)}")


if __name__ == "__main__":
    main()
