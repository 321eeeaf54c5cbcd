"""What crosses the network: LoRA factors and backbone deltas as Flower ``ArrayRecord``s, and their byte counts.

Every array travels npy-encoded (``np.save``: the values plus a 128-byte header for a matrix). Adapter factors are
float32; a backbone delta's factors travel in the narrowest of float32, float16 and bfloat16 that holds their values
exactly (``delta_array``): FedMomentum's ``residual_dtype`` rounds its residual, so it goes out at 2 bytes a value,
and every other delta at 4. numpy has no bfloat16: its 16-bit payload (the high half of each float32) travels as
uint16, the ``Array``'s dtype tag saying ``bfloat16``. A node checks each delta array (``decode_delta``: the tag,
the npy header against it, the byte count, finite values) before it uses it. Keys:

- adapter factors: ``"<layer>/A"`` and ``"<layer>/B"`` (PEFT shapes ``(r, in)`` and ``(out, r)``); a train
  message carries them as two records, ``global-A`` and ``global-B``, each only when the node lacks it, and what a
  client keeps between rounds (FedSA-LoRA's ``B``, SCAFFOLD's variate: ``"<layer>/<slot>"``) as ``own`` when its
  node lost it, and SCAFFOLD's server variate as ``control`` (``"<layer>/A"``, ``"<layer>/B"``); a reply carries
  the factors the client trained, at the client's own rank;
- backbone deltas: ``"<entry>/<layer>/L"`` and ``"<entry>/<layer>/R"``, the factors of ``D = L @ R`` of the
  backbone log's ``entry`` (``backbone_log``: the method's start, if any, then one entry per round); an entry
  without a delta has no keys.

Nothing here is dense: a delta stays in its factored form from the method to the client's ``W += L @ R``.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from ..checkpoint import SLOT
from ..config import MAY_CHANGE_ON_RESUME, RunConfig
from ..types import LoraPair, LowRank
from .npy import read_npy

NUMPY = "numpy.ndarray"  # Flower's stype for np.save-encoded arrays
DELTA_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}  # a delta's wire dtype tag → its npy dtype


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
    """What a client keeps (``{slot: {layer: tensor}}``: ``B``, ``control_A``, ...), or SCAFFOLD's server variate
    (``{factor: {layer: tensor}}``), as an ``ArrayRecord`` keyed ``<layer>/<slot>``."""
    return ArrayRecord({f"{name}/{slot}": _array(value) for slot, layers in own.items()
                        for name, value in layers.items()})


def record_to_own(record: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """``{slot: {layer: tensor}}`` back from ``own_to_record``; a key that is not ``<layer>/<slot>`` (a slot of
    letters, digits and ``_``) is a ``ValueError`` naming it."""
    own: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        name, sep, slot = key.rpartition("/")
        if not sep or not name or not SLOT.fullmatch(slot):
            raise ValueError(f"unexpected array {key!r}: kept state keys are '<layer>/<slot>'")
        own.setdefault(slot, {})[name] = _tensor(array)
    return own


def delta_array(tensor: torch.Tensor) -> Array:
    """One factor of a backbone delta, in the narrowest wire dtype that holds its float32 values exactly: bfloat16
    (every value's low 16 bits zero), float16 (every value survives the round trip), else float32. Lossless, so
    every node applies the very values the server applied."""
    values = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
    bits = values.view(np.uint32)
    if not (bits & 0xFFFF).any():
        return _tagged("bfloat16", (bits >> 16).astype(np.uint16))
    with np.errstate(over="ignore"):  # beyond float16's range: inf, so not float16
        half = values.astype(np.float16)
    if np.array_equal(half.astype(np.float32), values):
        return Array(half)
    return Array(values)


def _tagged(dtype: str, values: np.ndarray) -> Array:
    """``values`` npy-encoded under the dtype tag ``dtype``."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Array(dtype=dtype, shape=tuple(values.shape), stype=NUMPY, data=buffer.getvalue())


def decode_delta(array: object, what: str) -> torch.Tensor:
    """A backbone delta's factor back as float32, checked before use: an npy-encoded matrix whose tag is a wire
    dtype (``DELTA_DTYPES``), whose header says that dtype and the declared shape, holding exactly that shape's
    bytes, with finite values. Anything else is a ``ValueError`` naming ``what`` and the fault."""
    if not isinstance(array, Array) or array.stype != NUMPY:
        raise ValueError(f"{what}: not an npy-encoded Array")
    if array.dtype not in DELTA_DTYPES:
        raise ValueError(f"{what}: dtype tag {str(array.dtype)[:40]!r}, backbone deltas travel as "
                         f"{', '.join(DELTA_DTYPES)}")
    shape = tuple(array.shape)
    if len(shape) != 2 or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"{what}: shape {shape[:4]}, a delta's factor is a matrix")
    values = read_npy(array.data, shape, DELTA_DTYPES[array.dtype], what, name=array.dtype)
    if array.dtype == "bfloat16":  # the high half of each float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    tensor = torch.from_numpy(values.astype(np.float32))  # a copy: the message's bytes stay read-only
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} has NaN or Inf values")
    return tensor


def deltas_to_record(log: dict[int, dict[str, LowRank]]) -> ArrayRecord:
    """Backbone deltas of several log entries (``{entry: {layer: LowRank}}``) as one ``ArrayRecord``, each factor
    in the narrowest wire dtype that holds it exactly (``delta_array``)."""
    return ArrayRecord({f"{entry}/{name}/{side}": delta_array(getattr(delta, attr))
                        for entry, deltas in sorted(log.items()) for name, delta in deltas.items()
                        for side, attr in (("L", "left"), ("R", "right"))})


def record_to_deltas(record: ArrayRecord) -> dict[int, dict[str, LowRank]]:
    """``{entry: {layer: LowRank}}`` back from ``deltas_to_record``, every array checked (``decode_delta``), and
    each delta's factors of matching inner size; a fault is a ``ValueError`` naming the array."""
    sides: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, array in record.items():
        entry, sep, rest = key.partition("/")
        name, sep2, side = rest.rpartition("/")
        if not (sep and sep2 and entry.isdigit() and name and side in ("L", "R")):
            raise ValueError(f"unexpected array {key!r}: backbone keys are '<entry>/<layer>/L' or '/R'")
        sides.setdefault(int(entry), {}).setdefault(name, {})[side] = decode_delta(array, f"backbone array {key!r}")
    log: dict[int, dict[str, LowRank]] = {}
    for entry, layers in sides.items():
        for name, pair in layers.items():
            if set(pair) != {"L", "R"}:
                raise ValueError(f"backbone delta of log entry {entry}, layer {name!r} lacks a factor")
            if pair["L"].shape[1] != pair["R"].shape[0]:
                raise ValueError(f"backbone delta of log entry {entry}, layer {name!r}: L {tuple(pair['L'].shape)} "
                                 f"and R {tuple(pair['R'].shape)} are not the factors of one product")
            log.setdefault(entry, {})[name] = LowRank(pair["L"], pair["R"])
    return log


def array_bytes(content: RecordDict | None) -> int:
    """Bytes of every array in a message's content: what the factors cost on the wire (npy-encoded)."""
    if content is None:
        return 0
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def fingerprint(config: RunConfig) -> str:
    """A short hash of what defines the clients' model and data (every field a resumed run may not change); a node's
    backbone state is only valid under it."""
    values = {k: v for k, v in config.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
