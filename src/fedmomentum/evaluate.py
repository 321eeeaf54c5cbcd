"""Held-out loss per task family and exact-match accuracy by greedy generation."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .data import Example, score
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
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            tokens += int((labels != -100).sum())
        losses[family] = total / max(tokens, 1)
    return losses


@torch.no_grad()
def family_accuracy(model: PreTrainedModel, tokenizer, examples: dict[str, list[Example]],
                    max_new_tokens: int = 48, batch_size: int = 16) -> dict[str, float]:
    """Exact-match accuracy of greedy completions, scored with each family's own rule."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    accuracy = {}
    for family, items in examples.items():
        scores = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [prompt_ids(e, tokenizer) for e in chunk]
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=pad_id)
            for example, row in zip(chunk, output[:, width:], strict=True):
                scores.append(score(example, tokenizer.decode(row, skip_special_tokens=True)))
        accuracy[family] = sum(scores) / max(len(scores), 1)
    return accuracy


def evaluate(setup, accuracy: bool) -> dict:
    """``eval_loss`` (the mean over families), ``loss/<family>`` and, when asked, ``accuracy`` and
    ``accuracy/<family>`` of the server's model on the run's held-out data (``build.Setup``)."""
    config = setup.config
    losses = family_losses(setup.model, setup.eval_data, batch_size=config.eval_batch_size,
                           pad_id=setup.tokenizer.pad_token_id)
    record = {"eval_loss": sum(losses.values()) / len(losses), **{f"loss/{f}": v for f, v in losses.items()}}
    if accuracy and config.accuracy_per_family:
        scores = family_accuracy(setup.model, setup.tokenizer, setup.accuracy_examples,
                                 max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size)
        record["accuracy"] = sum(scores.values()) / len(scores)
        record.update({f"accuracy/{family}": value for family, value in scores.items()})
    return record
