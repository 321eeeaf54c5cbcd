"""The SVD of a sum of low-rank products ``M = Σ w_i L_i R_i``, by one of four routes (``ProductSVD``).

``L_i: d×r_i`` and ``R_i: r_i×k``; stacking gives one product ``M = L R`` (``L: d×q``, ``R: q×k``, ``q = Σ r_i``).

* ``factored`` (exact, never forms ``M``): QR of ``L`` and of ``Rᵀ`` leaves a ``q×q`` core whose SVD is the SVD of
  the whole, at ``O((d + k) q² + q³)`` instead of ``O(d k min(d, k))``. The QR factors stay in Householder form
  (``torch.geqrf``): the singular values need only the triangular factors, and a method that needs only the
  leading ``n`` singular vectors pays ``O((d + k) q n)`` for them (``U(n)``, ``Vh(n)``).
* ``dense`` (exact): ``torch.linalg.svd`` of ``M`` formed by one matmul; cheaper than ``factored`` once ``q`` nears
  ``min(d, k)`` (``cost.py``).
* ``sketch`` (approximate, matrix-free): a randomized SVD whose products with ``M`` are taken factor by factor,
  grown until its estimated relative error is below ``tol`` (``sketch.py``); its cost is linear in ``q``.
  It is the exact SVD of ``M̃ = Q Qᵀ M``, and ``error`` is the estimated ``‖M − M̃‖_F / ‖M‖_F``.
* ``randomized``: ``torch.svd_lowrank`` of the dense ``M``, as published federated-LoRA code does (for parity).

``auto`` picks the cheaper exact route from the shapes (``routes.decompose`` may pick the sketch as well).
A ``ProductSVD`` takes a leading batch dimension (``L: b×d×q``, ``R: b×q×k``; factored and sketch routes), and
``svd[i]`` is matrix ``i`` of a batch (views, nothing recomputed).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..methods.option_specs import SvdKind
from ..types import LowRank, Tensor
from .cost import exact_route
from .sketch import SketchOptions, range_of
from .spectrum import numerical_rank, spectral_norm

SVD_KINDS = typing.get_args(SvdKind)  # declared with the methods' options
EXACT_KINDS = ("factored", "dense")


def stack(lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float] | None = None,
          out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``L @ R = Σ w_i lefts[i] @ rights[i]``; the weights go on the left factors.

    ``out``: an ``(L, R)`` pair of the right shapes to write into (one layer of a batch).
    """
    if weights is None:
        weights = [1.0] * len(lefts)
    if not (len(lefts) == len(rights) == len(weights)) or not lefts:
        raise ValueError(f"need as many lefts, rights and weights, and at least one: "
                         f"{len(lefts)}, {len(rights)}, {len(weights)}")
    L = torch.cat(list(lefts), 1) if out is None else torch.cat(list(lefts), 1, out=out[0])
    L *= torch.cat([torch.full((x.shape[1],), float(w), dtype=L.dtype, device=L.device)
                    for w, x in zip(weights, lefts, strict=True)])  # w_i on the columns of lefts[i]
    return L, torch.cat(list(rights), 0) if out is None else torch.cat(list(rights), 0, out=out[1])


@dataclass(frozen=True)
class Terms:
    """``Σ w_i lefts[i] @ rights[i]``, not yet stacked: the matrix a method asks the SVD of (see ``decompose``)."""

    lefts: list[Tensor]
    rights: list[Tensor]
    weights: list[float]

    def layout(self) -> tuple:
        """What must match for two layers' terms to be stacked into one batch."""
        return (tuple(x.shape for x in self.lefts), tuple(x.shape for x in self.rights),
                self.lefts[0].dtype, self.lefts[0].device)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(d, k, q)``: the sum is ``d×k`` and of rank at most ``q = Σ r_i``."""
        return self.lefts[0].shape[0], self.rights[0].shape[1], sum(x.shape[1] for x in self.lefts)

    def stacked(self, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return stack(self.lefts, self.rights, self.weights, out)


def _apply_q(reflectors: Tensor, tau: Tensor, X: Tensor) -> Tensor:
    """``Q @ X`` for the ``Q`` of ``torch.geqrf`` (kept implicit), ``X`` zero-padded to ``Q``'s rows."""
    missing = reflectors.shape[-2] - X.shape[-2]
    if missing > 0:
        X = torch.cat([X, X.new_zeros(*X.shape[:-2], missing, X.shape[-1])], -2)
    return torch.ormqr(reflectors, tau, X)


