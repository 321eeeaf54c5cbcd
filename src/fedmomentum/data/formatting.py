"""Turning examples into token ids for supervised fine-tuning and generation.

The prompt is the user turn and the response the assistant turn of the tokenizer's chat template. The loss
is on the response (and the end-of-turn token after it) only: every prompt token and every padding
position has label -100. Tokenizers without a chat template get a plain fallback format::

    User: <prompt>
    Assistant: <response><eos>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .example import Example

__all__ = ["IGNORE_INDEX", "collate", "encode", "prompt_ids", "prompt_text"]

IGNORE_INDEX = -100


def _prompt_of(example: Example | str) -> str:
    return example if isinstance(example, str) else example.prompt


def prompt_text(example: Example | str, tokenizer: Any) -> str:
    """The prompt as text, ending where the model should start answering."""
    prompt = _prompt_of(example)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"User: {prompt}\nAssistant: "


def _response_text(example: Example, tokenizer: Any, prompt: str) -> str:
    """The assistant turn as the template writes it after ``prompt``: response plus end-of-turn."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}],
            tokenize=False,
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template's prompt is not a prefix of the full conversation")
        turn = full[len(prompt) :].rstrip()  # drop the newline between turns
        if eos and eos not in turn:
            turn += eos
        return turn
    return example.response + eos


def _tokens(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(example: Example | str, tokenizer: Any) -> list[int]:
    """Token ids of the prompt for generation (chat template with the generation prompt)."""
    special = not getattr(tokenizer, "chat_template", None)  # a chat template writes its own specials
    return _tokens(tokenizer, prompt_text(example, tokenizer), special)


def _head_length(ids: list[int], example: Example, tokenizer: Any) -> int:
    """How many of the prompt's ``ids`` come before the user's text: the template's start (BOS, system turn,
    user header)."""
    text = prompt_text(example, tokenizer)
    start = text.rfind(example.prompt) if example.prompt else len(text)
    head = _tokens(tokenizer, text[: max(start, 0)], not getattr(tokenizer, "chat_template", None))
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    return n


def _cut_prompt(ids: list[int], keep: int, head: int) -> list[int]:
    """``keep`` of the prompt's ids: its first ``head`` (at most half of ``keep``) and the rest from its end.

    The user's text loses its beginning; the conversation still starts as the template starts it. (Cutting the
    prompt's first tokens instead can start a sequence on any token, e.g. an end-of-turn token: with a zero
    embedding, as random models give the pad token, its hidden state stays zero in every layer and RMSNorm's
    gradient there, ``1/√eps`` a layer, overflows float32 in a deep model.)
    """
    if keep <= 0:
        return []
    head = min(head, keep // 2)
    return ids[:head] + ids[len(ids) - (keep - head) :]


def encode(example: Example, tokenizer: Any, max_length: int | None = 512) -> dict[str, list[int]]:
    """``input_ids``, ``labels`` and ``attention_mask`` (lists of ints, unpadded) for one example.

    Labels are -100 on the prompt. When the example is longer than ``max_length`` the user's text is cut from
    its beginning (the template's start, the end of the question and the assistant header stay) so the whole
    response fits; if the response alone takes more than half of ``max_length``, the prompt keeps (at most) half
    and the response is cut on the right.
    """
    prompt = prompt_text(example, tokenizer)
    p_ids = prompt_ids(example, tokenizer)
    r_ids = _tokens(tokenizer, _response_text(example, tokenizer, prompt), False)
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if len(p_ids) + len(r_ids) > max_length:
            keep_p = max(max_length - len(r_ids), min(len(p_ids), max_length // 2))
            keep_r = max_length - keep_p
            p_ids = _cut_prompt(p_ids, keep_p, _head_length(p_ids, example, tokenizer))
            r_ids = r_ids[:keep_r]
    input_ids = p_ids + r_ids
    labels = [IGNORE_INDEX] * len(p_ids) + r_ids
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def collate(batch: Sequence[dict[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad encoded examples on the right into ``long`` tensors: ids with ``pad_id``, labels with -100,
    attention mask with 0."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item.get("labels", item["input_ids"]), dtype=torch.long)
        mask[row, :n] = torch.as_tensor(item.get("attention_mask", [1] * n), dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
