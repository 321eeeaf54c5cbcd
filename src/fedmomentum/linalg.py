"""SVDs of sums of low-rank products, without forming the dense matrix, and the energy split.

``Σ w_i L_i R_i`` with ``L_i: d×r_i`` and ``R_i: r_i×k`` has rank ``q ≤ Σ r_i``. Stacking gives one product
``L R`` (``L: d×q``, ``R: q×k``); QR of ``L`` and of ``Rᵀ`` leaves a ``q×q`` core whose SVD is the SVD of the
whole, exactly, at ``O((d+k) q²)`` instead of ``O(d k min(d, k))``.

The QR factors stay in Householder form (``torch.geqrf``): the singular values need only the triangular
factors, and a method that needs only the leading ``n`` singular vectors pays ``O((d+k) q n)`` for them
(``ProductSVD.U(n)`` / ``ProductSVD.Vh(n)``) instead of forming both ``d×q`` and ``k×q`` orthonormal bases.

A round's layers come in a few shapes (q, k, v, o of every block), so ``svds`` stacks the layers of equal shape
into one batch and decomposes each batch with single batched calls: on a GPU one layer's QRs are far too small to
keep it busy, so the per-layer route is bound by latency. ``ProductSVD`` takes a leading batch dimension, and
``svd[i]`` is layer ``i`` of a batch (views, nothing recomputed).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .methods.option_specs import SvdKind
from .types import LowRank, Tensor

SVD_KINDS = typing.get_args(SvdKind)  # declared with the methods' options


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
    """``Σ w_i lefts[i] @ rights[i]``, not yet stacked: the matrix a method asks the SVD of (see ``svds``)."""

    lefts: list[Tensor]
    rights: list[Tensor]
    weights: list[float]

    def layout(self) -> tuple:
        """What must match for two layers' terms to be stacked into one batch."""
        return (tuple(x.shape for x in self.lefts), tuple(x.shape for x in self.rights),
                self.lefts[0].dtype, self.lefts[0].device)

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
    """The thin SVD of ``L @ R`` (``L: d×q``, ``R: q×k``): all ``min(d, k, q)`` singular values in ``S``,
    singular vectors on request (``U(n)``, ``Vh(n)``: the leading ``n``, all by default). ``L`` and ``R`` stay
    available as ``.L`` and ``.R``; ``S_cpu`` is ``S`` on the host (one copy per batch), for rank decisions and stats
    that would otherwise wait on the GPU once per layer.

    ``kind="factored"`` (exact, never forms ``L @ R``): Householder QR of ``L`` and ``Rᵀ`` and the SVD of the
    small core ``T_L T_Rᵀ``; ``U(n)``/``Vh(n)`` apply the implicit ``Q`` to ``n`` core vectors. It takes a
    batch as well (``L: b×d×q``, ``R: b×q×k``): ``svd[i]`` is layer ``i``.
    ``"dense"`` (exact SVD of the dense matrix) and ``"randomized"`` (``torch.svd_lowrank`` on it, as
    published code does) are there for parity and benchmarks (one matrix at a time).
    """

    def __init__(self, L: Tensor, R: Tensor, kind: str = "factored"):
        if kind not in SVD_KINDS:
            raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
        self.L, self.R = L, R
        if kind == "factored":
            self._left = torch.geqrf(L)
            self._right = torch.geqrf(R.mT)
            core = _triangle(self._left[0]) @ _triangle(self._right[0]).mT
            self._U, self.S, self._Vh = torch.linalg.svd(core, full_matrices=False)
        else:
            if L.ndim != 2:
                raise ValueError(f"the {kind} svd takes one matrix at a time, got a batch of {L.shape[0]}")
            self._left = self._right = None
            route = dense_svd if kind == "dense" else randomized_svd
            self._U, self.S, self._Vh = route(L @ R, min(L.shape[0], L.shape[1], R.shape[1]))
        self.S_cpu = self.S.cpu()

    def __getitem__(self, index: int) -> ProductSVD:
        """Layer ``index`` of a batched SVD (views of the batch's tensors; nothing is recomputed)."""
        part = object.__new__(ProductSVD)
        part.L, part.R, part.S, part.S_cpu, part._U, part._Vh = (
            x[index] for x in (self.L, self.R, self.S, self.S_cpu, self._U, self._Vh))
        part._left, part._right = ((r[index], tau[index]) for r, tau in (self._left, self._right))
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
        if self._left is None:
            return spectral_norm(self.L), spectral_norm(self.R)
        return spectral_norm(_triangle(self._left[0])), spectral_norm(_triangle(self._right[0]))


def svds(terms: dict[str, Terms], kind: str = "factored", batched: bool = True) -> dict[str, ProductSVD]:
    """The ``ProductSVD`` of each layer's terms.

    ``batched`` (the factored route only): the layers whose terms have the same layout are stacked straight into
    one ``b×d×q`` / ``b×q×k`` pair and decomposed together; the results equal the per-layer route's. The layers'
    ``svd.L`` / ``svd.R`` are then views of the batch (disjoint, contiguous).
    """
    if not (batched and kind == "factored"):
        return {name: ProductSVD(*t.stacked(), kind) for name, t in terms.items()}
    groups: dict[tuple, list[str]] = {}
    for name, t in terms.items():
        groups.setdefault(t.layout(), []).append(name)
    result = {}
    for names in groups.values():
        first = terms[names[0]]
        d, k = first.lefts[0].shape[0], first.rights[0].shape[1]
        q = sum(x.shape[1] for x in first.lefts)
        L = first.lefts[0].new_empty(len(names), d, q)
        R = first.rights[0].new_empty(len(names), q, k)
        for i, name in enumerate(names):
            terms[name].stacked(out=(L[i], R[i]))
        batch = ProductSVD(L, R)
        result.update((name, batch[i]) for i, name in enumerate(names))
    return result


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
) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``Σ w_i lefts[i] @ rights[i]`` by the chosen route; every route returns ``≤ Σ r_i`` components."""
    if kind not in SVD_KINDS:
        raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
    svd = ProductSVD(*stack([x.to(dtype) for x in lefts], [x.to(dtype) for x in rights], weights), kind)
    return svd.U(), svd.S, svd.Vh()


def numerical_rank(S: Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values are above round-off (numpy's ``matrix_rank`` rule)."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    tol = S[0] * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


def energy_rank(S: Tensor, rank: int, energy: float) -> int:
    """Smallest ``r_eff ≥ rank`` whose leading components hold ``energy`` of ``Σ σ²``.

    Never more than the nonzero components, so ``energy = 1`` keeps exactly the nonzero spectrum.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"residual_energy must be in (0, 1], got {energy}")
    nonzero = numerical_rank(S, (S.numel(),))
    if nonzero <= rank:
        return rank
    if energy >= 1.0:
        return nonzero
    cumulative = torch.cumsum(S.double() ** 2, 0)
    needed = int((cumulative < energy * cumulative[-1]).sum()) + 1
    return min(max(rank, needed), nonzero)


def lowrank_norm(left: Tensor, right: Tensor) -> float:
    """``‖left @ right‖_F`` from the ``q×q`` core of two QRs (no cancellation, no ``d×k`` matrix)."""
    R_left = torch.linalg.qr(left, mode="r")[1]
    R_right = torch.linalg.qr(right.mT, mode="r")[1]
    return float(torch.linalg.matrix_norm(R_left @ R_right.mT))


def spectral_norm(X: Tensor) -> float:
    """``‖X‖₂`` of a thin (or wide) matrix, from its small Gram matrix."""
    gram = X.mT @ X if X.shape[0] >= X.shape[1] else X @ X.mT
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt()) if gram.numel() else 0.0


def compress(delta: LowRank, svd: ProductSVD | None = None) -> LowRank:
    """The same matrix with its factors cut to its numerical rank (``U S`` on the left, ``Vh`` on the right).

    Besides numpy's rule (relative to ``σ_1``), components at the round-off of forming ``left @ right`` at all
    (``ε √max(d, k) ‖left‖₂ ‖right‖₂``) are dropped, so terms that cancel (``B A − B A``) compress to rank 0.
    ``svd``: the factored ``ProductSVD`` of ``delta.left @ delta.right`` when it was already taken (``svds``).
    """
    if delta.rank == 0:
        return delta
    svd = ProductSVD(delta.left, delta.right) if svd is None else svd
    left_norm, right_norm = svd.factor_norms()
    floor = left_norm * right_norm * max(delta.shape) ** 0.5
    keep = min(numerical_rank(svd.S_cpu, (delta.rank,) + delta.shape),
               int((svd.S_cpu > floor * torch.finfo(svd.S.dtype).eps).sum()))
    return LowRank(svd.U(keep) * svd.S[:keep], svd.Vh(keep).contiguous())
