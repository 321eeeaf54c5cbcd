"""Stragglers: an update that arrives rounds after the client trained it, re-based onto the current global adapter.

A straggler of round u trained from round u's global adapter; its update is aggregated in round u + k
(``schedule.participation``), when the global adapter has moved on. FedMomentum, FlexLoRA and FLoRA rebuild the
adapter every round (an SVD, or a restart), so the client's factors belong to an older basis: aggregated as they
are, they would pull the model back to where it was k rounds ago. ``rebase`` keeps what the client *changed* and
applies that change to the current adapter, by the rule its method aggregates with:

- ``product`` (methods that aggregate the products ``Σ p_i B_i A_i`` and take updates of any rank: fedmomentum,
  flexlora, flora): the stacked factors ``B' = [B_now | B_i | −B_then]``, ``A' = [A_now; A_i; A_then]``, so that
  ``s B'A' = s (B_now A_now + B_i A_i − B_then A_then)`` exactly: the client's change of the product, applied to the
  current product (rank ``r + 2 r_i``; concatenation only, so no rounding);
- ``factors`` (methods that average the factors: fedit, ffa-lora, rolora, frlora, and fedex-lora, which averages
  every update into the global rank): ``A' = A_now + (A_i − A_then)``, ``B' = B_now + (B_i − B_then)``, the change
  of each factor. Exact for frlora (every round starts from the same ``(A₀, B₀)``, so ``now = then``) and ffa-lora
  (``A`` never changes).

Pure maths: tensors in, tensors out; what is pending between rounds is ``state.Pending``, in the server's state.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .methods.base import Method, _rescaled
from .types import ClientUpdate, LoraPair

PRODUCT, FACTORS = "product", "factors"


def rule(method: Method, rank: int) -> str:
    """How ``method`` takes a late update against a global adapter of ``rank``: ``product`` when it aggregates the
    products and takes updates above the global rank, else ``factors`` (fedex-lora: its adapter is the average of
    the factors at the global rank)."""
    if method.update_space != "product" or not method.mixed_ranks:
        return FACTORS
    try:
        method.check_ranks(rank, [3 * rank])
    except ValueError:
        return FACTORS
    return PRODUCT


def refusal(config, method: Method) -> str | None:
    """Why ``method`` (with ``config``) cannot take late updates, in a few words; None when it can."""
    if method.local:
        return (f"{config.method}'s clients keep their own {', '.join(method.local)} between rounds, which a late "
                "update cannot be re-based with")
    if config.scaffold:
        return "scaffold's clients keep control variates between rounds, which a late update would apply out of order"
    delay = config.straggler_delay
    if method.trainable(1) != method.trainable(1 + delay) or method.trainable(2) != method.trainable(2 + delay):
        return (f"{config.method} trains other factors {delay} round(s) later, so a late update would arrive in a "
                "round that averages the other factor; choose a straggler_delay after which it trains the same "
                "ones (rolora: an even one)")
    if rule(method, config.lora_r) == FACTORS and config.client_ranks not in (None, []):
        return f"{config.method} re-bases a late update factor by factor, which needs every client at lora_r"
    return None


def rebase(trained: LoraPair, start: LoraPair, now: LoraPair, how: str, ratio: float = 1.0) -> LoraPair:
    """One layer of a late update, re-based onto the current global adapter ``now`` by the rule ``how`` (see the
    module's docstring). ``start`` is the adapter the client trained from (the global one of its round, at its own
    rank); ``ratio = s_i / s`` brings a client of its own LoRA scaling to the global one (``_rescaled``), so that
    with ``product`` ``s B'A' = s B_now A_now + s_i (B_i A_i − B_start A_start)``."""
    trained, start = trained.to(now.A), start.to(now.A)
    if how == PRODUCT:
        mine, then = _rescaled(trained, ratio), _rescaled(start, ratio)
        return LoraPair(torch.cat([now.A, mine.A, then.A], 0), torch.cat([now.B, mine.B, -then.B], 1))
    if how != FACTORS:
        raise ValueError(f"unknown re-basing rule {how!r}; choose {PRODUCT} or {FACTORS}")
    if ratio != 1.0 or trained.A.shape != now.A.shape or start.A.shape != now.A.shape:
        raise ValueError(f"re-basing factor by factor needs the global rank and scaling, got rank {trained.rank} "
                         f"(global {now.rank}) and scaling ratio {ratio}")
    return LoraPair(now.A + (trained.A - start.A), now.B + (trained.B - start.B))


def rebase_update(update: ClientUpdate, start: dict[str, LoraPair], now: dict[str, LoraPair], how: str,
                  scaling: float) -> ClientUpdate:
    """``update`` (trained from ``start``) re-based layer by layer onto ``now``, at the global ``scaling``."""
    ratio = 1.0 if update.scaling is None else float(update.scaling) / scaling
    factors = {name: rebase(update.factors[name], start[name], pair, how, ratio) for name, pair in now.items()}
    return replace(update, factors=factors, scaling=None)
