"""Randomized SVDs of ``M = L R`` that never form ``M``: every product with ``M`` is taken factor by factor.

Two-pass, all factors at hand (``range_of``): a blocked randomized range finder (Halko, Martinsson & Tropp 2011,
algorithm 4.4, with power iterations; blocked as in Martinsson & Voronin 2016). Blocks of Gaussian vectors are
added until the captured part ``Q Qᵀ M`` holds all but ``tol`` of ``‖M‖_F`` (relative). The error is measured with
``probes`` further Gaussian vectors ``G``: ``E ‖(M − Q Qᵀ M) g‖² = ‖M − Q Qᵀ M‖_F²`` for a standard Gaussian ``g``,
so ``‖(I − Q Qᵀ) M G‖_F² / probes`` estimates the squared error without ``M``.

One pass, one term at a time (``StreamSketch``): Tropp, Yurtsever, Udell & Cevher (2017), *Practical sketching
algorithms for low-rank matrix approximation*, §4: the server keeps ``Y = M Ω``, ``W = Ψ M`` and ``Z = M G``,
each updated linearly by every client's ``w_i L_i R_i``; at the end ``Q = orth(Y)``, ``X = (Ψ Q)⁺ W`` and
``M ≈ Q X``. Memory ``O((d + k) ℓ)`` whatever the number of terms; exact (to round-off) while ``Σ r_i ≤ ℓ``.

Both return ``(Q, B, error)`` with ``M ≈ Q B``, ``Q`` orthonormal (``d×ℓ``), and the estimated relative error
``‖M − Q B‖_F / ‖M‖_F`` per matrix. Everything takes a leading batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import Tensor


@dataclass(frozen=True)
class SketchOptions:
    """``tol``: the relative Frobenius error to reach (two-pass only); ``oversample``: columns beyond twice the
    widest term's rank in the first block; ``niter``: power iterations per block (sharper for slowly decaying
    spectra); ``probes``: Gaussian test vectors for the error estimate; ``max_width``: cap on the sketch's width
    (default ``min(d, k, q)``, where the sketch is exact); ``seed``: the Gaussian vectors' seed."""

    tol: float = 1e-2
    oversample: int = 10
    niter: int = 2
    probes: int = 10
    max_width: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.tol < 1.0:
            raise ValueError(f"sketch tol must be in (0, 1), got {self.tol}")
        for name in ("oversample", "niter", "probes"):
            if int(getattr(self, name)) < 0 or (name == "probes" and self.probes < 1):
                raise ValueError(f"sketch {name} must be a non-negative integer (probes ≥ 1), got "
                                 f"{getattr(self, name)}")

    def first_width(self, widest_term: int) -> int:
        return 2 * widest_term + self.oversample


def _gaussian(generator: torch.Generator, like: Tensor, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=like.dtype, device=like.device)


def _orthonormal(Y: Tensor, Q: Tensor | None) -> Tensor:
    """An orthonormal basis of ``Y``'s columns with ``Q``'s span projected out (twice: "twice is enough")."""
    for _ in range(2):
        if Q is not None and Q.shape[-1]:
            Y = Y - Q @ (Q.mT @ Y)
        Y = torch.linalg.qr(Y).Q
    return Y


def _squared_norms(X: Tensor) -> Tensor:
    return (X.double() ** 2).sum((-2, -1))


def range_of(L: Tensor, R: Tensor, options: SketchOptions, widest_term: int) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``(Q, B, error, converged)`` for ``M = L @ R``: the blocked range finder above, grown until every matrix of
    the batch has ``error ≤ tol`` or the width reaches ``max_width``; ``converged`` says which happened."""
    d, q, k = L.shape[-2], L.shape[-1], R.shape[-1]
    batch = L.shape[:-2]
    cap = min(d, k, q, options.max_width or q)
    generator = torch.Generator(device=L.device).manual_seed(options.seed)

    def times(X: Tensor) -> Tensor:  # M X
        return L @ (R @ X)

    def times_t(Y: Tensor) -> Tensor:  # Mᵀ Y
        return R.mT @ (L.mT @ Y)

    Z = times(_gaussian(generator, L, *batch, k, options.probes))  # the probes' images, deflated as Q grows
    Q = L.new_zeros(*batch, d, 0)
    B = L.new_zeros(*batch, 0, k)
    block = max(1, options.first_width(widest_term))
    error = torch.ones(batch, dtype=torch.float64)
    while Q.shape[-1] < cap:
        width = min(block, cap - Q.shape[-1])
        Y = _orthonormal(times(_gaussian(generator, L, *batch, k, width)), Q)
        for _ in range(options.niter):  # power iterations on what Q does not capture yet
            Y = _orthonormal(times(torch.linalg.qr(times_t(Y)).Q), Q)
        Q = torch.cat([Q, Y], -1)
        B = torch.cat([B, (Y.mT @ L) @ R], -2)
        Z = Z - Y @ (Y.mT @ Z)
        tail = _squared_norms(Z).cpu() / options.probes
        error = (tail / (_squared_norms(B).cpu() + tail).clamp(min=torch.finfo(torch.float64).tiny)).sqrt()
        if bool((error <= options.tol).all()):
            return Q, B, error, True
    return Q, B, error, Q.shape[-1] >= min(d, k, q)  # at full width the range is all of M's


class StreamSketch:
    """A one-pass sketch of ``Σ w_i L_i R_i`` (``d×k``), folded in one term at a time (see the module notes).

    ``width`` ``ℓ``: columns of ``Y = M Ω``; ``W = Ψ M`` has ``2ℓ + 1`` rows (Tropp et al.'s choice), ``Z = M G``
    has ``probes`` columns. The test matrices are drawn once, from ``seed``.
    """

    def __init__(self, shape: tuple[int, int], width: int, *, probes: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        d, k = shape
        if width < 1 or probes < 1:
            raise ValueError(f"a sketch needs width ≥ 1 and probes ≥ 1, got {width} and {probes}")
        self.shape, self.width = (d, k), min(width, d, k)
        generator = torch.Generator(device=device).manual_seed(seed)
        like = torch.empty(0, dtype=dtype, device=device)
        self.Omega = _gaussian(generator, like, k, self.width)
        self.Psi = _gaussian(generator, like, min(2 * self.width + 1, d), d)
        self.G = _gaussian(generator, like, k, probes)
        self.Y = like.new_zeros(d, self.width)
        self.W = like.new_zeros(self.Psi.shape[0], k)
        self.Z = like.new_zeros(d, probes)

    def fold(self, left: Tensor, right: Tensor, weight: float = 1.0) -> None:
        """Add ``weight · left @ right``."""
        self.Y.addmm_(left, right @ self.Omega, alpha=weight)
        self.Z.addmm_(left, right @ self.G, alpha=weight)
        self.W.addmm_(self.Psi @ left, right, alpha=weight)

    def range(self, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q, B, error)`` with ``scale · M ≈ Q B``."""
        Q = torch.linalg.qr(self.Y).Q
        B = torch.linalg.lstsq(self.Psi @ Q, self.W).solution * scale
        Z = self.Z * scale
        tail = _squared_norms(Z - Q @ (B @ self.G))
        error = (tail / _squared_norms(Z).clamp(min=torch.finfo(torch.float64).tiny)).sqrt()
        return Q, B, error.cpu()
