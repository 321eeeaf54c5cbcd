"""The server's log of every backbone delta, which a node that joins late or restarts replays.

Each entry is one step of the backbone version: the method's start when it has one (FRLoRA's ``Method.start``,
applied before round 0: entry 0), then one entry per round, holding the backbone delta the round's aggregation
produced (empty when none) and which adapter factors it changed. A node at backbone version ``v`` is sent exactly
the deltas of entries ``v …`` and the factors that moved since. Saved beside the checkpoint
(``backbone_log.safetensors``) so a resumed server can still serve it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..types import LoraPair, LowRank

FILE = "backbone_log.safetensors"


class BackboneLog:
    def __init__(self) -> None:
        self.deltas: list[dict[str, LowRank]] = []  # entry t: the delta of version step t
        self.adapter_changes: list[dict[str, bool]] = []  # entry t: did it change the global A / B?
        self.start = False  # is entry 0 the method's start (then entry t + 1 is round t)?

    @property
    def version(self) -> int:
        """The backbone version after every logged entry (the start, if any, and the rounds)."""
        return len(self.deltas)

    @property
    def rounds(self) -> int:
        """The rounds logged."""
        return self.version - self.start

    def begin(self, delta: dict[str, LowRank]) -> None:
        """The method's start, before any round: it replaces the whole adapter and changes the backbone."""
        if self.deltas:
            raise ValueError("the method's start must be the log's first entry")
        self.deltas.append(delta)
        self.adapter_changes.append({"A": True, "B": True})
        self.start = True

    def append(self, delta: dict[str, LowRank], previous: dict[str, LoraPair], new: dict[str, LoraPair]) -> None:
        """A round's entry: its backbone delta, and which global factors moved from ``previous`` to ``new``."""
        self.deltas.append(delta)
        self.adapter_changes.append({factor: any(not torch.equal(getattr(new[name], factor), getattr(pair, factor))
                                                 for name, pair in previous.items())
                                     for factor in ("A", "B")})

    def since(self, version: int) -> dict[int, dict[str, LowRank]]:
        """The non-empty deltas of entries ``version …`` (what a node at ``version`` lacks)."""
        return {t: self.deltas[t] for t in range(version, self.version) if self.deltas[t]}

    def changed_since(self, version: int, factor: str) -> bool:
        """Whether an entry since ``version`` changed the global ``factor`` ("A" or "B")."""
        return any(self.adapter_changes[t][factor] for t in range(version, self.version))

    def save(self, path: Path) -> None:
        """Written to a temporary file and renamed, like the checkpoint."""
        tensors = {f"{t}/{name}/{side}": getattr(delta, attr).contiguous()
                   for t, deltas in enumerate(self.deltas) for name, delta in deltas.items()
                   for side, attr in (("L", "left"), ("R", "right"))}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"rounds": str(self.rounds), "start": str(int(self.start)),
                                               "format": "fedmomentum-log/1",
                                               "adapter_changes": json.dumps(self.adapter_changes)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, rounds: int) -> BackboneLog:
        """The first ``rounds`` rounds of a saved log (after its start entry, if it has one)."""
        if not path.is_file():
            raise ValueError(f"cannot resume on Flower without {path}: late or restarted nodes need every round's "
                             "backbone delta (a run started by `fedmomentum run` cannot continue on Flower)")
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            saved = int(metadata.get("rounds", -1))
            if saved < rounds:
                raise ValueError(f"{path} holds {saved} rounds of backbone deltas, the checkpoint needs {rounds}")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        log = cls()
        log.start = metadata.get("start") == "1"
        entries = rounds + int(log.start)
        log.adapter_changes = json.loads(metadata["adapter_changes"])[:entries]
        log.deltas = [{} for _ in range(entries)]
        for key, left in tensors.items():
            t, rest = key.split("/", 1)
            name, _, side = rest.rpartition("/")
            if side == "L" and int(t) < entries:
                log.deltas[int(t)][name] = LowRank(left, tensors[f"{t}/{name}/R"])
        return log
