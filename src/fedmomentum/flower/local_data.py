"""Data that lives where the process runs: a node's training examples and the server's held-out examples.

A SuperNode started with ``--node-config "partition-id=0 num-partitions=2 data='/srv/data/train.jsonl'"`` trains on
the examples in that file or folder, in any format ``fedmomentum run`` reads (``data.load_examples``: JSON lines,
JSON, Parquet, ``save_to_disk`` folders; ``data-format`` in the node config forces one of ``data.FORMATS``). They
never leave the node (only their count does). Without ``data`` a node
builds its seeded synthetic partition, as the simulation does. The server evaluates on its own held-out data:
the config's seeded held-out examples, a file or folder on the server (run config ``eval-data``), or nothing
(``eval-data='none'``); never on anything from the nodes.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..build import client_examples
from ..config import RunConfig
from ..data import FORMATS, Example, by_family, load_examples

NO_EVALUATION = "none"


def node_examples(config: RunConfig, node_config: Mapping, partition: int) -> tuple[list[Example], str]:
    """The examples this node trains on, and where they come from: its node config's ``data``, else its seeded
    synthetic partition."""
    data, form = node_config.get("data"), node_config.get("data-format") or None
    for key, value in (("data", data), ("data-format", form)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"node config {key}={value!r} must be a string "
                             "(e.g. --node-config \"data='/srv/train.jsonl'\")")
    if form is not None and form not in FORMATS:
        raise ValueError(f"node config data-format={form!r}: use one of {', '.join(FORMATS)} (or leave it out)")
    if data:
        return load_examples(data, form), data
    parts, _ = client_examples(config)
    return parts[partition], f"synthetic partition {partition} of {config.clients}"


def server_held_out(config: RunConfig, eval_data: str) -> dict[str, list[Example]] | None:
    """The server's held-out examples per family: ``None`` for the config's own seeded ones (``eval_data`` empty),
    none at all for ``"none"``, else those in the file or folder ``eval_data`` on the server."""
    if not eval_data:
        return None
    if eval_data == NO_EVALUATION:
        return {}
    return by_family(load_examples(eval_data))
