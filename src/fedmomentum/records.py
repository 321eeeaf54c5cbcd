"""A run's per-round records on disk: ``metrics.jsonl`` (a line per round) and ``aggregation.jsonl`` (per layer),
and with ``report_to = "tensorboard"`` every per-round scalar as TensorBoard events in ``tensorboard/``.

Lines are strict JSON: a number that is not finite (a loss that overflowed) is written as ``null``, never as
Python's ``NaN`` / ``Infinity``, which strict JSON readers refuse."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path

from .rundir import write_text, writing

REPORTERS = ("none", "tensorboard")  # transformers' spelling
TENSORBOARD = "tensorboard"  # the folder under the run's output


def check_report_to(report_to: str | list[str]) -> list[str]:
    """The reporters asked for (``"none"`` dropped); an unknown one, or TensorBoard without its package, is an
    error saying what to do."""
    if isinstance(report_to, str):  # one name, or the text of a list ("[tensorboard]", "tensorboard,none")
        report_to = [n.strip() for n in report_to.strip().strip("[]").split(",") if n.strip()] or ["none"]
    names = report_to
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"report_to must be a name or a list of names, got {report_to!r}")
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown {unknown[0]!r}; choose from {', '.join(REPORTERS)}")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("report_to='tensorboard' needs the tensorboard package: "
                         "pip install 'fedmomentum[tensorboard]'")
    return [n for n in names if n != "none"]


def finite(value):
    """``value`` with every float that is not finite replaced by ``None`` (in dicts, lists and tuples too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def json_line(record: dict) -> str:
    """One strict-JSON line (non-finite numbers as ``null``)."""
    return json.dumps(finite(record), allow_nan=False) + "\n"


def scalars(record: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a round's record as ``(tag, value)``, nested dicts flattened with ``/`` (the round itself,
    text, lists and flags left out)."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and tag != "round":
            yield tag, float(value)


class TensorBoardLog:
    """Per-round scalars as TensorBoard events (``torch.utils.tensorboard``), flushed every round so that a
    running job can be watched; ``purge_step`` drops what a crashed run wrote after its checkpoint."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, record: dict) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
    ``report_to`` adds TensorBoard.
    """

    def __init__(self, out: Path, keep_rounds: int | None = None, report_to: str | list[str] = "none"):
        self.tensorboard = None
        if TENSORBOARD in check_report_to(report_to):
            self.tensorboard = TensorBoardLog(out / TENSORBOARD, None if keep_rounds is None else keep_rounds + 1)
        self.metrics, self.layers = out / "metrics.jsonl", out / "aggregation.jsonl"
        self.rows: list[dict] = []
        for path in (self.metrics, self.layers):
            rows = [] if keep_rounds is None or not path.exists() else read_jsonl(path, torn_tail=True)
            rows = [row for row in rows if row["round"] <= (keep_rounds or 0)]
            write_text(path, "".join(json_line(row) for row in rows))
            if path == self.metrics:
                self.rows = rows

    def append(self, record: dict, layers: dict | None = None) -> None:
        self.rows.append(record)
        with writing(self.metrics), self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json_line(record))
        if layers is not None:
            with writing(self.layers), self.layers.open("a", encoding="utf-8") as handle:
                handle.write(json_line({"round": record["round"], "layers": layers}))
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(out: str | Path) -> list[dict]:
    """The ``metrics.jsonl`` rows of the run in ``out``."""
    return read_jsonl(Path(out) / "metrics.jsonl")
