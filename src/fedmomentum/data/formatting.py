"""Turning examples into token ids for supervised fine-tuning and generation.

A conversation (``Example.messages()``: system and earlier turns, then the prompt as the user turn and the
response as the assistant turn) is written with the tokenizer's chat template. The loss is on the assistant
turns (each with the end-of-turn token after it) only: every other token and every padding position has label
-100. Tokenizers without a chat template get a plain fallback format::

    System: <system>
    User: <prompt>
    Assistant: <response><eos>

Each assistant turn is found by writing the conversation up to it (with the generation prompt) and up to its
end: the template must write a conversation as the sequence of its turns (SmolLM2's, ChatML and most do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .example import Example

__all__ = ["IGNORE_INDEX", "collate", "encode", "prompt_ids", "prompt_text"]

IGNORE_INDEX = -100
_MARK = "\x00"  # stands in for the first user text, to find where the template's start ends


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(messages: list[dict[str, str]], tokenizer: Any, generation: bool) -> str:
    """``messages`` as the chat template writes them (with the assistant header when ``generation``)."""
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    eos = tokenizer.eos_token or ""
    text = "".join(f"{m['role'].capitalize()}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n"
                   for m in messages)
    return text + ("Assistant: " if generation else "")


def _prompt_messages(example: Example | str) -> list[dict[str, str]]:
    if isinstance(example, str):
        return [{"role": "user", "content": example}]
    return example.messages()[:-1]


def prompt_text(example: Example | str, tokenizer: Any) -> str:
    """The conversation up to the response as text, ending where the model should start answering."""
    return _render(_prompt_messages(example), tokenizer, generation=True)


def _pieces(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """The conversation's text in order, as ``(text, learn)``; ``learn`` marks an assistant turn (its text and
    end-of-turn token), every other piece is what comes between (template start, system and user turns, headers)."""
    messages = example.messages()
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text written so far, as the template writes it
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(messages[:i], tokenizer, generation=True)
        after = _render(messages[: i + 1], tokenizer, generation=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError("the chat template does not write a conversation as the sequence of its turns "
                             f"(at turn {i + 1}), so the assistant turns cannot be found")
        reply = after[len(before) :].rstrip()  # drop the newline between turns
        pieces += [(before[len(done) :], False), (reply + (eos if eos and eos not in reply else ""), True)]
        done = before + reply
    return pieces


def _tokens(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(example: Example | str, tokenizer: Any) -> list[int]:
    """Token ids of the prompt for generation (chat template with the generation prompt)."""
    special = not _has_template(tokenizer)  # a chat template writes its own specials
    return _tokens(tokenizer, prompt_text(example, tokenizer), special)


def _head_length(ids: list[int], example: Example, tokenizer: Any) -> int:
    """How many of the conversation's ``ids`` come before the first user text: the template's start (BOS,
    system turn, user header)."""
    messages = example.messages()
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    text = _render([*messages[:first], {**messages[first], "content": _MARK}], tokenizer, generation=True)
    start = text.find(_MARK)
    head = _tokens(tokenizer, text[: max(start, 0)], not _has_template(tokenizer))
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

    Labels are -100 except on assistant turns. The last assistant turn is the response; everything before it
    is the prompt (for a conversation, earlier assistant turns in it keep their labels). When the example is
    longer than ``max_length`` the prompt is cut after the template's start (the start, the end of the
    conversation and the assistant header stay) so the whole response fits; if the response alone takes more
    than half of ``max_length``, the prompt keeps (at most) half and the response is cut on the right.
    """
    pieces = _pieces(example, tokenizer)
    special = not _has_template(tokenizer)
    p_ids: list[int] = []
    p_labels: list[int] = []
    for k, (text, learn) in enumerate(pieces[:-1]):
        ids = _tokens(tokenizer, text, special and k == 0)
        p_ids += ids
        p_labels += ids if learn else [IGNORE_INDEX] * len(ids)
    r_ids = _tokens(tokenizer, pieces[-1][0], False)
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if len(p_ids) + len(r_ids) > max_length:
            keep_p = max(max_length - len(r_ids), min(len(p_ids), max_length // 2))
            keep_r = max_length - keep_p
            head = _head_length(p_ids, example, tokenizer)
            p_ids, p_labels = _cut_prompt(p_ids, keep_p, head), _cut_prompt(p_labels, keep_p, head)
            r_ids = r_ids[:keep_r]
    input_ids = p_ids + r_ids
    return {"input_ids": input_ids, "labels": p_labels + r_ids, "attention_mask": [1] * len(input_ids)}


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
