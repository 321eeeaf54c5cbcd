"""Accumulators for one layer of a round: each client's factors are folded in as its reply arrives, so the server
never holds every reply, and ``finish`` gives what the all-at-once route would.

- ``FactorSum``: ``Σ w_i X_i`` of one factor (FedIT-style averages of ``A`` and ``B``); exact.
- ``ProductSum``: ``Σ w_i L_i R_i`` (``B_i A_i``), exact: the terms' factors while they take less memory than the
  ``d×k`` matrix, then that matrix (one ``addmm`` a term); ``finish`` is its SVD by the factored route (the same
  computation as the all-at-once route on the same terms) or the dense one. Memory: at most about ``d×k``.
- ``ProductSketch``: a one-pass sketch of ``Σ w_i L_i R_i`` (``sketch.StreamSketch``), ``O((d + k) ℓ)`` memory;
  ``finish`` is the SVD of its rank-``ℓ`` approximation, with the estimated relative error in ``error``.

Weights: ``fold(..., weight=n_i)`` and ``finish()`` divides by ``Σ n_i`` (so ``p_i = n_i / Σ n_j`` without knowing
the total in advance); ``finish(scale=s)`` multiplies by ``s`` instead.
"""

from __future__ import annotations

import math

import torch

from ..types import Tensor
from .cost import exact_route
from .product import EXACT_KINDS, ProductSVD, stack
from .sketch import StreamSketch
from .spectrum import lowrank_norm


def _nbytes(tensors) -> int:
    return sum(X.numel() * X.element_size() for X in tensors if X is not None)


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"a term's weight must be finite, got {weight}")
    return weight


def _check_term(shape: tuple[int, int], left: Tensor, right: Tensor) -> None:
    d, k = shape
    if left.ndim != 2 or right.ndim != 2 or left.shape[0] != d or right.shape[1] != k \
            or left.shape[1] != right.shape[0]:
        raise ValueError(f"factors {tuple(left.shape)} @ {tuple(right.shape)} do not make a {d}×{k} term")


class FactorSum:
    """``Σ w_i X_i`` of equally shaped tensors, one at a time."""

    def __init__(self):
        self.total: Tensor | None = None
        self.weight = 0.0
        self.count = 0

    @property
    def nbytes(self) -> int:
        """The memory the sum holds."""
        return _nbytes([self.total])

    def fold(self, X: Tensor, weight: float = 1.0) -> None:
        weight = _check_weight(weight)
        if self.total is None:
            self.total = X * weight
        elif X.shape != self.total.shape:
            raise ValueError(f"a factor of shape {tuple(X.shape)} cannot join a sum of shape {tuple(self.total.shape)}")
        else:
            self.total.add_(X, alpha=weight)
        self.weight += weight
        self.count += 1

    def finish(self, scale: float | None = None) -> Tensor:
        """``scale · Σ w_i X_i`` (by default the weighted mean, ``scale = 1 / Σ w_i``)."""
        if self.total is None:
            raise ValueError("nothing was folded into the sum")
        return self.total * (1.0 / self.weight if scale is None else scale)


