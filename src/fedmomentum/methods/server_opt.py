"""Server optimizers on top of any method (Reddi et al., *Adaptive Federated Optimization*, ICLR 2021): FedAvgM,
FedAdam, FedYogi and FedAdagrad.

The method proposes the next global model ``x'_t``; the pseudo-update is ``Δ_t = x'_t − x_t`` (what the method would
set minus the current global). The optimizer turns it into its own step ``u_t`` and the next global model is

    x_{t+1} = x'_t + (u_t − Δ_t)

the method's proposal plus a correction. ``avgm`` with ``β = 0, η = 1`` gives ``u_t = Δ_t``: the correction is exactly
zero and the method's own result comes back bit for bit, with no special case. The steps, with ``m_0 = 0`` and
``v_0 = τ²`` (Reddi et al.'s Algorithm 2, no bias correction):

- ``avgm``:    ``m_t = β m_{t−1} + Δ_t``; ``u_t = η m_t`` (Hsu et al. 2019; Flower's FedAvgM);
- ``adam``:    ``m_t = β₁ m_{t−1} + (1 − β₁) Δ_t``, ``v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²``; ``u_t = η m_t / (√v_t + τ)``;
- ``yogi``:    as ``adam`` with ``v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)``;
- ``adagrad``: as ``adam`` with ``v_t = v_{t−1} + Δ_t²``.

Where it acts (``Method.update_space``):

- ``"factors"`` (fedit, ffa-lora, rolora, fedsa-lora: methods that average the factors): on the factors the server
  sends back that round (``Method.shared``), elementwise, as OpenFedLLM does; moments per factor, ``A``- and
  ``B``-shaped (slots ``opt_m_A``, ``opt_v_A``, ``opt_m_B``, ``opt_v_B``).
- ``"product"`` (fedmomentum, fedex-lora, flora, flexlora, frlora: methods whose result is a product ``s B' A'``
  plus a backbone delta ``D``, with factors that may rotate or restart from round to round): on the layer's
  effective weight ``W + s B A``, so ``Δ_t = D + s (B' A' − B A)``. The method's adapter is kept as it proposes it
  and the correction ``u_t − Δ_t`` goes into the backbone delta. ``avgm`` keeps ``m_t`` factored (slots
  ``opt_m_left`` / ``opt_m_right``), cut to its numerical rank every round (``linalg.compress``): exact, no ``d×k``
  matrix, but its rank grows by up to ``rank(Δ_t)`` a round; once its factors would take as much room as the dense
  ``d×k`` matrix it is kept dense (slot ``opt_m``). ``adam`` / ``yogi`` /
  ``adagrad`` need elementwise moments of the dense ``d×k`` matrix (``Δ²`` of a low-rank matrix is not low rank): two
  dense ``d×k`` moments per layer (slots ``opt_m``, ``opt_v``), as much memory (and checkpoint) as two float32 copies
  of the adapted weights, and a backbone delta of up to full rank (factored back at its numerical rank).
"""

from __future__ import annotations

import torch

from ..linalg import compress
from ..types import LoraPair, LowRank, Tensor

SERVER_OPTS = ("none", "avgm", "adam", "yogi", "adagrad")
PREFIX = "opt_"  # the method state's slots that belong to the server optimizer
DEFAULT_LR = {"avgm": 1.0, "adam": 1e-3, "yogi": 1e-3, "adagrad": 1e-3}  # OpenFedLLM's fedopt_eta for the adaptive
DEFAULT_BETAS = (0.9, 0.99)


