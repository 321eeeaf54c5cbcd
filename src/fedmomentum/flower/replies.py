"""Every reply a node sends is checked here, in one step, before anything in it is used.

Three replies exist: the hello (which partition a node holds, its backbone version, how many examples it has), the
resync (the backbone version it really has) and the train reply (the factors it trained at its client's rank, its
example count and its LoRA scaling).
Each has one parser that checks it against the protocol and the run's ``Limits`` and raises ``ReplyError`` naming
what is wrong; the strategy then leaves that node out and records the reason.

Arrays are checked before they are decoded, so no reply can make the server allocate more than the protocol
allows: the declared serialisation (numpy), dtype (float32) and shape (exactly the configured one, at the rank
configured for that client) first, then the
byte count against that shape, then the npy header (it must say the same), and only then the values are read, with
``np.frombuffer`` (never ``np.load``: a header claiming a 37 GiB array is never allocated). Factors must be finite
and within ``Limits.max_abs`` of where the client started (``|x| ≤ max_abs + max |start factor|``: 1e30 is finite,
and breaks the SVD; the bound follows the global adapter, so no one can get an honest reply refused by inflating
it); counts are integers in ``1 … max_examples``; versions are integers in ``0 … the server's version``; the scaling
is exactly the one the client's rank gives. Before any of this, a reply larger than ``reply_cap`` bytes is never
downloaded whole (``pull``).

Text a node sends (its hello's ``error``, an error reply's reason, any value quoted in a ``ReplyError``) reaches logs
and records only through ``shown``: control characters escaped, cut to ``SHOWN_CHARS``.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from ..types import ClientUpdate, LoraPair, UpdateError
from .npy import MAX_HEADER, read_npy

NUMPY = "numpy.ndarray"  # Flower's stype for np.save-encoded arrays
DTYPE = "float32"
SHOWN_CHARS = 300  # node-supplied text quoted in a log line or a record
REASON_CHARS = 1000  # a whole reason recorded (our words around at most a few quoted values)
HELLO_CAP = 64 * 1024  # bytes of a hello or resync reply (Flower's objects included; a real one takes under 2 KiB)
ARRAY_SLACK = 2048  # bytes per array beyond its npy data: Flower's object heads, chunk ids, the key in its record
REPLY_SLACK = 64 * 1024  # bytes per reply beyond its arrays: the message, its records, the metrics


class ReplyError(UpdateError):
    """A reply that breaks the protocol or the run's limits; the message names what is wrong."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a node may claim (run config ``max-examples``, ``max-factor-abs``)."""

    max_examples: int = 10_000_000  # a node's example count (it weights the node's update)
    max_abs: float = 1e4  # |value| of any factor entry; trained LoRA factors are orders of magnitude smaller

    def __post_init__(self) -> None:
        if self.max_examples < 1 or not self.max_abs > 0:
            raise ValueError("max-examples must be ≥ 1 and max-factor-abs > 0")


@dataclass(frozen=True)
class Hello:
    partition: int
    version: int
    examples: int  # the node's training examples: its train replies count at most this many


@dataclass(frozen=True)
class Resync:
    version: int
    full_adapter: bool
    own: bool = False  # it lacks what its client keeps between rounds


# --- values ------------------------------------------------------------------------------------------------


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """Text from outside the process as it may appear in a log line or a record: newlines, other control and
    format characters (terminal escapes, bidirectional marks) escaped as ``\\n``, ``\\x1b``, ``\\u202e``; longer
    than ``limit`` characters, its beginning and its end (where a traceback says what went wrong) around a note of
    its length. A value that is not text is shown as its ``repr``."""
    text = text if isinstance(text, str) else repr(text)
    if len(text) <= limit:
        return _escaped(text)
    half = limit // 2
    return f"{_escaped(text[:half])[:half]} … ({len(text)} characters) … {_escaped(text[-half:])[-half:]}"


def _escaped(text: str) -> str:
    escaped = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            char = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
                f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}" if ord(char) < 0x10000
                else f"\\U{ord(char):08x}")
        escaped.append(char)
    return "".join(escaped)