class ProductSum:
    """``Σ w_i L_i R_i`` of one ``d×k`` layer, exact, in memory bounded by about one ``d×k`` matrix (see the module
    notes). ``dtype``: the aggregation dtype (terms are cast to it)."""

    def __init__(self, shape: tuple[int, int], *, dtype: torch.dtype = torch.float32):
        self.shape, self.dtype = tuple(shape), dtype
        self.weight = 0.0
        self.count = 0
        self._lefts: list[Tensor] = []
        self._rights: list[Tensor] = []
        self._weights: list[float] = []
        self._dense: Tensor | None = None
        self._size = 0.0  # Σ |w_i| ‖L_i‖_F ‖R_i‖_F: the scale of the round-off in forming the sum

    @property
    def rank(self) -> int:
        """``Σ r_i`` of the terms folded in so far."""
        return sum(x.shape[1] for x in self._lefts) if self._dense is None else min(self.shape)

    @property
    def is_dense(self) -> bool:
        return self._dense is not None

    @property
    def nbytes(self) -> int:
        """The memory the sum holds (at most about one ``d×k`` matrix, and never more than the terms' factors)."""
        return _nbytes(self._lefts + self._rights + [self._dense])

    def fold(self, left: Tensor, right: Tensor, weight: float = 1.0) -> None:
        """Add ``weight · left @ right`` (copies what it keeps: the caller may reuse its tensors)."""
        weight = _check_weight(weight)
        _check_term(self.shape, left, right)
        left, right = left.to(self.dtype), right.to(self.dtype)
        self._size += abs(weight) * float(torch.linalg.vector_norm(left)) * float(torch.linalg.vector_norm(right))
        if self._dense is None:
            self._lefts.append(left.clone())
            self._rights.append(right.clone())
            self._weights.append(weight)
            if self.rank * sum(self.shape) > self.shape[0] * self.shape[1]:  # the factors outgrow the matrix
                self._dense = torch.matmul(*stack(self._lefts, self._rights, self._weights))
                self._lefts, self._rights, self._weights = [], [], []
        else:
            self._dense.addmm_(left, right, alpha=weight)
        self.weight += weight
        self.count += 1

    def finish(self, scale: float | None = None, kind: str = "auto") -> ProductSVD:
        """The exact SVD of ``scale · Σ w_i L_i R_i`` (``scale = 1 / Σ w_i`` by default). While the terms are held
        as factors, ``kind`` (``auto``, ``factored`` or ``dense``) is the route, ``auto`` choosing by cost; once the
        sum is dense it is the dense route."""
        if not self.count:
            raise ValueError("nothing was folded into the sum")
        if kind not in ("auto",) + EXACT_KINDS:
            raise ValueError(f"a product sum is decomposed exactly: kind must be auto, factored or dense, got {kind!r}")
        scale = 1.0 / self.weight if scale is None else float(scale)
        if self._dense is None:
            L, R = stack(self._lefts, self._rights, [w * scale for w in self._weights])
            return ProductSVD(L, R, exact_route(*self.shape, L.shape[1]) if kind == "auto" else kind)
        return ProductSVD.of_dense(self._dense * scale, (abs(scale) * self._size, 1.0))


    def norm(self, scale: float | None = None) -> float:
        """``‖scale · Σ w_i L_i R_i‖_F`` (``scale = 1 / Σ w_i`` by default), exactly: from the factors' QRs while
        they are held (``lowrank_norm``, no cancellation), else from the dense sum."""
        if not self.count:
            raise ValueError("nothing was folded into the sum")
        scale = 1.0 / self.weight if scale is None else float(scale)
        if self._dense is None:
            return abs(scale) * lowrank_norm(*stack(self._lefts, self._rights, self._weights))
        return abs(scale) * float(torch.linalg.matrix_norm(self._dense))


class ProductSketch:
    """``Σ w_i L_i R_i`` of one ``d×k`` layer as a one-pass sketch of width ``width`` (``sketch.StreamSketch``)."""

    def __init__(self, shape: tuple[int, int], width: int, *, probes: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.sketch = StreamSketch(shape, width, probes=probes, seed=seed, dtype=dtype, device=device)
        self.shape, self.dtype = tuple(shape), dtype
        self.weight = 0.0
        self.count = 0

    @property
    def nbytes(self) -> int:
        """The memory the sketch holds (fixed: ``O((d + k) width)``)."""
        s = self.sketch
        return _nbytes([s.Y, s.W, s.Z, s.Omega, s.Psi, s.G])

    def fold(self, left: Tensor, right: Tensor, weight: float = 1.0) -> None:
        """Add ``weight · left @ right``."""
        weight = _check_weight(weight)
        _check_term(self.shape, left, right)
        self.sketch.fold(left.to(self.dtype), right.to(self.dtype), weight)
        self.weight += weight
        self.count += 1

    def finish(self, scale: float | None = None) -> ProductSVD:
        """The SVD of the sketch's approximation of ``scale · Σ w_i L_i R_i`` (``route = "sketch"``, ``error``: its
        estimated relative error)."""
        if not self.count:
            raise ValueError("nothing was folded into the sketch")
        Q, B, error = self.sketch.range(1.0 / self.weight if scale is None else float(scale))
        return ProductSVD.of_range(Q, B, error)
