"""Checking a node's train reply and turning it into a ``ClientUpdate``.

Anything wrong with a reply raises ``UpdateError`` naming the client and what is wrong; the strategy then leaves
that client out of the round and records why.
"""

from __future__ import annotations

import math

from flwr.app import Message

from ..types import ClientUpdate, LoraPair, UpdateError
from . import wire


def parse_train_reply(reply: Message, cid: str, global_lora: dict[str, LoraPair], trainable: dict[str, bool],
                      version: int) -> tuple[ClientUpdate, float]:
    """The reply as a ``ClientUpdate`` (frozen factors filled in from ``global_lora``) and its training loss.

    ``version`` is the backbone version the node must have trained on.
    """
    content = reply.content
    if "resync" in content:
        raise UpdateError(f"client {cid!r}: still asks for a backbone resync after two resends")
    if "factors" not in content.array_records or "metrics" not in content.metric_records:
        raise UpdateError(f"client {cid!r}: the reply needs an ArrayRecord 'factors' and a MetricRecord "
                          f"'metrics', got {sorted(content)}")
    metrics = content.metric_records["metrics"]
    if metrics.get("backbone-version") != version:
        raise UpdateError(f"client {cid!r}: trained on backbone version {metrics.get('backbone-version')}, "
                          f"expected {version}")
    count = metrics.get("num-examples")
    if not isinstance(count, int | float) or count != int(count):
        raise UpdateError(f"client {cid!r}: num-examples must be an integer, got {count!r}")
    try:
        sent = wire.record_to_factors(content.array_records["factors"])
    except ValueError as error:
        raise UpdateError(f"client {cid!r}: {error}") from None
    expected = {f for f in ("A", "B") if trainable[f]}
    missing, extra = sorted(set(global_lora) - set(sent)), sorted(set(sent) - set(global_lora))
    if missing or extra:
        raise UpdateError(f"client {cid!r}: layers do not match the global adapter (missing {missing[:3]}, "
                          f"extra {extra[:3]})")
    factors = {}
    for name, pair in global_lora.items():
        if set(sent[name]) != expected:
            raise UpdateError(f"client {cid!r}, layer {name!r}: sent factors {sorted(sent[name])}, "
                              f"this round trains {sorted(expected)}")
        factors[name] = LoraPair(sent[name].get("A", pair.A), sent[name].get("B", pair.B))
    loss = float(metrics.get("train-loss", math.nan))
    return ClientUpdate(factors, num_examples=int(count), client_id=cid), loss
