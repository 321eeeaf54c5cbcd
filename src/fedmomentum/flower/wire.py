"""What crosses the network: LoRA factors and backbone deltas as Flower ``ArrayRecord``s, and their byte counts.

Everything travels as float32 numpy arrays (numpy has no bfloat16). Keys:

- adapter factors: ``"<layer>/A"`` and ``"<layer>/B"`` (PEFT shapes ``(r, in)`` and ``(out, r)``); a train
  message carries them as two records, ``global-A`` and ``global-B``, each only when the node lacks it, and a
  client's own kept factors (FedSA-LoRA's ``B``) as ``own`` when its node lost them; a reply carries the factors
  the client trained, at the client's own rank;
- backbone deltas: ``"<round>/<layer>/L"`` and ``"<round>/<layer>/R"``, the factors of ``D = L @ R`` that the
  aggregation of ``round`` (0-based) produced; a round without a delta has no keys.

Nothing here is dense: a delta stays in its factored form from the method to the client's ``W += L @ R``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from ..config import MAY_CHANGE_ON_RESUME, RunConfig
from ..types import LoraPair, LowRank


def _array(tensor: torch.Tensor) -> Array:
    return Array(np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy()))


def _tensor(array: Array) -> torch.Tensor:
    return torch.from_numpy(np.array(array.numpy(), dtype=np.float32, copy=True))


def lora_to_record(lora: dict[str, LoraPair], factors: tuple[str, ...] = ("A", "B")) -> ArrayRecord:
    """The adapter (or only the given factors of it) as an ``ArrayRecord``."""
    return ArrayRecord({f"{name}/{factor}": _array(getattr(pair, factor))
                        for name, pair in lora.items() for factor in factors})


def record_to_factors(record: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {"A": tensor, "B": tensor}}`` with whatever factors the record holds.

    A key that is not ``<layer>/A`` or ``<layer>/B`` is a ``ValueError`` naming it.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        name, sep, factor = key.rpartition("/")
        if not sep or not name or factor not in ("A", "B"):
            raise ValueError(f"unexpected array {key!r}: adapter keys are '<layer>/A' or '<layer>/B'")
        factors.setdefault(name, {})[factor] = _tensor(array)
    return factors


def record_to_lora(record: ArrayRecord) -> dict[str, LoraPair]:
    """A whole adapter back from ``lora_to_record``; every layer needs both factors."""
    factors = record_to_factors(record)
    incomplete = sorted(name for name, pair in factors.items() if set(pair) != {"A", "B"})
    if incomplete:
        raise ValueError(f"adapter layers without both A and B: {incomplete[:3]}")
    return {name: LoraPair(pair["A"], pair["B"]) for name, pair in factors.items()}


def split_factors(record: ArrayRecord) -> dict[str, ArrayRecord]:
    """``{"A": ..., "B": ...}``: an adapter record split by factor, so a message can carry only one of them."""
    return {factor: ArrayRecord({k: v for k, v in record.items() if k.endswith("/" + factor)})
            for factor in ("A", "B")}


def factor_digest(lora: dict[str, LoraPair], factor: str) -> str:
    """A hash of one factor ("A" or "B") of the adapter, as float32: the client checks that each global factor it
    assembled (kept from an earlier round, or sent now) is the server's."""
    return layers_digest({name: getattr(pair, factor) for name, pair in lora.items()})


def layers_digest(layers: dict[str, torch.Tensor]) -> str:
    """A hash of ``{layer: tensor}`` as float32 values (what travels)."""
    digest = hashlib.sha256()
    for name in sorted(layers):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(layers[name].detach().to("cpu", torch.float32).numpy()).tobytes())
    return digest.hexdigest()[:32]


def own_digest(own: dict[str, dict[str, torch.Tensor]] | None) -> str:
    """A hash of what a client keeps between rounds (``{factor: {layer: tensor}}``, ``Method.local_state``); ``""``
    for nothing."""
    if not own:
        return ""
    return "".join(f"{factor}:{layers_digest(own[factor])};" for factor in sorted(own))


def own_to_record(own: dict[str, dict[str, torch.Tensor]]) -> ArrayRecord:
    """A client's kept factors (``{factor: {layer: tensor}}``) as an ``ArrayRecord`` keyed ``<layer>/<factor>``."""
    return ArrayRecord({f"{name}/{factor}": _array(value) for factor, layers in own.items()
                        for name, value in layers.items()})


def record_to_own(record: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """``{factor: {layer: tensor}}`` back from ``own_to_record``."""
    own: dict[str, dict[str, torch.Tensor]] = {}
    for name, factors in record_to_factors(record).items():
        for factor, value in factors.items():
            own.setdefault(factor, {})[name] = value
    return own


def deltas_to_record(log: dict[int, dict[str, LowRank]]) -> ArrayRecord:
    """Backbone deltas of several rounds (``{round: {layer: LowRank}}``) as one ``ArrayRecord``."""
    return ArrayRecord({f"{round}/{name}/{side}": _array(getattr(delta, attr))
                        for round, deltas in sorted(log.items()) for name, delta in deltas.items()
                        for side, attr in (("L", "left"), ("R", "right"))})


def record_to_deltas(record: ArrayRecord) -> dict[int, dict[str, LowRank]]:
    """``{round: {layer: LowRank}}`` back from ``deltas_to_record``."""
    sides: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, array in record.items():
        round, sep, rest = key.partition("/")
        name, sep2, side = rest.rpartition("/")
        if not (sep and sep2 and round.isdigit() and name and side in ("L", "R")):
            raise ValueError(f"unexpected array {key!r}: backbone keys are '<round>/<layer>/L' or '/R'")
        sides.setdefault(int(round), {}).setdefault(name, {})[side] = _tensor(array)
    log: dict[int, dict[str, LowRank]] = {}
    for round, layers in sides.items():
        for name, pair in layers.items():
            if set(pair) != {"L", "R"}:
                raise ValueError(f"backbone delta of round {round}, layer {name!r} lacks a factor")
            log.setdefault(round, {})[name] = LowRank(pair["L"], pair["R"])
    return log


def array_bytes(content: RecordDict | None) -> int:
    """Bytes of every array in a message's content: what the factors cost on the wire (npy-encoded)."""
    if content is None:
        return 0
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def fingerprint(config: RunConfig) -> str:
    """A short hash of what defines the clients' model and data; a node's backbone state is only valid under it."""
    values = {k: v for k, v in config.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}  # the model and data only
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
