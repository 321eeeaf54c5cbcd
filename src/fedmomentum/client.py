"""Local training of one client: start from the global adapter, train the factors the method allows, with FedProx's
proximal term or SCAFFOLD's control variates when asked (``corrections.py``).

Used unchanged by the in-process simulation and by the Flower ClientApp, so both give the same numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable

import torch
from peft import PeftModel

from . import corrections
from .config import TrainConfig  # what each client does in a round
from .data.formatting import IGNORE_INDEX, collate
from .peft_io import ADAPTER, active_adapter, get_lora, lora_layers, rank_adapter, scaling, set_lora, set_trainable
from .types import ClientUpdate, LoraPair, StateDict, Tensor


def batches(num_examples: int, cfg: TrainConfig, generator: torch.Generator):
    """Index lists for ``local_steps × grad_accum`` micro-batches, walking seeded permutations (epochs)."""
    order: list[int] = []
    for _ in range(cfg.local_steps * cfg.grad_accum):
        if len(order) < cfg.batch_size:
            order += torch.randperm(num_examples, generator=generator).tolist()
        yield order[: cfg.batch_size]
        order = order[cfg.batch_size :]


def response_loss(model: PeftModel, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the labelled (response) tokens, the vocabulary projection computed only where it is used.

    Position ``t`` predicts token ``t+1``, and only the positions that predict a labelled token matter: about one in
    seven in the default task, while the projection onto a 49k vocabulary and its softmax are a fifth of a small
    model's compute. transformers' boolean ``logits_to_keep`` keeps just those rows. The value is the model's own
    ``labels=`` loss (float32 logits; mean over labelled tokens, or their sum with ``reduction="sum"``).
    """
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][predicts[:, :-1]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if _keeps_logits(model):
        logits = model(**inputs, logits_to_keep=predicts).logits
    else:  # an architecture without logits_to_keep: every position's logits
        logits = model(**inputs).logits[predicts]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)


def _keeps_logits(model) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def train_client(
    model: PeftModel,
    data: list[dict],
    global_lora: dict[str, LoraPair],
    trainable: dict[str, bool],
    cfg: TrainConfig,
    *,
    lr: float | None = None,
    seed: int = 0,
    client_id: str = "",
    pad_id: int = 0,
    adapter: str = ADAPTER,
    on_step: Callable[[], None] | None = None,
    correction: dict[str, dict[str, Tensor]] | None = None,
) -> tuple[ClientUpdate, float]:
    """Train ``model``'s adapter on ``data`` (encoded examples) from ``global_lora``; return the update and mean loss.

    The model's backbone is shared and never touched here; only the adapter factors change. ``adapter`` names the
    PEFT adapter to train, the active one (``peft_io.active_adapter``: a client of another rank); the update
    carries its scaling. ``on_step`` is called after each optimizer step (a progress bar). ``cfg.prox_mu > 0`` adds
    FedProx's proximal term towards ``global_lora``; ``correction`` (``{factor: {layer: c − c_i}}``, SCAFFOLD) moves
    the trained factors by ``−lr (c − c_i)`` after each optimizer step.
    """
    if not data:
        raise ValueError(f"client {client_id!r} has no training examples")
    if model.active_adapter != adapter:
        raise ValueError(f"adapter {adapter!r} is not the active one ({model.active_adapter!r})")
    set_lora(model, global_lora, adapter)
    params = set_trainable(model, trainable, adapter)
    lr = cfg.lr if lr is None else lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    trained = _trained(model, trainable, adapter)  # (factor, layer) in the order of params
    starts = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
    shifts = [correction[factor][name] for factor, name in trained] if correction is not None else []
    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext())
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses = []
    for step, index in enumerate(batches(len(data), cfg, generator)):
        batch = {k: v.to(device) for k, v in collate([data[i] for i in index], pad_id).items()}
        with autocast:
            loss = response_loss(model, batch)
        (loss / cfg.grad_accum).backward()
        losses.append(loss.item())
        if (step + 1) % cfg.grad_accum == 0:
            if starts:
                corrections.prox_gradients(params, starts, cfg.prox_mu)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            if not math.isfinite(norm.item()):
                raise FloatingPointError(f"client {client_id!r}, step {step // cfg.grad_accum + 1}: the gradient is "
                                         f"not finite (loss {losses[-1]:.4g}); lower lr, or check the model's "
                                         "weights and the data")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if shifts:
                corrections.scaffold_step(params, shifts, lr)
            if on_step is not None:
                on_step()
    model.eval()
    set_trainable(model, {"A": False, "B": False}, adapter)
    update = ClientUpdate(get_lora(model, adapter), num_examples=len(data), client_id=client_id,
                          scaling=scaling(model, adapter))
    return update, sum(losses) / len(losses)


def _trained(model: PeftModel, trainable: dict[str, bool], adapter: str) -> list[tuple[str, str]]:
    """``(factor, layer)`` of each trainable parameter, in the order ``peft_io.set_trainable`` returns them."""
    return [(factor, name) for name in lora_layers(model, adapter) for factor in ("A", "B") if trainable[factor]]


def train_round(
    model: PeftModel,
    method,
    data: list[dict],
    global_lora: dict[str, LoraPair],
    trainable: dict[str, bool],
    cfg: TrainConfig,
    *,
    rank: int,
    own: StateDict | None = None,
    control: StateDict | None = None,
    t: int = 1,
    lr: float | None = None,
    seed: int = 0,
    client_id: str = "",
    pad_id: int = 0,
    on_step: Callable[[], None] | None = None,
    method_state: StateDict | None = None,
) -> tuple[ClientUpdate, float]:
    """One client's round ``t``, as every engine runs it: an adapter of the client's own ``rank`` on ``model``
    (``peft_io.rank_adapter``), the start ``method`` gives it (``Method.client_start``: the global adapter at that
    rank, with what the client keeps, ``own``), then ``train_client``. The update carries the client's scaling and
    what it keeps until its next round (``ClientUpdate.keep``: the method's ``local`` factors and, with
    ``cfg.scaffold``, its control variate; ``control`` is the server's, ``ServerState.control``).
    ``method_state``: the method's state (``ServerState.method``, its ``start_state`` slots suffice).
    """
    adapter = rank_adapter(model, rank)
    start = method.client_start(global_lora, own=corrections.method_part(own), t=t,
                                rank=rank if adapter != ADAPTER else None, scaling=scaling(model, adapter),
                                global_scaling=scaling(model), state=method_state)
    shift = ({factor: corrections.correction(control, own, start, factor) for factor in ("A", "B")
              if trainable[factor]} if cfg.scaffold else None)
    with active_adapter(model, adapter):
        update, loss = train_client(model, data, start, trainable, cfg, lr=lr, seed=seed, client_id=client_id,
                                    pad_id=pad_id, adapter=adapter, on_step=on_step, correction=shift)
    update.keep = kept(method, update, start, own, control, trainable, cfg, cfg.lr if lr is None else lr)
    return update, loss


def kept(method, update: ClientUpdate, start: dict[str, LoraPair], own: StateDict | None,
         control: StateDict | None, trainable: dict[str, bool], cfg: TrainConfig, lr: float) -> StateDict:
    """What a client keeps after its round: the method's ``local`` factors and, with SCAFFOLD, its new variate
    (computed the same way by the client and, from the factors it sent, by a server that holds its copy)."""
    keep = method.local_state(update)
    if cfg.scaffold:
        keep.update(corrections.client_variate(start, update.factors, control, own, trainable, cfg.local_steps, lr))
    return keep
