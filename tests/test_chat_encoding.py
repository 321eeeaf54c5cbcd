"""Multi-turn conversations: every assistant turn is learnt and nothing else, system turns stay, truncation keeps
the template's start; single-turn encodings are unchanged."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from fedmomentum import data
from fedmomentum.data import Example, Turn

CONTEXT = (Turn("system", "You answer in one line."), Turn("user", "Hi there"), Turn("assistant", "Hello! Ask away."),
           Turn("user", "What is 2 + 2?"), Turn("assistant", "4"))
EXAMPLE = Example("And 3 + 3?", "It is 6.\n#### 6", "chat", "6", context=CONTEXT)
ASSISTANT = ["Hello! Ask away.", "4", "It is 6.\n#### 6"]


def _runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled tokens."""
    runs, current = [], []
    for label in labels:
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_only_assistant_turns_are_labelled(tokenizer):
    enc = data.encode(EXAMPLE, tokenizer, max_length=None)
    ids, labels = enc["input_ids"], enc["labels"]
    assert [t for t, l in zip(ids, labels, strict=True) if l != -100] == [l for l in labels if l != -100]
    assert [tokenizer.decode(run) for run in _runs(labels)] == [a + "<|im_end|>" for a in ASSISTANT]
    # the input is the template's whole conversation, the system turn kept (not SmolLM2's default one)
    text = tokenizer.apply_chat_template(EXAMPLE.messages(), tokenize=False)
    assert tokenizer.decode(ids) == text.rstrip()
    assert "You answer in one line." in text and "SmolLM" not in text


def test_the_generation_prompt_is_the_conversation_before_the_response(tokenizer):
    prompt = data.prompt_ids(EXAMPLE, tokenizer)
    enc = data.encode(EXAMPLE, tokenizer, max_length=None)
    assert enc["input_ids"][: len(prompt)] == prompt
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(
        EXAMPLE.messages()[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(enc["input_ids"][len(prompt):]) == EXAMPLE.response + "<|im_end|>"


def test_without_a_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    enc = data.encode(EXAMPLE, plain, max_length=None)
    eos = plain.eos_token
    assert [plain.decode(run) for run in _runs(enc["labels"])] == [a + eos for a in ASSISTANT]
    assert plain.decode(enc["input_ids"]) == (
        f"System: You answer in one line.\nUser: Hi there\nAssistant: Hello! Ask away.{eos}\n"
        f"User: What is 2 + 2?\nAssistant: 4{eos}\nUser: And 3 + 3?\nAssistant: It is 6.\n#### 6{eos}")


def test_a_long_conversation_keeps_the_template_start_and_the_response(tokenizer):
    long = Example("Last question?", "Yes.", "chat", "Yes.",
                   context=(Turn("user", "word " * 80), Turn("assistant", "fine " * 40)))
    full = data.encode(long, tokenizer, max_length=None)
    enc = data.encode(long, tokenizer, max_length=48)
    assert len(enc["input_ids"]) == 48 < len(full["input_ids"])
    start = data.prompt_ids("x", tokenizer)[:20]  # <|im_start|>system … of SmolLM2's template
    assert enc["input_ids"][:20] == start
    assert enc["input_ids"][-6:] == full["input_ids"][-6:] and enc["labels"][-6:] == full["labels"][-6:]
    assert tokenizer.decode(_runs(enc["labels"])[-1]) == "Yes.<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    odd = copy.deepcopy(tokenizer)  # writes only the last assistant turn: earlier ones cannot be found
    odd.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="does not write a conversation as the sequence of its turns"):
        data.encode(EXAMPLE, odd)


def test_chat_files_train_and_score(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": m["role"], "content": m["content"]}
                                             for m in EXAMPLE.messages()]}) + "\n")
    (example,) = data.load_examples(path)
    assert example == Example(EXAMPLE.prompt, EXAMPLE.response, "chat", "6", context=CONTEXT)
    assert data.encode(example, tokenizer) == data.encode(EXAMPLE, tokenizer)
    assert data.score(example, "It is 6.\n#### 6<|im_end|>") == 1.0 and data.score(example, "#### 7") == 0.0


def test_single_turn_encodings_are_unchanged(tokenizer):
    """Reasoning-gym and GSM8K examples encode exactly as before conversations existed: the digest was computed with
    formatting.py of commit 88ece5c (single-turn only), over the same examples, lengths and both tokenizers."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    train, held = data.make_tasks(list(data.FAMILIES), 12, 4, seed=3)
    examples = train + held + data.load_gsm8k_test()[:30]
    out = []
    for tok in (tokenizer, plain):
        for ex in examples:
            out += [data.encode(ex, tok, length) for length in (None, 512, 128, 64, 40, 17)]
            out += [data.prompt_ids(ex, tok), data.prompt_text(ex, tok)]
        out.append(data.prompt_ids("What is 2+2?", tok))
    digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()
    assert digest == "10744fc1e222c2a863eb650683207425b088bdfc41eed8392636fcaa25de84b4"
