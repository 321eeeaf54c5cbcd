"""Evaluation in batches: the held-out loss and greedy completions do not depend on the batch size."""

from __future__ import annotations

import pytest
import torch

from fedmomentum.data import Example, encode
from fedmomentum.evaluate import family_losses, generate

EXAMPLES = [Example(prompt=f"What is {a} + {b}? " + "Think. " * (a % 5), response=str(a + b), family="x",
                    answer=str(a + b)) for a, b in ((3, 4), (12, 30), (7, 7), (101, 5), (9, 1), (40, 2))]


def test_held_out_loss_is_the_token_mean_whatever_the_batch_size(tiny_model):
    model, tokenizer = tiny_model
    encoded = [encode(e, tokenizer, 64) for e in EXAMPLES]
    total = tokens = 0.0
    for item in encoded:  # reference: the model's own loss on one example at a time, weighted by its tokens
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[0, 1:] != -100).sum())
        total, tokens = total + float(loss) * n, tokens + n
    for batch_size in (1, 4, 16):
        losses = family_losses(model, {"x": encoded}, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
        assert losses["x"] == pytest.approx(total / tokens, rel=1e-5)


def test_batched_greedy_generation_with_left_padding_matches_one_prompt_at_a_time(fresh_tiny):
    model, tokenizer = fresh_tiny
    with torch.no_grad():  # sharper random weights, so that completions depend on the prompt
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.mul_(8)
    alone = generate(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=1)
    assert len(set(alone)) > 1  # the prompts differ in length and the completions differ: padding matters
    assert generate(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=4) == alone
    assert generate(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=16) == alone
