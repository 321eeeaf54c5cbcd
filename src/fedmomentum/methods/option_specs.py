"""Every method's options, declared once and torch-free: type (allowed values as ``Literal``), default, meaning, range.

``MethodOptions`` holds what every method takes; a method's own options class adds its fields to it (a new option
common to every method is one line there). ``methods.create`` checks the options against these declarations before
it builds the method (the method class itself takes the checked ``Options`` instance), and ``fedmomentum methods``
lists them, without importing torch. PEFT keeps ``LoraConfig`` apart from its layers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..keys import above, at_least, between, key

Weighting = Literal["examples", "uniform"]
AggregationDtype = Literal["float32", "float64"]
Split = Literal["balanced", "left"]  # how an SVD's singular values go into B and A
SvdKind = Literal["auto", "factored", "dense", "sketch", "randomized"]
ResidualDtype = Literal["float32", "bfloat16", "float16"]
ServerOptKind = Literal["none", "avgm", "adam", "yogi", "adagrad"]
Average = Literal["factors", "products"]
InitSvd = Literal["dense", "randomized"]

# Other libraries' (and papers') names for these options, for the "did you mean" of an unknown one.
ALIASES = {"tau": "residual_energy", "energy": "residual_energy", "energy_threshold": "residual_energy",
           "threshold": "residual_energy", "svd_method": "svd", "merge_interval": "merge_every",
           "weights": "weighting", "aggregation_dtype": "dtype", "precision": "dtype", "random_seed": "seed",
           "batch": "batched", "compress": "compress_residual"}


@dataclass(frozen=True)
class MethodOptions:
    """What every method takes."""

    weighting: Weighting = key("examples", "client weights p_i: by example count, or equal")
    dtype: AggregationDtype = key("float32", "precision of the aggregation maths")
    seed: int = key(0, "seed of the fresh A rows a method draws (set from the run's seed)", at_least(0))
    batched: bool = key(True, "SVDs of equal-shaped layers in one batched call (same results; faster on a GPU)")
    server_opt: ServerOptKind = key("none", "server optimizer on the method's result (Reddi et al. 2021): avgm "
                                            "(FedAvgM), adam, yogi, adagrad")
    server_lr: float | None = key(None, "server learning rate η (none: 1 for avgm, 0.001 for adam, yogi, adagrad)",
                                  above(0))
    server_momentum: float = key(0.9, "avgm's momentum β", between(0, 1, open_high=True))
    server_betas: list[float] = key([0.9, 0.99], "adam, yogi and adagrad's β₁ and β₂, each in [0, 1)")
    server_eps: float = key(1e-3, "adam, yogi and adagrad's τ (the adaptivity)", above(0))


@dataclass(frozen=True)
class FedITOptions(MethodOptions):
    """Average A and B separately (the baseline; not exact: ΣpB·ΣpA ≠ ΣpBA)."""


@dataclass(frozen=True)
class FFALoRAOptions(MethodOptions):
    """Train and average B only; A stays at its seeded init on every client (exact)."""


@dataclass(frozen=True)
class RoLoRAOptions(MethodOptions):
    """Train B in even rounds and A in odd ones; average only that factor (exact)."""


@dataclass(frozen=True)
class FLoRAOptions(MethodOptions):
    """Fold s·Σ p_i B_i A_i into the backbone and restart the adapter every round (exact; any client ranks)."""


@dataclass(frozen=True)
class FedExLoRAOptions(MethodOptions):
    """Average A and B, and put the error s(ΣpBA − B'A') into the backbone (exact; client ranks ≤ lora_r)."""


@dataclass(frozen=True)
class FlexLoRAOptions(MethodOptions):
    """Truncated SVD of Σ p_i B_i A_i to rank r; the tail is dropped (not exact; any client ranks)."""

    split: Split = key("balanced", "√S on both factors (balanced) or S on B (left)")
    svd: SvdKind = key("auto", "SVD route: auto (by a cost model), factored or dense (exact), sketch (matrix-free "
                                "randomized, for residual_energy < 1), randomized (dense, as published code)")


@dataclass(frozen=True)
class FedMomentumOptions(MethodOptions):
    """SVD of Σ p_i B_i A_i: the top r components become the adapter, the rest up to r_eff go into the backbone
    (exact at residual_energy = 1; any client ranks)."""

    residual_energy: float = key(1.0, "τ: keep the smallest r_eff ≥ r holding τ of Σσ² (1 keeps every component)",
                                 between(0, 1, open_low=True))
    split: Split = key("balanced", "√S on both factors (balanced, the paper's) or S on B (left)")
    merge_residual: bool = key(True, "merge components r+1…r_eff into the backbone (false drops them: an ablation)")
    merge_every: int = key(1, "hold residuals on the server and release them every k rounds", at_least(1))
    svd: SvdKind = key("auto", "SVD route: auto (by a cost model), factored or dense (exact), sketch (matrix-free "
                                "randomized, for residual_energy < 1), randomized (dense, as published code)")
    compress_residual: bool = key(False, "send the residual as its own SVD components (rank ≤ (N−1)·r, not N·r)")
    residual_dtype: ResidualDtype = key("float32", "round the residual factors to 2 bytes a value before sending")


@dataclass(frozen=True)
class FRLoRAOptions(MethodOptions):
    """Start from the pre-trained weights' top-r SVD (PiSSA); each round fold s(B̄Ā − B₀A₀) into the backbone and
    restart from (A₀, B₀) (not exact unless average = products; one rank)."""

    train_A: bool = key(False, "train A too (false: A frozen at A₀, as the authors' released script)")
    average: Average = key("factors", "FedAvg of A and B (factors, the paper's) or the exact Σ p_i B_i A_i "
                                      "(products)")
    init_svd: InitSvd = key("dense", "SVD of the pre-trained weights: dense exact, or randomized (large layers)")


@dataclass(frozen=True)
class FedSALoRAOptions(MethodOptions):
    """Average A only; each client keeps its own B between rounds (the server's model uses Σ p_i B_i; one rank)."""


# name → options class, in the order the methods are listed
OPTIONS: dict[str, type[MethodOptions]] = {
    "fedit": FedITOptions,
    "ffa-lora": FFALoRAOptions,
    "rolora": RoLoRAOptions,
    "flora": FLoRAOptions,
    "fedex-lora": FedExLoRAOptions,
    "flexlora": FlexLoRAOptions,
    "fedmomentum": FedMomentumOptions,
    "frlora": FRLoRAOptions,
    "fedsa-lora": FedSALoRAOptions,
}
