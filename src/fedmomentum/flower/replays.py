"""Replayed replies: a client's factors identical to one of its earlier accepted replies are refused.

A digest (``wire.layers_digest``, SHA-256 of the float32 values) of every accepted train reply's factors is kept
per client with its round, and saved beside the checkpoint (``replays.json``) so a resumed server still knows them.
On resume the digests of rounds after the checkpoint are dropped: that round is trained again, and its honest
replies are the same bytes as before the crash.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..rundir import write_text
from ..types import LoraPair
from .wire import layers_digest

FILE = "replays.json"


def factors_digest(factors: dict[str, LoraPair], trained: dict[str, bool]) -> str:
    """The digest of the factors a client trained (the ones its reply carries)."""
    return layers_digest({f"{name}/{f}": getattr(pair, f) for name, pair in factors.items()
                          for f in ("A", "B") if trained[f]})


class Replays:
    """Client id → {digest of an accepted reply's factors: its round}."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, int]] = {}

    def earlier(self, client: str, digest: str) -> int | None:
        """The round of ``client``'s earlier accepted reply with these factors, or None."""
        return self.seen.get(client, {}).get(digest)

    def add(self, client: str, digest: str, t: int) -> None:
        self.seen.setdefault(client, {})[digest] = t

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(self.seen, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path, rounds: int) -> Replays:
        """The digests of rounds ``1 … rounds`` in ``path`` (none when it is missing: a run from before it)."""
        replays = cls()
        if not path.is_file():
            return replays
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a replay log of this run: {error}") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{path} is not a replay log of this run")
        for client, digests in saved.items():
            if not isinstance(digests, dict):
                raise ValueError(f"{path} is not a replay log of this run")
            replays.seen[client] = {d: t for d, t in digests.items() if isinstance(t, int) and t <= rounds}
        return replays


__all__ = ["FILE", "Replays", "factors_digest"]
