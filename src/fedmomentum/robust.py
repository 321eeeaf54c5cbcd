"""Bounded influence of one client on a round: each client's update norm, and clipping it to ``k ×`` the round's
median norm.

A client's **update** is the change it made to its own model in the round, summed over the adapted layers in the
Frobenius norm: ``‖u_i‖ = (Σ_layers ‖s_i B_i A_i − s_i B⁰ A⁰‖²_F)^½``, where ``(A⁰, B⁰)`` is where the client
started (``Method.client_start``: the global adapter at the client's rank, with what the client keeps). For a client
at the global rank of a method that keeps nothing on the clients the start is the global ``(A, B)``, so
``u_i = s(B_i A_i − B A)``. The norm comes from small Gram matrices, never the dense ``d×k``: with
``ΔA = A_i − A⁰`` and ``ΔB = B_i − B⁰``, ``B_i A_i − B⁰ A⁰ = [ΔB, B⁰] [A_i; ΔA] = X Y`` and
``‖X Y‖²_F = Σ (XᵀX ⊙ Y Yᵀ)`` (``2r×2r`` matrices, float64).

**Clipping** (``clip="median"``): a client whose norm exceeds ``τ = k · median`` of the round's norms enters the
aggregation as a mixture of itself and its start, ``A_c = A⁰ + c ΔA``, ``B_c = B⁰ + c ΔB`` (the same rank, the same
weight ``p_i``; what it keeps is unchanged), with ``c ∈ [0, 1)`` chosen so that its update has norm ``τ`` (at most
``τ``, to float64 rounding). Every method takes it as an ordinary client:

- factor-averaging methods (``fedit``, ``fedsa-lora``, ``frlora``'s default, the adapter of ``fedex-lora``) average
  ``A_c`` and ``B_c``: the clipped client's factors moved back toward the start by ``1 − c``;
- a method that trains one factor at a time (``ffa-lora``, ``rolora``: ``ΔA = 0`` or ``ΔB = 0``) sees exactly the
  update ``c · u_i``;
- product-space methods (``fedmomentum``, ``flexlora``, ``flora``, the total change of ``fedex-lora``) see the
  product ``B_c A_c − B⁰A⁰ = c L + c² Q`` with ``L = ΔB A⁰ + B⁰ ΔA`` and ``Q = ΔB ΔA``: the first-order part of the
  update scaled by ``c``, the second-order part by ``c²``, and the norm is ``τ`` as for the others.

``c`` solves ``f(c) = s²‖c L + c² Q‖² = τ²``, a quartic whose three coefficients (``‖L‖²``, ``⟨L, Q⟩``, ``‖Q‖²``)
are Gram sums too, by bisection. Scaling the product itself (``c · u_i`` for every method) would need the
clipped client at rank ``r_i + r`` (``[c B_i, (1−c) B⁰] [A_i; A⁰]``), which factor-averaging methods and
``fedex-lora`` cannot take; the mixture keeps every method's input shape.

With one attacker among ``n ≥ 3`` clients the median lies between honest norms, so the attacker's update counts at
most ``k ×`` a typical honest one; with half the clients or more attacking, the median is theirs (not defended).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import torch

from .corrections import method_part
from .types import ClientUpdate, LoraPair, StateDict, Tensor

CLIPS = ("none", "median")
BISECTIONS = 60  # halvings of [0, 1]: c to float64 resolution


def _gram_sum(X: Tensor, Y: Tensor, Z: Tensor, W: Tensor) -> Tensor:
    """``⟨X Y, Z W⟩_F = Σ (XᵀZ ⊙ Y Wᵀ)`` without the ``d×k`` products."""
    return ((X.mT @ Z) * (Y @ W.mT)).sum()


def _differences(start: LoraPair, trained: LoraPair) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    A0, B0, A, B = (x.detach().to(torch.float64) for x in (start.A, start.B, trained.A, trained.B))
    if A0.shape != A.shape or B0.shape != B.shape:
        raise ValueError(f"a client's factors A {tuple(A.shape)}, B {tuple(B.shape)} do not match its start "
                         f"A {tuple(A0.shape)}, B {tuple(B0.shape)}")
    return A0, B0, A, B, A - A0.to(A.device), B - B0.to(B.device)


def layer_update_norm2(start: LoraPair, trained: LoraPair) -> float:
    """``‖B A − B⁰ A⁰‖²_F`` of one layer (no scaling), from ``2r×2r`` Gram matrices."""
    A0, B0, A, _, dA, dB = _differences(start, trained)
    X, Y = torch.cat([dB, B0.to(dB.device)], 1), torch.cat([A, dA], 0)
    return max(float(_gram_sum(X, Y, X, Y)), 0.0)


def update_norm(start: dict[str, LoraPair], trained: dict[str, LoraPair], scaling: float) -> float:
    """``‖u‖ = (Σ_layers ‖s (B A − B⁰ A⁰)‖²_F)^½``: how far a client moved its model from its start."""
    return abs(scaling) * math.sqrt(sum(layer_update_norm2(start[name], trained[name]) for name in start))


def quartic(start: dict[str, LoraPair], trained: dict[str, LoraPair], scaling: float) -> tuple[float, float, float]:
    """``(a, b, q)`` with ``‖u_c‖² = a c² + 2 b c³ + q c⁴`` for the mixture ``A⁰ + c ΔA``, ``B⁰ + c ΔB``:
    ``a = s²‖L‖²``, ``b = s²⟨L, Q⟩``, ``q = s²‖Q‖²`` summed over layers (``L = ΔB A⁰ + B⁰ ΔA``, ``Q = ΔB ΔA``)."""
    a = b = q = 0.0
    for name, pair in start.items():
        A0, B0, _, _, dA, dB = _differences(pair, trained[name])
        X, Y = torch.cat([dB, B0.to(dB.device)], 1), torch.cat([A0.to(dA.device), dA], 0)
        a += float(_gram_sum(X, Y, X, Y))
        b += float(_gram_sum(X, Y, dB, dA))
        q += float(_gram_sum(dB, dA, dB, dA))
    s2 = scaling * scaling
    return s2 * max(a, 0.0), s2 * b, s2 * max(q, 0.0)


def clip_fraction(coefficients: tuple[float, float, float], threshold: float) -> float:
    """The ``c ∈ [0, 1]`` with ``a c² + 2 b c³ + q c⁴ ≤ τ²`` (equal to it within float64 rounding) when the whole
    update (``c = 1``) exceeds ``τ``; 1.0 when it does not."""
    a, b, q = coefficients

    def f(c: float) -> float:
        return c * c * (a + c * (2 * b + c * q))

    limit = threshold * threshold
    if f(1.0) <= limit:
        return 1.0
    low, high = 0.0, 1.0  # f(low) ≤ τ² < f(high)
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        if f(middle) <= limit:
            low = middle
        else:
            high = middle
    return low


def mixture(start: dict[str, LoraPair], trained: dict[str, LoraPair], c: float) -> dict[str, LoraPair]:
    """``{layer: (A⁰ + c ΔA, B⁰ + c ΔB)}`` in the client's dtype and device."""
    mixed = {}
    for name, pair in trained.items():
        A0, B0 = start[name].A.to(pair.A), start[name].B.to(pair.B)
        mixed[name] = LoraPair(A0 + c * (pair.A - A0), B0 + c * (pair.B - B0))
    return mixed


