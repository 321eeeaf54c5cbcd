"""What every aggregation method shares: input checks, client weights, per-layer loop and round stats.

A method sees tensors only. Subclasses implement ``aggregate_layer`` for one layer; the base class checks
the updates, computes ``p_i``, casts to the aggregation dtype and totals the stats.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import ClassVar

import torch

from ..linalg import lowrank_norm, stack
from ..types import Aggregate, ClientUpdate, LoraPair, LowRank, Tensor, UpdateError

WIRE_BYTES = 4  # float32 on the wire
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Method:
    """Base class: FedIT-style training of both factors; subclasses override what differs."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False  # may clients send ranks other than the global rank?

    def __init__(self, weighting: str = "examples", dtype: str = "float32", seed: int = 0):
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.weighting = weighting
        self.dtype = DTYPES[dtype]
        self.seed = seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- the contract -------------------------------------------------------------------------------

    def trainable(self, round: int) -> dict[str, bool]:
        """Which factors the clients train in ``round`` (0-based)."""
        return {"A": True, "B": True}

    def aggregate(
        self,
        global_lora: dict[str, LoraPair],
        updates: list[ClientUpdate],
        *,
        scaling: float,
        round: int = 0,
    ) -> Aggregate:
        """Combine the clients' factors into a new global adapter and backbone deltas."""
        self.validate(global_lora, updates)
        weights = self.client_weights(updates)
        lora, backbone, per_layer = {}, {}, {}
        for name, pair in global_lora.items():
            clients = [u.factors[name].to(self.dtype) for u in updates]
            new, delta, stats = self.aggregate_layer(name, pair.to(self.dtype), clients, weights, scaling, round)
            lora[name] = new
            if delta is not None and delta.rank > 0:
                backbone[name] = delta
            per_layer[name] = stats
        return Aggregate(lora, backbone, self.round_stats(per_layer, lora, backbone, updates, round))

    def state_dict(self) -> dict[str, Tensor]:
        """Server-side state as a flat dict of tensors (safetensors-ready); stateless methods return ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)[:5]}")

    # --- for subclasses -----------------------------------------------------------------------------

    def aggregate_layer(
        self,
        name: str,
        global_pair: LoraPair,
        clients: list[LoraPair],
        weights: list[float],
        scaling: float,
        round: int,
    ) -> tuple[LoraPair, LowRank | None, dict]:
        raise NotImplementedError

    def client_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """``p_i = n_i / Σ n_j`` (or uniform)."""
        if self.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = sum(int(u.num_examples) for u in updates)
        return [int(u.num_examples) / total for u in updates]

    def fresh_A(self, name: str, rows: int, in_features: int, round: int) -> Tensor:
        """Rows of a new LoRA ``A`` as PEFT initialises it (kaiming-uniform), seeded by method seed, round, layer."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round * 10_007 + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(in_features)
        return (torch.rand(rows, in_features, generator=generator, dtype=self.dtype) * 2 - 1) * bound

    # --- checks and stats ---------------------------------------------------------------------------

    def validate(self, global_lora: dict[str, LoraPair], updates: list[ClientUpdate]) -> None:
        """Raise ``UpdateError`` naming the client and layer for anything that cannot be aggregated."""
        if not updates:
            raise UpdateError(f"{self.name}: no client updates to aggregate")
        if not global_lora:
            raise UpdateError(f"{self.name}: the global adapter has no layers")
        for index, update in enumerate(updates):
            who = f"client {update.client_id or index!r}"
            n = update.num_examples
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
                raise UpdateError(f"{who}: num_examples must be a positive integer, got {n!r}")
            missing = sorted(set(global_lora) - set(update.factors))
            extra = sorted(set(update.factors) - set(global_lora))
            if missing or extra:
                raise UpdateError(f"{who}: layers do not match the global adapter "
                                  f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                                  f"extra {extra[:3]}{'…' if len(extra) > 3 else ''})")
            for name, g in global_lora.items():
                pair = update.factors[name]
                A, B = pair.A, pair.B
                where = f"{who}, layer {name!r}"
                if A.ndim != 2 or B.ndim != 2:
                    raise UpdateError(f"{where}: A and B must be matrices, got A {tuple(A.shape)}, B {tuple(B.shape)}")
                if A.shape[1] != g.A.shape[1] or B.shape[0] != g.B.shape[0] or A.shape[0] != B.shape[1]:
                    raise UpdateError(f"{where}: shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the "
                                      f"global A {tuple(g.A.shape)}, B {tuple(g.B.shape)}")
                if A.shape[0] != g.rank and not self.mixed_ranks:
                    raise UpdateError(f"{where}: rank {A.shape[0]} differs from the global rank {g.rank}, "
                                      f"and {self.name} needs equal ranks (use flora, fedex-lora, flexlora "
                                      f"or fedmomentum for mixed ranks)")
                for factor, X in (("A", A), ("B", B)):
                    if not _finite(X):
                        raise UpdateError(f"{where}: factor {factor} has NaN or Inf values")

    def round_stats(self, per_layer, lora, backbone, updates, round) -> dict:
        """Totals over layers, plus what each client sends and receives (float32 bytes)."""
        trained = self.trainable(round)
        uplink = {
            (u.client_id or str(i)): WIRE_BYTES * sum(
                p.A.numel() * trained["A"] + p.B.numel() * trained["B"] for p in u.factors.values())
            for i, u in enumerate(updates)
        }
        downlink = WIRE_BYTES * (
            sum(p.A.numel() * trained["A"] + p.B.numel() * trained["B"] for p in lora.values())
            + sum(d.left.numel() + d.right.numel() for d in backbone.values())
        )
        noises = [s["noise_norm"] for s in per_layer.values() if s.get("noise_norm") is not None]
        energy = sum(s.get("energy", 0.0) for s in per_layer.values())
        dropped = sum(s.get("energy", 0.0) * s.get("energy_dropped", 0.0) for s in per_layer.values())
        return {
            "method": self.name,
            "round": round,
            "clients": len(updates),
            "rank_kept": max(p.rank for p in lora.values()),
            "residual_rank": sum(d.rank for d in backbone.values()),
            "energy_dropped": dropped / energy if energy > 0 else 0.0,
            "noise_norm": math.sqrt(sum(n * n for n in noises)) if noises else None,
            "uplink_bytes": sum(uplink.values()) / len(uplink),
            "downlink_bytes": downlink,
            "uplink_bytes_per_client": uplink,
            "layers": per_layer,
        }


def _finite(X: Tensor) -> bool:
    """No NaN or ±Inf in ``X`` (min and max propagate NaN: one fast pass, no boolean copy of ``X``)."""
    if X.numel() == 0:
        return True
    low, high = torch.aminmax(X)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def mean(tensors: list[Tensor], weights: list[float]) -> Tensor:
    return sum(w * t for w, t in zip(weights, tensors, strict=True))


def product_sum(clients: list[LoraPair], weights: list[float], scaling: float = 1.0) -> LowRank:
    """``scaling · Σ p_i B_i A_i`` in stacked factored form (rank ``Σ r_i``)."""
    left, right = stack([c.B for c in clients], [c.A for c in clients], [scaling * w for w in weights])
    return LowRank(left, right)


def fedit_noise(clients: list[LoraPair], weights: list[float], new: LoraPair, scaling: float) -> float:
    """``‖s(Σ p_i B_i A_i − B'A')‖_F``: what averaging the factors separately gets wrong."""
    exact = product_sum(clients, weights, scaling)
    return lowrank_norm(torch.cat([exact.left, -scaling * new.B], 1), torch.cat([exact.right, new.A], 0))