def _triangle(reflectors: Tensor) -> Tensor:
    """The triangular factor ``R`` that ``torch.geqrf`` leaves in the upper part of its output."""
    return torch.triu(reflectors[..., : min(reflectors.shape[-2:]), :])


class ProductSVD:
    """The thin SVD of ``M = L @ R`` by one route (see the module notes): the singular values in ``S``
    (``min(d, k, q)`` of them, or the sketch's width), singular vectors on request (``U(n)``, ``Vh(n)``: the
    leading ``n``, all by default). ``L`` and ``R`` stay available as ``.L`` and ``.R`` (a factorization of the
    matrix decomposed); ``S_cpu`` is ``S`` on the host (one copy per batch), for rank decisions and stats that would
    otherwise wait on the GPU once per layer. ``route`` names the route taken; ``error`` is the estimated relative
    error ``‖M − U S Vh‖_F / ‖M‖_F`` of the sketch (0 for the exact routes: round-off only).

    ``sketch``: the sketch's options; ``widest_term``: the largest ``r_i`` (sizes the sketch's first block).
    """

    def __init__(self, L: Tensor, R: Tensor, kind: str = "factored", *, sketch: SketchOptions | None = None,
                 widest_term: int | None = None):
        if kind not in SVD_KINDS:
            raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
        d, q, k = L.shape[-2], L.shape[-1], R.shape[-1]
        if kind == "auto":
            kind = exact_route(d, k, q)
        self.L, self.R, self.route = L, R, kind
        self._left = self._right = self._norms = None
        self._error = torch.zeros(L.shape[:-2], dtype=torch.float64)
        self.converged = True
        if kind == "factored":
            self._left = torch.geqrf(L)
            self._right = torch.geqrf(R.mT)
            core = _triangle(self._left[0]) @ _triangle(self._right[0]).mT
            self._U, self.S, self._Vh = torch.linalg.svd(core, full_matrices=False)
        elif kind == "sketch":
            Q, B, self._error, self.converged = range_of(L, R, sketch or SketchOptions(), widest_term or q)
            U, self.S, self._Vh = torch.linalg.svd(B, full_matrices=False)
            self._U = Q @ U
        else:
            if L.ndim != 2:
                raise ValueError(f"the {kind} svd takes one matrix at a time, got a batch of {L.shape[0]}")
            route = dense_svd if kind == "dense" else randomized_svd
            self._U, self.S, self._Vh = route(L @ R, min(d, k, q))
        self.S_cpu = self.S.cpu()

    @classmethod
    def of_range(cls, Q: Tensor, B: Tensor, error: Tensor, route: str = "sketch") -> ProductSVD:
        """The SVD of ``Q @ B`` (``Q`` orthonormal, ``d×ℓ``) as a sketch's result; ``L, R = Q, B``."""
        svd = object.__new__(cls)
        svd.L, svd.R, svd.route, svd._error, svd.converged = Q, B, route, error, True
        svd._left = svd._right = svd._norms = None
        U, svd.S, svd._Vh = torch.linalg.svd(B, full_matrices=False)
        svd._U = Q @ U
        svd.S_cpu = svd.S.cpu()
        return svd

    @classmethod
    def of_dense(cls, M: Tensor, norms: tuple[float, float]) -> ProductSVD:
        """The exact SVD of a dense ``M`` (an accumulated sum); ``L, R = U S, Vh``. ``norms`` stands in for
        ``factor_norms`` (the size of the terms the sum was formed from, which sets its round-off)."""
        svd = object.__new__(cls)
        svd._U, svd.S, svd._Vh = torch.linalg.svd(M, full_matrices=False)
        svd.L, svd.R, svd.route, svd.converged = svd._U * svd.S, svd._Vh, "dense", True
        svd._error = torch.zeros((), dtype=torch.float64)
        svd._left = svd._right = None
        svd._norms = norms
        svd.S_cpu = svd.S.cpu()
        return svd

    @property
    def error(self) -> float:
        """The estimated relative error of one matrix's SVD (see the class notes)."""
        return float(self._error)

    @property
    def energy(self) -> float:
        """``‖M‖_F² = Σ σ²`` of one matrix, including what a sketch's components miss (estimated from ``error``:
        ``‖M‖² = ‖M̃‖² + error² ‖M‖²``)."""
        captured = float((self.S_cpu.double() ** 2).sum())
        return captured / (1.0 - min(self.error, 0.5) ** 2)

    def __getitem__(self, index: int) -> ProductSVD:
        """Matrix ``index`` of a batched SVD (views of the batch's tensors; nothing is recomputed)."""
        part = object.__new__(ProductSVD)
        part.L, part.R, part.S, part.S_cpu, part._U, part._Vh, part._error = (
            x[index] for x in (self.L, self.R, self.S, self.S_cpu, self._U, self._Vh, self._error))
        part.route, part.converged, part._norms = self.route, self.converged, None
        part._left, part._right = (None, None) if self._left is None else (
            (r[index], tau[index]) for r, tau in (self._left, self._right))
        return part

    def U(self, n: int | None = None) -> Tensor:
        """The leading ``n`` left singular vectors, ``d×n``."""
        U = self._U[..., :n]
        return U if self._left is None else _apply_q(*self._left, U).contiguous()

    def Vh(self, n: int | None = None) -> Tensor:
        """The leading ``n`` right singular vectors as rows, ``n×k``."""
        Vh = self._Vh[..., :n, :]
        return Vh if self._right is None else _apply_q(*self._right, Vh.mT).mT

    def factor_norms(self) -> tuple[float, float]:
        """``‖L‖₂`` and ``‖R‖₂`` of one matrix's factors (from the QRs' small triangular factors when there are)."""
        if self._norms is not None:
            return self._norms
        if self._left is None:
            return spectral_norm(self.L), spectral_norm(self.R)
        return spectral_norm(_triangle(self._left[0])), spectral_norm(_triangle(self._right[0]))


