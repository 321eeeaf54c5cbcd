"""What every aggregation method shares: input checks, client weights, per-layer loop, round stats, held state,
and the small pieces of maths several methods use (weighted means, stacked products, an adapter from an SVD).

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
from ..types import Aggregate, ClientUpdate, LayerStats, LoraPair, LowRank, RoundStats, Tensor, UpdateError

WIRE_BYTES = 4  # float32 on the wire
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPLITS = ("balanced", "left")  # how an SVD's singular values go into B and A


class Method:
    """Base class: FedIT-style training of both factors; subclasses override what differs."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False  # may clients send ranks other than the global rank?
    holds_state: ClassVar[bool] = False  # may it hold deltas back between rounds (``held``)?
    backbone_wire_bytes: int = WIRE_BYTES  # bytes per value of the backbone deltas as sent

    def __init__(self, weighting: str = "examples", dtype: str = "float32", seed: int = 0):
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.weighting = weighting
        self.dtype = DTYPES[dtype]
        self.seed = seed
        self.held: dict[str, LowRank] = {}  # deltas held back for a later round: the state between rounds

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
        """Combine the clients' factors into a new global adapter and backbone deltas.

        Input that cannot be aggregated (see ``validate``), and a result that overflows the aggregation dtype, raise
        ``UpdateError`` naming the problem; nothing non-finite is ever returned.
        """
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling) \
                or scaling <= 0:
            raise UpdateError(f"{self.name}: scaling must be a finite number > 0, got {scaling!r}")
        if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 0:
            raise UpdateError(f"{self.name}: round must be an integer ≥ 0, got {round!r}")
        self.validate(global_lora, updates)
        weights = self.client_weights(updates)
        lora, backbone, per_layer = {}, {}, {}
        for name, pair in global_lora.items():
            clients = [u.factors[name].to(self.dtype) for u in updates]
            try:
                new, delta, stats = self.aggregate_layer(name, pair.to(self.dtype), clients, weights, scaling, round)
            except torch.linalg.LinAlgError:
                new, delta, stats = None, None, {}
            self._check_result(name, new, delta, stats)
            lora[name] = new
            if delta is not None and delta.rank > 0:
                backbone[name] = delta
            per_layer[name] = stats
        return Aggregate(lora, backbone, self.round_stats(per_layer, lora, backbone, updates, round), dict(self.held))

    def _check_result(self, name: str, new: LoraPair | None, delta: LowRank | None, stats: LayerStats) -> None:
        """A layer whose aggregate is not finite (or whose SVD failed on it) overflowed the aggregation dtype."""
        tensors = [] if new is None else [new.A, new.B]
        tensors += [] if delta is None else [delta.left, delta.right]
        if name in self.held:
            tensors += [self.held[name].left, self.held[name].right]
        numbers_ = [v for v in stats.values() if isinstance(v, float)]
        if new is None or not all(_finite(t) for t in tensors) or not all(math.isfinite(v) for v in numbers_):
            dtype = str(self.dtype).removeprefix("torch.")
            what = "the SVD of the aggregate failed to converge" if new is None else f"the aggregate overflows {dtype}"
            raise UpdateError(f"{self.name}, layer {name!r}: {what} (the clients' factors are too large); check the "
                              "clients' training" + (", or aggregate in float64 (dtype='float64')"
                                                     if dtype != "float64" else ""))

    def state_dict(self) -> dict[str, Tensor]:
        """The held deltas as a flat dict of tensors (safetensors-ready); ``{}`` when nothing is held."""
        state = {}
        for name, delta in self.held.items():
            state[f"held.{name}.left"] = delta.left.clone(memory_format=torch.contiguous_format)
            state[f"held.{name}.right"] = delta.right.clone(memory_format=torch.contiguous_format)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned (for resuming a run)."""
        if state and not self.holds_state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)[:5]}")
        unknown = [key for key in state if not key.startswith("held.")]
        if unknown:
            raise ValueError(f"{self.name}: unexpected state keys {unknown[:5]}")
        names = {key[len("held."):].rsplit(".", 1)[0] for key in state}
        try:
            self.held = {n: LowRank(state[f"held.{n}.left"].to(self.dtype), state[f"held.{n}.right"].to(self.dtype))
                         for n in names}
        except KeyError as missing:
            raise ValueError(f"{self.name}: state is missing {missing}") from None

    # --- for subclasses -----------------------------------------------------------------------------

    def aggregate_layer(
        self,
        name: str,
        global_pair: LoraPair,
        clients: list[LoraPair],
        weights: list[float],
        scaling: float,
        round: int,
    ) -> tuple[LoraPair, LowRank | None, LayerStats]:
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
        for name, g in global_lora.items():
            if not isinstance(g, LoraPair) or not isinstance(g.A, Tensor) or not isinstance(g.B, Tensor):
                raise UpdateError(f"global adapter, layer {name!r}: expected a LoraPair of tensors")
            if g.A.ndim != 2 or g.B.ndim != 2 or g.A.shape[0] != g.B.shape[1]:
                raise UpdateError(f"global adapter, layer {name!r}: A {tuple(g.A.shape)} and B {tuple(g.B.shape)} "
                                  "are not the factors of one LoRA layer")
            for factor, X in (("A", g.A), ("B", g.B)):
                if not _finite(X):
                    raise UpdateError(f"global adapter, layer {name!r}: factor {factor} has NaN or Inf values")
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

    def round_stats(self, per_layer, lora, backbone, updates, round) -> RoundStats:
        """Totals over layers, plus what each client sends and receives (float32 factors; backbone deltas at
        ``backbone_wire_bytes`` a value)."""
        trained = self.trainable(round)
        uplink = {
            (u.client_id or str(i)): WIRE_BYTES * sum(
                p.A.numel() * trained["A"] + p.B.numel() * trained["B"] for p in u.factors.values())
            for i, u in enumerate(updates)
        }
        downlink = (
            WIRE_BYTES * sum(p.A.numel() * trained["A"] + p.B.numel() * trained["B"] for p in lora.values())
            + self.backbone_wire_bytes * sum(d.left.numel() + d.right.numel() for d in backbone.values())
        )
        noises = [s["noise_norm"] for s in per_layer.values() if s.get("noise_norm") is not None]
        energy = sum(s.get("energy", 0.0) for s in per_layer.values())
        dropped = sum(s.get("energy", 0.0) * s.get("energy_dropped", 0.0) for s in per_layer.values())
        return RoundStats(**{
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
        })


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


def adapter_from_svd(US: Tensor, S: Tensor, Vh: Tensor, rank: int, split: str, fresh_A) -> LoraPair:
    """Rank-``rank`` factors with ``B A = U S Vh`` for the given components (``US = U S``, all ``S > 0``).

    ``split="balanced"`` puts ``√S`` on each side, ``"left"`` all of ``S`` on ``B``. Slots beyond the given
    components (missing or numerically zero ones) get ``B`` column 0 and a fresh ``A`` row (``fresh_A(n)``,
    like a LoRA init), so they stay trainable instead of being stuck at ``A = B = 0``.
    """
    if split == "balanced":
        root = S.sqrt()
        B, A = US / root, root[:, None] * Vh
    else:
        B, A = US, Vh
    if len(S) < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - len(S))], 1)
        A = torch.cat([A, fresh_A(rank - len(S)).to(A)], 0)
    return LoraPair(A.contiguous(), B.contiguous())
