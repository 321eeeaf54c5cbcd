"""The one record every data source produces: a prompt, the response to learn, its family and its answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["ROLES", "Example", "Turn", "by_family"]

ROLES = ("system", "user", "assistant")


class Turn(NamedTuple):
    """One message of a conversation: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One supervised example: the model sees ``prompt`` (as the user turn) and learns ``response``.

    ``answer`` is the short final answer used for scoring; ``entry`` is the reasoning-gym entry (question,
    answer, metadata) when the example comes from reasoning-gym, else ``None`` (or a small source record); it
    takes no part in equality or hashing.

    ``context`` holds the turns of a conversation that come before ``prompt`` (system turns, earlier user and
    assistant turns), empty for a single exchange. The model learns every assistant turn, those in ``context``
    included; ``prompt``/``response`` are the last exchange, the one a generation prompt asks for.
    """

    prompt: str
    response: str
    family: str
    answer: str
    entry: dict | None = field(default=None, compare=False, repr=False)
    context: tuple[Turn, ...] = ()

    def messages(self) -> list[dict[str, str]]:
        """The whole conversation as chat-template messages: the context, then the prompt and the response."""
        turns = [*self.context, Turn("user", self.prompt), Turn("assistant", self.response)]
        return [{"role": turn.role, "content": turn.content} for turn in turns]


def by_family(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Group examples by family, keeping their order (families in order of first appearance)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.family, []).append(ex)
    return groups
