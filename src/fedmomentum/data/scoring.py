"""Grading a model's completion against an example: answer extraction and each family's own rule."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .example import Example
from .families import NUMERIC_FAMILIES, is_family, scorer
from .gsm8k import GSM8K_FAMILY

__all__ = ["extract_answer", "score"]

_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|im_start|>", "\nUser:")
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _cut(completion: str) -> str:
    for marker in _END_MARKERS:
        pos = completion.find(marker)
        if pos >= 0:
            completion = completion[:pos]
    return completion.strip()


def extract_answer(completion: str) -> str:
    """The final answer in a completion.

    In order: the last ``<answer>…</answer>``; the line after the last ``####``; the rest of the line after
    the last "answer is" / "answer:"; else the last non-empty line. Text after an end-of-turn marker is
    ignored; a trailing period is removed.
    """
    text = _cut(completion)
    tagged = re.findall(r"<answer>\s*(.*?)\s*</answer>", text, flags=re.DOTALL)
    if tagged:
        answer = tagged[-1]
    elif "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        answer = tail.splitlines()[0] if tail else ""
    else:
        marked = re.findall(r"answer\s*(?:is|:)\s*:?\s*(.+)", text, flags=re.IGNORECASE)
        if marked:
            answer = marked[-1]
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            answer = lines[-1] if lines else ""
    return answer.strip().removesuffix(".").strip()


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace("$", "").replace(",", "")


def _as_decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None


def _numeric_answer(text: str) -> str:
    """``text`` if it is a plain number, else its last number (or ``text`` when it has none)."""
    if _as_decimal(text) is not None:
        return text.replace(",", "").replace("$", "").strip()
    last = _last_number(text)
    return last if last is not None else text


def score(example: Example, completion: str) -> float:
    """Grade a completion for ``example`` in [0, 1].

    reasoning-gym families: the family's ``score_answer`` on ``extract_answer(completion)`` (for numeric
    families reduced to its last number); it may give partial credit. GSM8K: 1.0 when the final number
    (after ``####``, else after "answer is", else the last number) equals the reference, else 0.0. Other
    families (JSONL): exact match of the extracted answer with ``example.answer``, ignoring case and spaces.
    """
    if example.family == GSM8K_FAMILY:
        text = _cut(completion)
        if "####" in text or re.search(r"answer\s*(?:is|:)", text, flags=re.IGNORECASE):
            candidate = _last_number(extract_answer(text)) or _last_number(text)
        else:
            candidate = _last_number(text)
        got, want = _as_decimal(candidate), _as_decimal(example.answer)
        return 1.0 if got is not None and want is not None and got == want else 0.0
    answer = extract_answer(completion)
    if example.entry is not None and is_family(example.family):
        if example.family in NUMERIC_FAMILIES:
            answer = _numeric_answer(answer)
        try:
            value = float(scorer(example.family)(answer, example.entry))
        except Exception:  # some scorers raise on unparsable answers (e.g. prime_factorization)
            return 0.0
        return min(1.0, max(0.0, value))
    got = " ".join(answer.split()).lower()
    want = " ".join(example.answer.split()).lower()
    if got == want:
        return 1.0
    if _as_decimal(got) is not None and _as_decimal(got) == _as_decimal(want):
        return 1.0
    return 0.0
