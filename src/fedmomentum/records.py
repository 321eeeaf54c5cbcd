"""A run's per-round records on disk: ``metrics.jsonl`` (a line per round) and ``aggregation.jsonl`` (per layer)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Records:
    """Appends to ``metrics.jsonl`` and ``aggregation.jsonl`` in ``out``; ``rows`` holds the metrics so far.

    ``keep_rounds=None`` starts both files empty; on resume, ``keep_rounds`` drops the rounds the checkpoint
    does not hold (a crash may have recorded a round it never checkpointed).
    """

    def __init__(self, out: Path, keep_rounds: int | None = None):
        self.metrics, self.layers = out / "metrics.jsonl", out / "aggregation.jsonl"
        self.rows: list[dict] = []
        for path in (self.metrics, self.layers):
            rows = [] if keep_rounds is None or not path.exists() else read_jsonl(path)
            rows = [row for row in rows if row["round"] <= (keep_rounds or 0)]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            if path == self.metrics:
                self.rows = rows

    def append(self, record: dict, layers: dict | None = None) -> None:
        self.rows.append(record)
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if layers is not None:
            with self.layers.open("a") as handle:
                handle.write(json.dumps({"round": record["round"], "layers": layers}) + "\n")


def read_metrics(out: str | Path) -> list[dict]:
    """The ``metrics.jsonl`` rows of the run in ``out``."""
    return read_jsonl(Path(out) / "metrics.jsonl")
