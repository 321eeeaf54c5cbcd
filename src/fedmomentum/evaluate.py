"""Held-out loss per task family, exact-match accuracy by greedy generation, and each client's personalised model on
its own held-out slice (methods whose clients keep factors of their own: FedSA-LoRA)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .client import response_loss
from .corrections import method_part
from .data import IGNORE_INDEX, Example, score
from .data.formatting import collate, prompt_ids
from .peft_io import set_lora


@torch.no_grad()
def family_losses(model: PreTrainedModel, data: dict[str, list[dict]], batch_size: int = 16,
                  pad_id: int = 0) -> dict[str, float]:
    """Mean loss per response token on each family's held-out examples."""
    model.eval()
    device = next(model.parameters()).device
    losses = {}
    for family, encoded in data.items():
        total, tokens = 0.0, 0
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}
            total += float(response_loss(model, batch, reduction="sum"))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        losses[family] = total / max(tokens, 1)
    return losses


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer, examples: list[Example], max_new_tokens: int = 48,
             batch_size: int = 16) -> list[str]:
    """Greedy completions of the examples' prompts, in their order.

    Prompts go ``batch_size`` at a time through ``generate`` (left padding), shortest first so that a batch holds
    prompts of similar length: each decoding step reads every weight once whatever the batch, so few large batches
    cost far less than many small ones.
    """
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                 device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id)
        for i, row in zip(chunk, output[:, width:], strict=True):
            completions[i] = tokenizer.decode(row, skip_special_tokens=True)
    return completions


def family_accuracy(model: PreTrainedModel, tokenizer, examples: dict[str, list[Example]],
                    max_new_tokens: int = 48, batch_size: int = 16) -> dict[str, float]:
    """Exact-match accuracy of greedy completions (all families' prompts batched together), scored with each
    family's own rule."""
    items = [(family, example) for family, group in examples.items() for example in group]
    completions = generate(model, tokenizer, [example for _, example in items], max_new_tokens, batch_size)
    scores: dict[str, list[float]] = {family: [] for family in examples}
    for (family, example), text in zip(items, completions, strict=True):
        scores[family].append(score(example, text))
    return {family: sum(values) / max(len(values), 1) for family, values in scores.items()}


def mixtures(parts: list[list[Example]], ids: list[str]) -> dict[str, dict[str, float]]:
    """Each client's share of its training examples per family (or data file): the weights of its held-out slice."""
    result = {}
    for client_id, part in zip(ids, parts, strict=True):
        counts: dict[str, int] = {}
        for example in part:
            counts[example.family] = counts.get(example.family, 0) + 1
        result[client_id] = {family: n / len(part) for family, n in sorted(counts.items())} if part else {}
    return result


def personal_losses(setup, state, server: dict[str, float]) -> dict:
    """Each client's personalised model (``Method.client_start``: the global adapter with the factors the client
    keeps, FedSA-LoRA's ``(A′, B_i)``) on its own held-out slice: the held-out examples of the families it trains on,
    weighted by its share of each (``Setup.client_mixtures``). ``personal_loss/<client>`` and their mean,
    ``personal_eval_loss``; beside it ``global_eval_loss_by_client``, the server's model on the same slices (``server``:
    its loss per family). A client that has kept nothing yet starts from the server's model. The server's adapter is
    put back afterwards."""
    config, model = setup.config, setup.model
    record, baseline = {}, []
    try:
        for client_id, shares in setup.client_mixtures.items():
            shares = {family: w for family, w in shares.items() if w > 0 and family in setup.eval_data}
            if not shares:
                continue
            own = method_part(state.clients.get(client_id))
            losses = server
            if own is not None:
                set_lora(model, setup.method.client_start(state.lora, own=own, t=state.rounds_done + 1))
                losses = family_losses(model, {f: setup.eval_data[f] for f in shares}, config.eval_batch_size,
                                       setup.tokenizer.pad_token_id)
            total = sum(shares.values())
            record[f"personal_loss/{client_id}"] = sum(w * losses[f] for f, w in shares.items()) / total
            baseline.append(sum(w * server[f] for f, w in shares.items()) / total)
    finally:
        set_lora(model, state.lora)
    if baseline:
        personal = [v for k, v in record.items() if k.startswith("personal_loss/")]
        record["personal_eval_loss"] = sum(personal) / len(personal)
        record["global_eval_loss_by_client"] = sum(baseline) / len(baseline)
    return record


def evaluate(setup, accuracy: bool, state=None) -> dict:
    """``eval_loss`` (the mean over families), ``loss/<family>`` and, when asked, ``accuracy`` and
    ``accuracy/<family>`` of the server's model on the run's held-out data (``build.Setup``); with the server's
    ``state`` and a method whose clients keep factors of their own, also their personalised models
    (``personal_losses``)."""
    config = setup.config
    record: dict = {}
    if setup.eval_data:  # none: evaluation is off (a Flower server without held-out data)
        losses = family_losses(setup.model, setup.eval_data, batch_size=config.eval_batch_size,
                               pad_id=setup.tokenizer.pad_token_id)
        record = {"eval_loss": sum(losses.values()) / len(losses), **{f"loss/{f}": v for f, v in losses.items()}}
        if state is not None and setup.method.local and setup.client_mixtures:
            record.update(personal_losses(setup, state, losses))
    if accuracy and config.accuracy_per_family and setup.accuracy_examples:
        scores = family_accuracy(setup.model, setup.tokenizer, setup.accuracy_examples,
                                 max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size)
        record["accuracy"] = sum(scores.values()) / len(scores)
        record.update({f"accuracy/{family}": value for family, value in scores.items()})
    return record
