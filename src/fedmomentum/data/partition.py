"""Splitting examples across federated clients.

Schemes (all seeded and deterministic; every example goes to exactly one client; every client gets at
least one example):

- ``iid``: shuffle, then near-equal contiguous chunks.
- ``dirichlet``: each client draws a task-family mixture ``q_c ~ Dirichlet(alpha · 1)`` over the families
  present; clients have near-equal sizes and are filled one example at a time, in turn, each drawing a
  family from its mixture (renormalised over the families not yet used up). ``alpha=0.5`` is the paper's
  non-IID setting; a large ``alpha`` approaches IID.
- ``family``: one family per client. With more clients than families, families go round-robin and a family
  shared by several clients is split evenly between them; with fewer clients than families, each client
  gets every family whose index is congruent to its own modulo the number of clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .example import Example

__all__ = ["SCHEMES", "family_counts", "partition"]

SCHEMES = ("iid", "dirichlet", "family")


def _families(examples: Sequence[Example]) -> list[str]:
    return sorted({ex.family for ex in examples})


def family_counts(clients: Sequence[Sequence[Example]]) -> list[dict[str, int]]:
    """Per client, how many examples of each family it holds."""
    out = []
    for shard in clients:
        counts: dict[str, int] = {}
        for ex in shard:
            counts[ex.family] = counts.get(ex.family, 0) + 1
        out.append(counts)
    return out


def _balanced_sizes(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if c < extra else 0) for c in range(parts)]


def _iid(examples: Sequence[Example], num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(len(examples))
    sizes = _balanced_sizes(len(examples), num_clients)
    bounds = np.cumsum([0, *sizes])
    return [order[bounds[c] : bounds[c + 1]].tolist() for c in range(num_clients)]


def _dirichlet(
    examples: Sequence[Example], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    families = _families(examples)
    index = {f: k for k, f in enumerate(families)}
    pools: list[list[int]] = [[] for _ in families]
    for i, ex in enumerate(examples):
        pools[index[ex.family]].append(i)
    for pool in pools:
        rng.shuffle(pool)
    mixtures = rng.dirichlet(np.full(len(families), float(alpha)), size=num_clients)
    sizes = _balanced_sizes(len(examples), num_clients)
    remaining = np.array([len(pool) for pool in pools], dtype=float)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for step in range(max(sizes)):
        for c in range(num_clients):
            if step >= sizes[c]:
                continue
            available = remaining > 0
            weights = mixtures[c] * available
            if weights.sum() <= 0:  # the client's mixture is all on used-up families
                weights = available.astype(float)
            k = int(rng.choice(len(families), p=weights / weights.sum()))
            shards[c].append(pools[k].pop())
            remaining[k] -= 1
    return shards


def _by_family(examples: Sequence[Example], num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    families = _families(examples)
    pools: dict[str, list[int]] = {f: [] for f in families}
    for i, ex in enumerate(examples):
        pools[ex.family].append(i)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    if num_clients >= len(families):
        for k, fam in enumerate(families):
            owners = list(range(k, num_clients, len(families)))
            pool = pools[fam]
            if len(pool) < len(owners):
                raise ValueError(f"family {fam!r} has {len(pool)} examples but is shared by {len(owners)} clients")
            order = rng.permutation(len(pool))
            sizes = _balanced_sizes(len(pool), len(owners))
            start = 0
            for owner, size in zip(owners, sizes, strict=True):
                shards[owner] = [pool[j] for j in order[start : start + size]]
                start += size
    else:
        for k, fam in enumerate(families):
            shards[k % num_clients].extend(pools[fam])
        for shard in shards:
            rng.shuffle(shard)
    return shards


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[Example]]:
    """Split ``examples`` into ``num_clients`` client datasets with the given scheme (see module doc).

    Deterministic for a given ``seed``; no example is lost or duplicated; every client gets at least one.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    examples = list(examples)
    if num_clients > len(examples):
        raise ValueError(f"cannot split {len(examples)} examples across {num_clients} clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shards = _iid(examples, num_clients, rng)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        shards = _dirichlet(examples, num_clients, alpha, rng)
    else:
        shards = _by_family(examples, num_clients, rng)
    return [[examples[i] for i in shard] for shard in shards]
