"""The shapes a training record comes in, and turning a record into an ``Example``.

- ``prompt-response``: ``{"prompt": ..., "response": ...}`` (this library's own form);
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional; when not empty it goes
  after the instruction, separated by a blank line);
- ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``, one or more
  exchanges; the model learns every assistant turn.

Every form may carry ``family`` (the name held-out results are reported under) and ``answer`` (the short final
answer accuracy is scored against; else the text after the last ``####`` of the response, else the response).
"""

from __future__ import annotations

from typing import Any

from .example import ROLES, Example, Turn

__all__ = ["FORMATS", "answer_from_response", "detect_format", "to_example"]

FORMATS = ("alpaca", "chat", "prompt-response")
_SIGNS = {"messages": "chat", "instruction": "alpaca", "prompt": "prompt-response"}


def answer_from_response(response: str) -> str:
    """The text after the last ``####`` of a response (its first line), else the whole response."""
    if "####" in response:
        tail = response.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    return response.strip()


def _fields(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def detect_format(value: Any, where: str) -> str:
    """The form of a record, from its fields: ``messages`` → chat, ``instruction`` → alpaca, ``prompt`` →
    prompt-response."""
    row = _object(value, where)
    for key, form in _SIGNS.items():
        if key in row:
            return form
    raise ValueError(f"{where}: cannot tell the data format from the fields ({_fields(row)}): expected 'messages' "
                     "(chat), 'instruction' and 'output' (alpaca) or 'prompt' and 'response'; or give the format")


def _text(row: dict, key: str, where: str, *, optional: bool = False) -> str:
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise ValueError(f"{where}: missing field {key!r} (has: {_fields(row)})")
    if not isinstance(row[key], str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {_kind(row[key])}")
    return row[key]


def _turns(row: dict, where: str) -> list[Turn]:
    messages = row.get("messages")
    if "messages" not in row:
        raise ValueError(f"{where}: missing field 'messages' (has: {_fields(row)})")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list, got {_kind(messages)}")
    turns = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {number} must be an object with 'role' and 'content', "
                             f"got {_kind(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {number}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {number}: 'content' must be a string, got {_kind(content)}")
        turns.append(Turn(role, content))
    first = next((t for t in turns if t.role != "system"), None)
    if first is None or first.role != "user":
        raise ValueError(f"{where}: after any system messages, a conversation must start with a user message")
    if turns[-1].role != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (it is the {turns[-1].role}'s): "
                         "there is nothing to learn after it")
    if turns[-2].role != "user":
        raise ValueError(f"{where}: the last assistant message must follow a user message")
    return turns


def _answer(row: dict, response: str, where: str) -> str:
    answer = row.get("answer")
    if answer is None:
        return answer_from_response(response)
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise ValueError(f"{where}: field 'answer' must be a string or a number, got {_kind(answer)}")
    return str(answer).strip()


def to_example(value: Any, form: str, where: str, family: str, *,
               prompt_field: str = "prompt", response_field: str = "response") -> Example:
    """One record in ``form`` as an ``Example``; ``family`` unless the record names its own. Errors name ``where``."""
    row = _object(value, where)
    context: tuple[Turn, ...] = ()
    if form == "prompt-response":
        prompt, response = _text(row, prompt_field, where), _text(row, response_field, where)
        what = f"field {response_field!r}"
    elif form == "alpaca":
        instruction, extra = _text(row, "instruction", where), _text(row, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        response, what = _text(row, "output", where), "field 'output'"
    elif form == "chat":
        turns = _turns(row, where)
        context, prompt, response = tuple(turns[:-2]), turns[-2].content, turns[-1].content
        what = "the last assistant message"
    else:
        raise ValueError(f"unknown data format {form!r}: use one of {', '.join(FORMATS)}")
    if not response.strip():
        raise ValueError(f"{where}: {what} is empty: there is nothing to learn")
    own = row.get("family")
    if own is not None and not isinstance(own, str):
        raise ValueError(f"{where}: field 'family' must be a string, got {_kind(own)}")
    return Example(prompt=prompt, response=response, family=own or family, answer=_answer(row, response, where),
                   entry=None, context=context)
