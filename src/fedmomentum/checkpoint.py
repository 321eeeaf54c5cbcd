"""Checkpoints: a ``ServerState`` as one safetensors file (``state.py``): the rounds done, the adapter, the adapted
layers' backbone, the method's state, what the clients keep between rounds, SCAFFOLD's server variate, the
backbone's whole change, what the momentum measures carry and the stragglers' updates not yet arrived, plus JSON
metadata (the config, the seconds spent).

Written to a temporary file and renamed over the old one, so a crash never leaves a half-written checkpoint.
No pickle anywhere: tensors go through safetensors, everything else through JSON metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .backbone_change import BackboneChange
from .momentum import MomentumState
from .rundir import write_file
from .state import Pending, ServerState
from .types import ClientUpdate, LoraPair, LowRank, StateDict

FORMAT = "fedmomentum/2"
SLOT = re.compile(r"[A-Za-z0-9_]+")  # a state slot's name: no dots, so that ``slot.layer`` splits once


def save(path: str | Path, state: ServerState, info: dict) -> None:
    """Write ``state`` and ``info`` (JSON-able) to ``path``, whole or not at all."""
    tensors = {}
    for name, pair in state.lora.items():
        tensors[f"lora.A.{name}"] = pair.A
        tensors[f"lora.B.{name}"] = pair.B
    tensors.update({f"backbone.{name}": weight for name, weight in state.backbone.items()})
    tensors.update(_flatten("method", state.method))
    tensors.update(_flatten("control", state.control))
    for index, kept in enumerate(state.clients.values()):  # ids (any text) go in the metadata
        tensors.update(_flatten(f"client.{index}", kept))
    for name, delta in (state.change.deltas if state.change is not None else {}).items():
        tensors[f"change.L.{name}"] = delta.left
        tensors[f"change.R.{name}"] = delta.right
    tensors.update({f"momentum.{key}": value for key, value in state.momentum.tensors().items()})
    for index, pending in enumerate(state.pending):  # the factors here, the rest in the metadata
        tensors.update(_flatten(f"stale.{index}", _pending_tensors(pending)))
    tensors = _own_storage({key: value.detach().cpu().contiguous() for key, value in tensors.items()})
    metadata = {"round": str(state.rounds_done), "info": json.dumps(info), "format": FORMAT,
                "clients": json.dumps(list(state.clients)), "change": str(state.change is not None),
                "momentum": json.dumps(state.momentum.info()),
                "stale": json.dumps([_pending_info(pending) for pending in state.pending])}
    write_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(path: str | Path) -> tuple[ServerState, dict]:
    """The state and info in a checkpoint; a missing, truncated or foreign file is a ``ValueError`` naming the file.
    The backbone comes back as saved (CPU tensors): ``peft_io.set_backbone`` puts it into a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") not in (FORMAT, "fedmomentum/1"):
            raise ValueError("not a fedmomentum checkpoint")
        rounds, info = int(metadata["round"]), json.loads(metadata["info"])
        ids = json.loads(metadata.get("clients", "[]"))
        tracked = metadata.get("change") == "True"
        momentum_info = json.loads(metadata.get("momentum", "null"))
        stale = json.loads(metadata.get("stale", "[]"))  # a checkpoint written before stragglers holds none
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("the client ids are not a list of names")
        if rounds < 0 or not isinstance(info, dict):
            raise ValueError("bad round or info in its metadata")
    except (SafetensorError, ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {' '.join(str(error).split())}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.ndim != 2 or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"corrupt checkpoint {path}: tensor {key} is not a finite matrix")
    if metadata["format"] == "fedmomentum/1":  # FedMomentum's held residuals before the method state had slots
        tensors = {re.sub(r"^held\.([LR])\.", lambda m: f"method.held_{'left' if m[1] == 'L' else 'right'}.", key):
                   value for key, value in tensors.items()}
    try:
        lora = {n: LoraPair(tensors[f"lora.A.{n}"], tensors[f"lora.B.{n}"]) for n in _names(tensors, "lora.A.")}
        change = (BackboneChange({n: LowRank(tensors[f"change.L.{n}"], tensors[f"change.R.{n}"])
                                  for n in _names(tensors, "change.L.")}) if tracked else None)
    except KeyError as missing:
        raise ValueError(f"corrupt checkpoint {path}: missing tensor {missing}") from None
    momentum_tensors = {key: tensors[f"momentum.{key}"] for key in _names(tensors, "momentum.")}
    try:  # a checkpoint written before momentum was measured starts the measures afresh
        momentum = (MomentumState.restore(momentum_tensors, momentum_info) if momentum_info is not None
                    else MomentumState())
    except ValueError as error:
        raise ValueError(f"corrupt checkpoint {path}: {error}") from None
    clients: dict[str, StateDict] = {}
    for key in _names(tensors, "client."):
        index, slot, name = (key.split(".", 2) + ["", ""])[:3]
        if not index.isdigit() or int(index) >= len(ids) or not SLOT.fullmatch(slot) or not name:
            raise ValueError(f"corrupt checkpoint {path}: bad client tensor name 'client.{key}'")
        clients.setdefault(ids[int(index)], {}).setdefault(slot, {})[name] = tensors[f"client.{key}"]
    pending = tuple(_pending(index, info_, _unflatten(tensors, f"stale.{index}", path), path)
                    for index, info_ in enumerate(stale if isinstance(stale, list) else [None]))
    state = ServerState(
        rounds_done=rounds,
        lora=lora,
        method=_unflatten(tensors, "method", path),
        control=_unflatten(tensors, "control", path),
        clients=clients,
        backbone={k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")},
        change=change,
        momentum=momentum,
        pending=pending,
    )
    return state, info


PENDING_SLOTS = ("A", "B", "start_A", "start_B")
PENDING_INFO = {"client_id": str, "num_examples": int, "scaling": (float, type(None)), "trained_in": int,
                "arrives": int}


def _pending_tensors(pending: Pending) -> StateDict:
    """A pending update's factors and start as state slots (``slot → layer → tensor``)."""
    trained, start = pending.update.factors, pending.start
    return {"A": {n: p.A for n, p in trained.items()}, "B": {n: p.B for n, p in trained.items()},
            "start_A": {n: p.A for n, p in start.items()}, "start_B": {n: p.B for n, p in start.items()}}


def _pending_info(pending: Pending) -> dict:
    update = pending.update
    return {"client_id": update.client_id, "num_examples": int(update.num_examples),
            "scaling": None if update.scaling is None else float(update.scaling), "trained_in": pending.trained_in,
            "arrives": pending.arrives}


def _pending(index: int, info, slots: StateDict, path: Path) -> Pending:
    """The ``index``-th pending update from its metadata ``info`` and its tensors ``slots``; anything missing or of
    the wrong kind is a ``ValueError`` naming the file."""
    if not isinstance(info, dict) or set(info) != set(PENDING_INFO) or \
            not all(isinstance(info[k], kind) and not isinstance(info[k], bool) for k, kind in PENDING_INFO.items()):
        raise ValueError(f"corrupt checkpoint {path}: pending update {index} has bad metadata {info!r}")
    layers = set(slots.get("A", {}))
    if set(slots) != set(PENDING_SLOTS) or not layers or any(set(slots[s]) != layers for s in PENDING_SLOTS):
        raise ValueError(f"corrupt checkpoint {path}: pending update {index} lacks some of its factors")
    update = ClientUpdate({n: LoraPair(slots["A"][n], slots["B"][n]) for n in sorted(layers)}, info["num_examples"],
                          info["client_id"], info["scaling"])
    start = {n: LoraPair(slots["start_A"][n], slots["start_B"][n]) for n in sorted(layers)}
    return Pending(update, start, info["trained_in"], info["arrives"])


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor in storage of its own (safetensors refuses tensors that share memory, such as a round's change
    that is also the whole change so far): a copy of any tensor whose storage an earlier one uses."""
    seen: set[int] = set()
    for key, value in tensors.items():
        storage = value.untyped_storage().data_ptr()
        if storage in seen:
            tensors[key] = value.clone()
        seen.add(storage)
    return tensors


def _flatten(prefix: str, state: StateDict) -> dict[str, torch.Tensor]:
    for slot in state:
        if not SLOT.fullmatch(slot):
            raise ValueError(f"state slot {slot!r}: letters, digits and _ only")
    return {f"{prefix}.{slot}.{name}": value for slot, layers in state.items() for name, value in layers.items()}


def _unflatten(tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> StateDict:
    state: StateDict = {}
    for key in _names(tensors, f"{prefix}."):
        slot, _, name = key.partition(".")
        if not SLOT.fullmatch(slot) or not name:
            raise ValueError(f"corrupt checkpoint {path}: bad tensor name '{prefix}.{key}'")
        state.setdefault(slot, {})[name] = tensors[f"{prefix}.{key}"]
    return state


def _names(tensors: dict, prefix: str) -> list[str]:
    return [key[len(prefix):] for key in tensors if key.startswith(prefix)]
