"""Client-side corrections of local training, on the trainable LoRA factors: FedProx and SCAFFOLD.

**FedProx** (Li et al., MLSys 2020), ``prox_mu = μ``: each client minimises its loss plus ``μ/2 ‖w − w₀‖²`` over
the factors it trains, ``w₀`` being where the round started it. The term adds ``μ (w − w₀)`` to every gradient
(``prox_gradients``), before clipping, as if it were part of the loss.

**SCAFFOLD** (Karimireddy et al., ICML 2020, option II), ``scaffold = true``: the server keeps a control variate
``c`` and each client ``i`` its own ``c_i`` (zero at first), one per trained factor and layer. A client moves its
factors by ``−η (c − c_i)`` after each optimizer step (``scaffold_step``; with plain SGD that is the paper's
``y ← y − η (g − c_i + c)``; with AdamW the correction stays outside Adam's normalisation, as OpenFedLLM applies it),
and after ``K`` steps from ``x`` to ``y`` takes ``c_i⁺ = c_i − c + (x − y) / (K η)`` (``client_variate``). The server
adds ``(1/N) Σ_i (c_i⁺ − c_i)`` over the round's clients to ``c``, ``N`` being the number of all clients
(``server_variate``). Both sides compute ``c_i⁺`` from the same tensors (the server from the factors the client
sent), so no variate travels upstream. ``c`` goes to the clients with every train message.

Where the variates live: ``c`` is ``ServerState.control`` (``{factor: {layer: tensor}}``); ``c_i`` is part of what
client ``i`` keeps between its rounds (``ClientUpdate.keep``, slots ``control_A`` / ``control_B``), beside a
method's own kept factors (FedSA-LoRA's ``B``).
"""

from __future__ import annotations

import torch

from .types import LoraPair, StateDict, Tensor

CONTROL = "control_"  # a client's kept slots holding its variate: control_A, control_B


def prox_gradients(params: list[torch.nn.Parameter], starts: list[Tensor], mu: float) -> None:
    """``grad += μ (w − w₀)`` for each parameter: the gradient of ``μ/2 ‖w − w₀‖²``."""
    for param, start in zip(params, starts, strict=True):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.add_(param.detach() - start, alpha=mu)


@torch.no_grad()
def scaffold_step(params: list[torch.nn.Parameter], corrections: list[Tensor], lr: float) -> None:
    """``w ← w − η (c − c_i)`` for each parameter (``corrections`` holds ``c − c_i``)."""
    for param, correction in zip(params, corrections, strict=True):
        param.sub_(correction.to(param), alpha=lr)


def variates(control: StateDict | None, own: StateDict | None, start: dict[str, LoraPair],
             factor: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(c, c_i)`` of one factor, per layer, zero where there is none yet (the first rounds)."""
    server, client = (control or {}).get(factor, {}), (own or {}).get(CONTROL + factor, {})
    zeros = {name: torch.zeros_like(getattr(pair, factor)) for name, pair in start.items()}
    return ({name: server.get(name, zero) for name, zero in zeros.items()},
            {name: client.get(name, zero) for name, zero in zeros.items()})


def correction(control: StateDict | None, own: StateDict | None, start: dict[str, LoraPair],
               factor: str) -> dict[str, Tensor]:
    """``c − c_i`` of one factor, per layer."""
    server, client = variates(control, own, start, factor)
    return {name: server[name] - client[name] for name in start}


def client_variate(start: dict[str, LoraPair], trained: dict[str, LoraPair], control: StateDict | None,
                   own: StateDict | None, trainable: dict[str, bool], steps: int, lr: float) -> StateDict:
    """The client's variate after the round, ``{control_A: …, control_B: …}``: ``c_i⁺ = c_i − c + (x − y)/(K η)`` for
    the factors it trained, its variate as it was for the others (absent while it has none)."""
    kept: StateDict = {}
    for factor in ("A", "B"):
        if trainable[factor]:
            server, client = variates(control, own, start, factor)
            kept[CONTROL + factor] = {
                name: client[name] - server[name]
                + (getattr(pair, factor) - getattr(trained[name], factor)) / (steps * lr)
                for name, pair in start.items()}
        elif CONTROL + factor in (own or {}):
            kept[CONTROL + factor] = own[CONTROL + factor]
    return kept


def server_variate(control: StateDict, before: dict[str, StateDict], after: dict[str, StateDict],
                   clients: int) -> StateDict:
    """``c + (1/N) Σ_i (c_i⁺ − c_i)`` over the round's clients (``before``/``after``: each one's kept state at the
    start and at the end of the round; ``N = clients``, all of them)."""
    total: StateDict = {factor: dict(layers) for factor, layers in control.items()}
    for client_id, kept in after.items():
        old = before.get(client_id, {})
        for slot, layers in kept.items():
            if not slot.startswith(CONTROL):
                continue
            factor = slot.removeprefix(CONTROL)
            for name, value in layers.items():
                change = value - old[slot][name] if name in old.get(slot, {}) else value
                current = total.setdefault(factor, {}).get(name)
                total[factor][name] = change / clients if current is None else current + change / clients
    return total


def method_part(own: StateDict | None) -> StateDict | None:
    """What a method keeps on the client (``Method.local``), without the variates; None for nothing."""
    kept = {slot: layers for slot, layers in (own or {}).items() if not slot.startswith(CONTROL)}
    return kept or None
