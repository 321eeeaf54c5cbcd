"""Local training data in files: JSON lines with a prompt and a response."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .example import Example

__all__ = ["load_jsonl"]

def _answer_from_response(response: str) -> str:
    if "####" in response:
        tail = response.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    return response.strip()


def load_jsonl(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    response_field: str = "response",
    family: str | None = None,
) -> list[Example]:
    """Examples from a JSON-lines file: one object per line with a prompt and a response field.

    Optional per-row fields: ``family`` (else the ``family`` argument, else the file's stem) and ``answer``
    (else the text after the last ``####`` in the response, else the whole response). Blank lines are
    skipped. Errors name the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field in (prompt_field, response_field):
                if field not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r} (has: {', '.join(row) or 'none'})")
                if not isinstance(row[field], str):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} must be a string, got {type(row[field]).__name__}"
                    )
            response = row[response_field]
            fam = family if family is not None else row.get("family", path.stem)
            answer = row.get("answer")
            answer = str(answer).strip() if answer is not None else _answer_from_response(response)
            examples.append(
                Example(prompt=row[prompt_field], response=response, family=str(fam), answer=answer, entry=None)
            )
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples
