"""Local training: batch order, the gradient guard, and the deep-model NaN that truncation used to cause."""

from __future__ import annotations

import pytest
import torch

from fedmomentum.client import TrainConfig, batches, response_loss, train_client
from fedmomentum.data import Example, collate, encode, prompt_ids
from fedmomentum.models import tiny_model
from fedmomentum.peft_io import add_lora, get_lora, set_trainable


def test_batches_walk_seeded_epochs():
    cfg = TrainConfig(local_steps=5, batch_size=4, grad_accum=2)
    drawn = list(batches(10, cfg, torch.Generator().manual_seed(3)))
    assert len(drawn) == 10 and all(len(b) == 4 for b in drawn)
    flat = [i for b in drawn for i in b]
    assert sorted(flat[:8]) == sorted(set(flat[:8]))  # no repeat inside an epoch's first 8 draws
    assert drawn == list(batches(10, cfg, torch.Generator().manual_seed(3)))
    assert drawn != list(batches(10, cfg, torch.Generator().manual_seed(4)))
    small = list(batches(3, TrainConfig(local_steps=2, batch_size=4), torch.Generator().manual_seed(0)))
    assert [sorted(b) for b in small] == [[0, 1, 2]] * 2  # fewer examples than a batch: each batch is one epoch


def deep_model():
    """A 24-layer Llama whose pad/eos token (<|im_end|>) has a zero embedding, as random inits give padding_idx."""
    model, tokenizer = tiny_model(0, num_layers=24, hidden=256, heads=4, kv_heads=4, intermediate=512)
    assert not model.model.embed_tokens.weight[tokenizer.eos_token_id].any()
    return model, tokenizer


def test_a_truncated_prompt_cannot_make_a_deep_model_nan():
    """Regression for the CUDA round-2 NaN (1B/7B random Llamas): a prompt cut from the left could start on
    <|im_end|>; with a zero embedding at position 0 its hidden state stays 0 in every layer, RMSNorm's gradient
    there is 1/√eps = 1000 per layer, and 24 layers overflow float32. Truncation now keeps the template's start."""
    model, tokenizer = deep_model()
    example = Example(prompt="Tell me about " + " ".join(f"item{i}" for i in range(60)), response="42",
                      family="x", answer="42")
    prompt = prompt_ids(example, tokenizer)
    response = len(encode(example, tokenizer, None)["input_ids"]) - len(prompt)
    # the length at which cutting the prompt's first tokens would start the sequence on the system turn's <|im_end|>
    max_length = len(prompt) - prompt.index(tokenizer.eos_token_id) + response
    encoded = encode(example, tokenizer, max_length)
    assert encoded["input_ids"][0] == prompt[0] != tokenizer.eos_token_id
    model = add_lora(model, r=4, alpha=8)
    update, loss = train_client(model, [encoded, encoded], get_lora(model), {"A": True, "B": True},
                                TrainConfig(local_steps=3, batch_size=2))
    assert all(torch.isfinite(p.A).all() and torch.isfinite(p.B).all() for p in update.factors.values())
    assert torch.isfinite(torch.tensor(loss))


def test_a_non_finite_gradient_names_the_client_and_step(fresh_tiny):
    """What a user sees if the gradient overflows anyway: an error naming the client and step, not NaN factors."""
    model, tokenizer = fresh_tiny
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model = add_lora(model, r=2, alpha=4)
    data = [encode(Example("What is 2 + 2?", "4", "x", "4"), tokenizer, 64)]
    with pytest.raises(FloatingPointError, match=r"client 'client-7', step 1: the gradient is not finite"):
        train_client(model, data, get_lora(model), {"A": True, "B": True}, TrainConfig(local_steps=2, batch_size=1),
                     client_id="client-7")


def test_response_loss_is_the_models_own_loss_and_gradient(fresh_tiny):
    """The vocabulary projection only at positions that predict a labelled token: same loss, same gradients."""
    model, tokenizer = fresh_tiny
    model = add_lora(model, r=4, alpha=8)
    examples = [Example(f"What is {a} + {b}?", str(a + b), "x", str(a + b)) for a, b in ((1, 2), (30, 45), (7, 100))]
    batch = collate([encode(e, tokenizer, 64) for e in examples], tokenizer.pad_token_id)
    params = set_trainable(model, {"A": True, "B": True})
    model.train()
    grads = []
    for compute in (lambda: model(**batch).loss, lambda: response_loss(model, batch)):
        loss = compute()
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (ours, our_grads) = grads
    assert ours == pytest.approx(full, rel=1e-6)
    for a, b in zip(full_grads, our_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    total = response_loss(model, batch, reduction="sum")
    assert float(total) == pytest.approx(full * int((batch["labels"][:, 1:] != -100).sum()), rel=1e-6)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (older architectures): every position's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_response_loss_without_logits_to_keep_falls_back_to_all_positions(tiny_model):
    model, tokenizer = tiny_model
    batch = collate([encode(Example("What is 2 + 2?", "4", "x", "4"), tokenizer, 64)], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = float(model(**batch).loss)
        assert float(response_loss(_NoLogitsToKeep(model), batch)) == pytest.approx(expected, rel=1e-6)