def reply_cap(global_lora: dict[str, LoraPair], trained: dict[str, bool], rank: int | None = None) -> int:
    """The most bytes a train reply may take on the wire: every trained factor of every layer at the client's
    ``rank`` as float32 with an npy header, plus Flower's framing (``ARRAY_SLACK`` per array, ``REPLY_SLACK``)."""
    total = REPLY_SLACK
    for pair in global_lora.values():
        r = pair.rank if rank is None else rank
        sizes = {"A": r * pair.shape[1], "B": pair.shape[0] * r}
        total += sum(4 * sizes[f] + MAX_HEADER + ARRAY_SLACK for f in ("A", "B") if trained[f])
    return max(total, HELLO_CAP)  # a train message may also be answered with a resync


def integer(value: object, what: str, low: int, high: int) -> int:
    """``value`` if it is an ``int`` (not a bool, not a float) in ``[low, high]``, else ``ReplyError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReplyError(f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ReplyError(f"{what} must be between {low} and {high}, got {value}")
    return value


def _record(message: Message, name: str, kind: type) -> ConfigRecord | MetricRecord | ArrayRecord:
    if not message.has_content():
        raise ReplyError("the reply has no content")
    record = message.content.get(name)
    if not isinstance(record, kind):
        raise ReplyError(f"the reply needs a {kind.__name__} {name!r}, got records {sorted(message.content)}")
    return record


def decode(array: object, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """An ``Array`` decoded to a float32 tensor of exactly ``shape``, checked before anything is allocated."""
    if not isinstance(array, Array):
        raise ReplyError(f"{what}: not an Array")
    if array.stype != NUMPY:
        raise ReplyError(f"{what}: serialised as {array.stype!r}, the protocol sends {NUMPY!r}")
    if array.dtype != DTYPE:
        raise ReplyError(f"{what}: dtype {array.dtype!r}, the protocol sends {DTYPE}")
    if tuple(array.shape) != shape:
        raise ReplyError(f"{what}: shape {tuple(array.shape)}, expected {shape}")
    values = read_npy(array.data, shape, "<f4", what, ReplyError)
    return torch.from_numpy(values.copy())


def check_values(tensor: torch.Tensor, what: str, limits: Limits, start: float = 0.0) -> None:
    """Finite and within ``limits.max_abs`` of ``start``, the largest magnitude in the factor the client started
    from: a factor the aggregation (an SVD) can take, however large the global adapter has become."""
    if tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ReplyError(f"{what} has NaN or Inf values")
    if max(-low, high) > limits.max_abs + start:
        beyond = f"max-factor-abs={limits.max_abs:g}" + (f" past its start's largest, {start:.3g}" if start else "")
        raise ReplyError(f"{what} has values up to {max(-low, high):.3g} in magnitude, beyond {beyond}")


# --- the three replies -------------------------------------------------------------------------------------


def parse_hello(reply: Message, clients: int, limits: Limits) -> Hello:
    """A hello reply: the node's partition (``0 … clients-1``), backbone version (≥ 0) and example count
    (``1 … max_examples``: its train replies are weighed by at most this many)."""
    info = _record(reply, "node", ConfigRecord)
    if info.get("error"):
        raise ReplyError(f"the node reports: {shown(info['error'])}")
    partition = integer(info.get("partition-id"), "partition-id", 0, clients - 1)
    count = integer(info.get("num-partitions"), "num-partitions", -1, 2**62)
    if count not in (-1, clients):
        raise ReplyError(f"num-partitions={count} in its node config, the run has clients={clients}")
    version = integer(info.get("backbone-version"), "backbone-version", 0, 2**62)
    examples = integer(info.get("num-examples"), "num-examples", 1, limits.max_examples)
    return Hello(partition, version, examples)


def parse_resync(reply: Message, partition: int, server_version: int) -> Resync:
    """A resync reply: the backbone version the node has (``0 … server_version``), whether it needs the whole
    adapter and whether it lacks its client's kept factors (``own-state``)."""
    info = _record(reply, "resync", ConfigRecord)
    version = integer(info.get("backbone-version"), "resync backbone-version", 0, server_version)
    integer(info.get("partition-id"), "resync partition-id", partition, partition)
    flags = {}
    for key in ("full-adapter", "own-state"):
        flags[key] = info.get(key, False)
        if not isinstance(flags[key], bool):
            raise ReplyError(f"resync {key} must be a bool, got {flags[key]!r}")
    return Resync(version, flags["full-adapter"], flags["own-state"])


