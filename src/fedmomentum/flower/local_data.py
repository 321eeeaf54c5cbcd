"""Data that lives where the process runs: a node's training examples and the server's held-out examples.

A SuperNode started with ``--node-config "partition-id=0 num-partitions=2 data='/srv/data/train.jsonl'"`` trains on
the examples in that file or folder, which never leave the node (only their count does). Without ``data`` a node
builds its seeded synthetic partition, as the simulation does. The server evaluates on its own held-out data:
the config's seeded held-out examples, a file or folder on the server (run config ``eval-data``), or nothing
(``eval-data='none'``); never on anything from the nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..build import client_examples
from ..config import RunConfig
from ..data import Example, by_family, load_jsonl

NO_EVALUATION = "none"


def read_examples(path: str | Path) -> list[Example]:
    """The examples of a data file or a folder of them.

    Reads JSON lines (``load_jsonl``: a file, or every ``*.jsonl`` of a folder, by name). The lead swaps this body
    for ``fedmomentum.data.load_examples(path)`` once that loader (every format ``fedmomentum run`` reads) lands.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path}: the folder holds no .jsonl files")
        return [example for file in files for example in load_jsonl(file)]
    return load_jsonl(path)


def node_examples(config: RunConfig, node_config: Mapping, partition: int) -> tuple[list[Example], str]:
    """The examples this node trains on, and where they come from: its node config's ``data``, else its seeded
    synthetic partition."""
    data = node_config.get("data")
    if data is not None and not isinstance(data, str):
        raise ValueError(f"node config data={data!r}: give a path, e.g. --node-config \"data='/srv/train.jsonl'\"")
    if data:
        return read_examples(data), data
    parts, _ = client_examples(config)
    return parts[partition], f"synthetic partition {partition} of {config.clients}"


def server_held_out(config: RunConfig, eval_data: str) -> dict[str, list[Example]] | None:
    """The server's held-out examples per family: ``None`` for the config's own seeded ones (``eval_data`` empty),
    none at all for ``"none"``, else those in the file or folder ``eval_data`` on the server."""
    if not eval_data:
        return None
    if eval_data == NO_EVALUATION:
        return {}
    return by_family(read_examples(eval_data))