def client_start(method, global_lora: dict[str, LoraPair], *, rank: int, client_scaling: float | None,
                 scaling: float, t: int, own: StateDict | None = None,
                 method_state: StateDict | None = None) -> dict[str, LoraPair]:
    """Where a client of ``rank`` (LoRA scaling ``client_scaling``) started round ``t``, as ``client.train_round``
    asks the method: the global adapter at the client's rank, with what the client kept (``own``,
    ``ServerState.clients``) and, for FlexLoRA above the global rank, the method's state (``ServerState.method``)."""
    other = rank != next(iter(global_lora.values())).rank
    return method.client_start(global_lora, own=method_part(own), t=t, rank=rank if other else None,
                               scaling=client_scaling if other else None, global_scaling=scaling if other else None,
                               state=method_state)


def bound_updates(method, global_lora: dict[str, LoraPair], kept: dict[str, StateDict], updates: list[ClientUpdate],
                  *, scaling: float, t: int, clip: str = "median", k: float = 2.0,
                  method_state: StateDict | None = None,
                  starts: list[dict[str, LoraPair] | None] | None = None) -> tuple[list[ClientUpdate], dict]:
    """Each update's norm and, with ``clip="median"``, the updates beyond ``k ×`` the median norm clipped to it.

    ``kept`` is what each client kept between rounds (``ServerState.clients``), ``method_state`` the method's state
    (``ServerState.method``: where FlexLoRA starts a client above the global rank). ``starts``: where each update
    started, where the server knows it (a straggler's: the adapter of the round it trained in), None for a client
    that started this round (``client_start``); a clipped update is mixed with its own start. Returns the updates
    to aggregate (the others unchanged; a clipped one keeps its ``keep``) and the round's record: ``update_norms``
    (client → ``‖u_i‖``), ``clip_threshold`` (``τ``, or None without clipping) and ``clipped`` (client → ``c``).
    """
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    if not updates:
        return updates, {"update_norms": {}, "clip_threshold": None, "clipped": {}}
    first = next(iter(global_lora))
    known = starts or [None] * len(updates)
    starts = [start if start is not None else
              client_start(method, global_lora, rank=u.factors[first].rank, client_scaling=u.scaling, scaling=scaling,
                           t=t, own=kept.get(u.client_id), method_state=method_state)
              for u, start in zip(updates, known, strict=True)]
    scalings = [scaling if u.scaling is None else float(u.scaling) for u in updates]
    norms = [update_norm(start, u.factors, s) for start, u, s in zip(starts, updates, scalings, strict=True)]
    names = [u.client_id or str(i) for i, u in enumerate(updates)]
    record = {"update_norms": dict(zip(names, norms, strict=True)), "clip_threshold": None, "clipped": {}}
    if clip == "none":
        return updates, record
    threshold = k * statistics.median(norms)
    record["clip_threshold"] = threshold
    bounded = []
    for name, start, update, s, norm in zip(names, starts, updates, scalings, norms, strict=True):
        if norm > threshold:
            c = clip_fraction(quartic(start, update.factors, s), threshold)
            update = replace(update, factors=mixture(start, update.factors, c))
            record["clipped"][name] = c
        bounded.append(update)
    return bounded, record


__all__ = ["CLIPS", "bound_updates", "client_start", "clip_fraction", "layer_update_norm2", "mixture", "quartic",
           "update_norm"]
