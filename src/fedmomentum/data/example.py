"""The one record every data source produces: a prompt, the response to learn, its family and its answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Example", "by_family"]

@dataclass(frozen=True)
class Example:
    """One supervised example: the model sees ``prompt`` (as the user turn) and learns ``response``.

    ``answer`` is the short final answer used for scoring; ``entry`` is the reasoning-gym entry (question,
    answer, metadata) when the example comes from reasoning-gym, else ``None`` (or a small source record); it
    takes no part in equality or hashing.
    """

    prompt: str
    response: str
    family: str
    answer: str
    entry: dict | None = field(default=None, compare=False, repr=False)



def by_family(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Group examples by family, keeping their order (families in order of first appearance)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.family, []).append(ex)
    return groups