class ServerOpt:
    """One optimizer's settings; ``step`` advances the moments of one tensor, ``factors`` / ``product`` one layer."""

    def __init__(self, kind: str, lr: float, momentum: float, betas: tuple[float, float], eps: float):
        self.kind, self.lr, self.momentum, self.betas, self.eps = kind, lr, momentum, betas, eps

    def step(self, delta: Tensor, m: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(u_t, m_t, v_t)`` from ``Δ_t`` and the moments after round ``t − 1`` (None before the first)."""
        if self.kind == "avgm":
            m = delta if m is None else self.momentum * m + delta
            return self.lr * m, m, None
        beta1, beta2 = self.betas
        m = (1 - beta1) * delta if m is None else beta1 * m + (1 - beta1) * delta
        if v is None:
            v = torch.full_like(delta, self.eps**2)
        square = delta * delta
        if self.kind == "adam":
            v = beta2 * v + (1 - beta2) * square
        elif self.kind == "yogi":
            v = v - (1 - beta2) * square * torch.sign(v - square)
        else:  # adagrad
            v = v + square
        return self.lr * m / (v.sqrt() + self.eps), m, v

    def factors(self, global_pair: LoraPair, new: LoraPair, shared: dict[str, bool],
                state: dict[str, Tensor]) -> tuple[LoraPair, dict[str, Tensor]]:
        """The adapter after the step on each shared factor, and the layer's optimizer state."""
        out, slots = {"A": new.A, "B": new.B}, {}
        for factor in ("A", "B"):
            m, v = state.get(f"{PREFIX}m_{factor}"), state.get(f"{PREFIX}v_{factor}")
            if shared[factor]:
                proposal = out[factor]
                delta = proposal - getattr(global_pair, factor)
                u, m, v = self.step(delta, m, v)
                out[factor] = proposal + (u - delta)
            slots.update({f"{PREFIX}m_{factor}": m, f"{PREFIX}v_{factor}": v})
        return LoraPair(out["A"], out["B"]), {k: t for k, t in slots.items() if t is not None}

    def product(self, global_pair: LoraPair, new: LoraPair, backbone: LowRank | None, scaling: float,
                state: dict[str, Tensor]) -> tuple[LowRank | None, dict[str, Tensor], int | None]:
        """The backbone delta after the step on ``W + s B A`` (the adapter stays the method's), the layer's optimizer
        state, and the momentum's rank (``avgm``; None for the dense moments)."""
        delta = pseudo_update(global_pair, new, backbone, scaling)
        if self.kind == "avgm":
            return self._avgm(delta, backbone, state, global_pair.shape)
        dense = (delta.dense() if delta is not None
                 else global_pair.B.new_zeros(global_pair.shape))
        u, m, v = self.step(dense, state.get(f"{PREFIX}m"), state.get(f"{PREFIX}v"))
        total = u - dense
        if backbone is not None:
            total = total + backbone.dense()
        return from_dense(total), {f"{PREFIX}m": m, f"{PREFIX}v": v}, None

    def _avgm(self, delta: LowRank | None, backbone: LowRank | None, state: dict[str, Tensor],
              shape: tuple[int, int]) -> tuple[LowRank | None, dict[str, Tensor], int | None]:
        """``m_t = β m_{t−1} + Δ_t`` and the correction ``η m_t − Δ_t = ηβ m_{t−1} + (η − 1) Δ_t``. ``m`` stays
        factored, cut to its numerical rank, while its factors take less room than the dense ``d×k`` matrix, and is
        dense from then on; a zero term (``β = 0``, ``η = 1``) is left out, so a zero correction leaves the delta as it
        was."""
        if f"{PREFIX}m" in state:
            previous: LowRank | Tensor | None = state[f"{PREFIX}m"]
        elif f"{PREFIX}m_left" in state:
            previous = LowRank(state[f"{PREFIX}m_left"], state[f"{PREFIX}m_right"])
        else:
            previous = None
        momentum = _combine([(self.momentum, previous), (1.0, delta)])
        d, k = shape
        if isinstance(momentum, LowRank) and (d + k) * momentum.rank >= d * k:
            momentum = momentum.dense()  # as large as the dense matrix: cheaper to keep dense
        correction = _combine([(self.lr * self.momentum, previous), (self.lr - 1.0, delta)])
        if isinstance(correction, Tensor):
            backbone = from_dense(correction if backbone is None else correction + backbone.dense())
        elif correction is not None and correction.rank > 0:
            backbone = correction if backbone is None else compress(backbone + correction)
        if isinstance(momentum, Tensor):
            return backbone, {f"{PREFIX}m": momentum}, None
        if momentum is None or momentum.rank == 0:
            return backbone, {}, 0
        return backbone, {f"{PREFIX}m_left": momentum.left, f"{PREFIX}m_right": momentum.right}, momentum.rank


def pseudo_update(global_pair: LoraPair, new: LoraPair, backbone: LowRank | None, scaling: float) -> LowRank | None:
    """``Δ = D + s (B' A' − B A)`` in factored form (None when nothing changed); the adapter terms are left out when
    the method kept the adapter as it was (FRLoRA's ``(A₀, B₀)``), so they do not cancel in round-off."""
    terms = [] if backbone is None else [backbone]
    if not (torch.equal(new.A, global_pair.A) and torch.equal(new.B, global_pair.B)):
        terms.append(LowRank(torch.cat([scaling * new.B, -scaling * global_pair.B], 1),
                             torch.cat([new.A, global_pair.A], 0)))
    return _sum(terms) if terms else None


def from_dense(X: Tensor) -> LowRank:
    """A dense ``d×k`` matrix as factors at its numerical rank (``linalg.compress`` of ``X @ I`` or ``I @ X``)."""
    d, k = X.shape
    if d >= k:
        return compress(LowRank(X, torch.eye(k, dtype=X.dtype, device=X.device)))
    return compress(LowRank(torch.eye(d, dtype=X.dtype, device=X.device), X))


def _combine(terms: list[tuple[float, LowRank | Tensor | None]]) -> LowRank | Tensor | None:
    """``Σ c_i x_i`` without the zero terms (None when none is left): factors cut to their numerical rank when every
    ``x_i`` is factored, a dense matrix when one is dense."""
    terms = [(c, x) for c, x in terms if x is not None and c != 0.0]
    if not terms:
        return None
    if any(isinstance(x, Tensor) for _, x in terms):
        return sum(c * (x if isinstance(x, Tensor) else x.dense()) for c, x in terms)
    return compress(_sum([LowRank(c * x.left, x.right) for c, x in terms]))


def _sum(terms: list[LowRank]) -> LowRank:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
