"""Checkpoints: one safetensors file holding the round, adapter, adapted backbone weights and the method's held deltas.

Written to a temporary file and renamed over the old one, so a crash never leaves a half-written checkpoint.
No pickle anywhere: tensors go through safetensors, everything else through JSON metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .rundir import writing
from .types import LoraPair, LowRank


@dataclass
class Checkpoint:
    round: int  # the last completed round (0-based)
    lora: dict[str, LoraPair]
    backbone: dict[str, torch.Tensor]  # the adapted layers' base weights
    held: dict[str, LowRank]  # deltas the method holds back for a later round (``Aggregate.held``)
    info: dict  # JSON-able: config, records needed to continue


def save(path: str | Path, checkpoint: Checkpoint) -> None:
    tensors = {}
    for name, pair in checkpoint.lora.items():
        tensors[f"lora.A.{name}"] = pair.A.contiguous()
        tensors[f"lora.B.{name}"] = pair.B.contiguous()
    tensors.update({f"backbone.{name}": w.contiguous() for name, w in checkpoint.backbone.items()})
    for name, delta in checkpoint.held.items():
        tensors[f"held.L.{name}"] = delta.left.contiguous()
        tensors[f"held.R.{name}"] = delta.right.contiguous()
    metadata = {"round": str(checkpoint.round), "info": json.dumps(checkpoint.info), "format": "fedmomentum/1"}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint; a missing, truncated or foreign file is a ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        tensors = load_file(str(path))

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != "fedmomentum/1":
            raise ValueError("not a fedmomentum checkpoint")
        round_, info = int(metadata["round"]), json.loads(metadata["info"])
        if round_ < 0 or not isinstance(info, dict):
            raise ValueError("bad round or info in its metadata")
    except (SafetensorError, ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {' '.join(str(error).split())}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.ndim != 2 or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"corrupt checkpoint {path}: tensor {key} is not a finite matrix")
    try:
        lora = {n: LoraPair(tensors[f"lora.A.{n}"], tensors[f"lora.B.{n}"]) for n in _names(tensors, "lora.A.")}
        held = {n: LowRank(tensors[f"held.L.{n}"], tensors[f"held.R.{n}"]) for n in _names(tensors, "held.L.")}
    except KeyError as missing:
        raise ValueError(f"corrupt checkpoint {path}: missing tensor {missing}") from None
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return Checkpoint(round_, lora, backbone, held, info)


def _names(tensors: dict, prefix: str) -> list[str]:
    return [key[len(prefix):] for key in tensors if key.startswith(prefix)]