def parse_train_reply(reply: Message, cid: str, partition: int, global_lora: dict[str, LoraPair],
                      trainable: dict[str, bool], version: int, limits: Limits, *, rank: int | None = None,
                      scaling: float, start: dict[str, LoraPair] | None = None) -> tuple[ClientUpdate, float]:
    """A train reply as a ``ClientUpdate`` (frozen factors filled in from ``global_lora``) and its training loss.

    The reply holds exactly an ``ArrayRecord`` ``factors`` (``<layer>/A``, ``<layer>/B`` for the trained factors of
    every layer, each of the global factor's shape at the client's configured ``rank``: ``(rank, in)`` and
    ``(out, rank)``; ``None``: the global rank) and a ``MetricRecord`` ``metrics`` (``num-examples``,
    ``train-loss``, ``backbone-version`` = ``version``, ``partition-id`` = ``partition``, ``scaling`` = ``scaling``,
    the client's LoRA scaling, exactly). ``start``: where the client started (``robust.client_start``); each trained
    factor's entries must lie within ``max_abs`` of its largest magnitude (``None``: of 0).
    """
    try:
        if reply.has_content() and "resync" in reply.content:
            raise ReplyError("still asks for a resync after two resends")
        extra = sorted(set(reply.content) - {"factors", "metrics"}) if reply.has_content() else []
        if extra:
            raise ReplyError(f"unexpected records {extra} (a train reply holds 'factors' and 'metrics')")
        metrics = _record(reply, "metrics", MetricRecord)
        arrays = _record(reply, "factors", ArrayRecord)
        integer(metrics.get("backbone-version"), "backbone-version", version, version)
        integer(metrics.get("partition-id"), "partition-id", partition, partition)
        count = integer(metrics.get("num-examples"), "num-examples", 1, limits.max_examples)
        loss = metrics.get("train-loss")
        if isinstance(loss, bool) or not isinstance(loss, int | float) or not math.isfinite(loss):
            raise ReplyError(f"train-loss must be a finite number, got {loss!r}")
        reported = metrics.get("scaling")
        if isinstance(reported, bool) or not isinstance(reported, float) or reported != scaling:
            raise ReplyError(f"scaling must be {scaling!r} (the LoRA scaling of the client's rank), got {reported!r}")
        sent = [f for f in ("A", "B") if trainable[f]]
        expected = {f"{name}/{factor}" for name in global_lora for factor in sent}
        missing, unexpected = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        if missing or unexpected:
            raise ReplyError(f"factors do not match the global adapter and this round's trained factors {sent} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        factors = {}
        for name, pair in global_lora.items():
            r = pair.rank if rank is None else rank
            shapes = {"A": (r, pair.shape[1]), "B": (pair.shape[0], r)}
            got = {}
            for factor in ("A", "B"):
                what = f"layer {name!r}, factor {factor}"
                if factor in sent:
                    got[factor] = decode(arrays[f"{name}/{factor}"], shapes[factor], what)
                    origin = getattr(start[name], factor) if start is not None else None
                    check_values(got[factor], what, limits, float(origin.abs().max()) if origin is not None
                                 and origin.numel() else 0.0)
                elif r == pair.rank:
                    got[factor] = getattr(pair, factor)
                else:  # no method that freezes a factor mixes ranks (``Method.mixed_ranks``)
                    raise ReplyError(f"{what}: frozen, and the client's rank {r} is not the global rank {pair.rank}")
            factors[name] = LoraPair(got["A"], got["B"])
    except ReplyError as error:
        raise ReplyError(f"client {cid!r}: {error}") from None
    return ClientUpdate(factors, num_examples=count, client_id=cid, scaling=scaling), float(loss)


__all__ = ["HELLO_CAP", "REASON_CHARS", "Hello", "Limits", "ReplyError", "Resync", "check_values", "decode", "integer",
           "parse_hello", "parse_resync", "parse_train_reply", "reply_cap", "shown"]
