"""Held-out loss per task family and exact-match accuracy by greedy generation."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .client import response_loss
from .data import IGNORE_INDEX, Example, score
from .data.formatting import collate, prompt_ids


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


def evaluate(setup, accuracy: bool) -> dict:
    """``eval_loss`` (the mean over families), ``loss/<family>`` and, when asked, ``accuracy`` and
    ``accuracy/<family>`` of the server's model on the run's held-out data (``build.Setup``)."""
    config = setup.config
    record: dict = {}
    if setup.eval_data:  # none: evaluation is off (a Flower server without held-out data)
        losses = family_losses(setup.model, setup.eval_data, batch_size=config.eval_batch_size,
                               pad_id=setup.tokenizer.pad_token_id)
        record = {"eval_loss": sum(losses.values()) / len(losses), **{f"loss/{f}": v for f, v in losses.items()}}
    if accuracy and config.accuracy_per_family and setup.accuracy_examples:
        scores = family_accuracy(setup.model, setup.tokenizer, setup.accuracy_examples,
                                 max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size)
        record["accuracy"] = sum(scores.values()) / len(scores)
        record.update({f"accuracy/{family}": value for family, value in scores.items()})
    return record
