"""A run's per-round records on disk: ``metrics.jsonl`` (a line per round) and ``aggregation.jsonl`` (per layer)."""

from __future__ import annotations

import json
from pathlib import Path

from .rundir import write_text, writing


def read_jsonl(path: str | Path, torn_tail: bool = False) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); a line that is not a JSON object is a ``ValueError``
    naming the file and the line, except, with ``torn_tail``, the last one (a write a crash cut short)."""
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            if torn_tail and index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{number}: not a record of this run (a JSON object with a round)")
        rows.append(row)
    return rows


class Records:
    """Appends to ``metrics.jsonl`` and ``aggregation.jsonl`` in ``out``; ``rows`` holds the metrics so far.

    ``keep_rounds=None`` starts both files empty; on resume, ``keep_rounds`` drops the rounds the checkpoint
    does not hold (a crash may have recorded a round it never checkpointed, or only part of its line).
    """

    def __init__(self, out: Path, keep_rounds: int | None = None):
        self.metrics, self.layers = out / "metrics.jsonl", out / "aggregation.jsonl"
        self.rows: list[dict] = []
        for path in (self.metrics, self.layers):
            rows = [] if keep_rounds is None or not path.exists() else read_jsonl(path, torn_tail=True)
            rows = [row for row in rows if row["round"] <= (keep_rounds or 0)]
            write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
            if path == self.metrics:
                self.rows = rows

    def append(self, record: dict, layers: dict | None = None) -> None:
        self.rows.append(record)
        with writing(self.metrics), self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if layers is not None:
            with writing(self.layers), self.layers.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"round": record["round"], "layers": layers}) + "\n")


def read_metrics(out: str | Path) -> list[dict]:
    """The ``metrics.jsonl`` rows of the run in ``out``."""
    return read_jsonl(Path(out) / "metrics.jsonl")