def factored_svd(
    lefts: Sequence[Tensor],
    rights: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD ``(U, S, Vh)`` of ``Σ w_i lefts[i] @ rights[i]``, never forming the ``d×k`` matrix.

    Returns ``min(d, k, Σ r_i)`` components, singular values in descending order (trailing ones may be
    numerically zero when the sum is rank deficient; see ``numerical_rank``).
    """
    return svd_of_sum(lefts, rights, weights, "factored", dtype)


def dense_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of the dense matrix, truncated to ``rank`` components: the reference and the slow path."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def randomized_svd(M: Tensor, rank: int, niter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.svd_lowrank`` on the dense matrix, as published federated-LoRA code does (for parity)."""
    with torch.random.fork_rng(devices=[M.device] if M.is_cuda else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M, q=rank, niter=niter)
    return U, S, V.mT


def svd_of_sum(
    lefts: Sequence[Tensor],
    rights: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    kind: str = "factored",
    dtype: torch.dtype = torch.float32,
    sketch: SketchOptions | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``Σ w_i lefts[i] @ rights[i]`` by the chosen route; every route returns ``≤ Σ r_i`` components."""
    if kind not in SVD_KINDS:
        raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
    svd = ProductSVD(*stack([x.to(dtype) for x in lefts], [x.to(dtype) for x in rights], weights), kind,
                     sketch=sketch, widest_term=max(x.shape[1] for x in lefts))
    return svd.U(), svd.S, svd.Vh()


def compress(delta: LowRank, svd: ProductSVD | None = None) -> LowRank:
    """The same matrix with its factors cut to its numerical rank (``U S`` on the left, ``Vh`` on the right).

    Besides numpy's rule (relative to ``σ_1``), components at the round-off of forming ``left @ right`` at all
    (``ε √max(d, k) ‖left‖₂ ‖right‖₂``) are dropped, so terms that cancel (``B A − B A``) compress to rank 0.
    ``svd``: the ``ProductSVD`` of ``delta.left @ delta.right`` when it was already taken (``decompose``).
    """
    if delta.rank == 0:
        return delta
    svd = ProductSVD(delta.left, delta.right) if svd is None else svd
    left_norm, right_norm = svd.factor_norms()
    floor = left_norm * right_norm * max(delta.shape) ** 0.5
    keep = min(numerical_rank(svd.S_cpu, (delta.rank,) + delta.shape),
               int((svd.S_cpu > floor * torch.finfo(svd.S.dtype).eps).sum()))
    return LowRank(svd.U(keep) * svd.S[:keep], svd.Vh(keep).contiguous())
