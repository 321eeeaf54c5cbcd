"""What each round asks of whom: the sampled clients (and, with stragglers, who is late or busy), each client's
seed, and the learning rate.

Pure functions of the config and the round ``t`` (1-based), so the simulation and every Flower node agree without
talking. Seeds use ``t − 1``, the numbering of earlier versions, so that their runs are reproduced exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .config import RunConfig

LR_SCHEDULES = ("constant", "cosine", "linear")


def sample_clients(config: RunConfig, t: int) -> list[int]:
    """The clients of round ``t``: a seeded sample of ``clients_per_round``, the same for every method."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + t - 1)
    return sorted(torch.randperm(config.clients, generator=generator)[: config.clients_per_round].tolist())


def straggler_draws(config: RunConfig, t: int) -> torch.Tensor:
    """Round ``t``'s uniform draw in [0, 1) for each client: a client that trains in round ``t`` is a straggler
    when its draw is below ``straggler_rate``. Seeded by a hash of ``(seed, t)``, apart from ``sample_clients``'
    generator, so which clients are sampled and which of them straggle are independent draws."""
    digest = hashlib.sha256(f"stragglers/{config.seed}/{t}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(config.clients, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class Participation:
    """What round ``t``'s sampled clients do (each sampled client is in exactly one list, all sorted)."""

    fresh: list[int]  # train from round t's global adapter; aggregated in round t
    late: list[int]  # stragglers: train from round t's global adapter; aggregated in round t + straggler_delay
    dropped: list[int]  # stragglers whose update would arrive after the last round: they do not train
    busy: list[int]  # still training a late update of an earlier round: they do not train this round


def participation(config: RunConfig, t: int) -> Participation:
    """Who of round ``t``'s sample trains, and whose update arrives when (``straggler_rate``,
    ``straggler_delay`` = k). A straggler of round u is busy in rounds u + 1 … u + k − 1 and its update arrives in
    round u + k. Busy clients do not train, so they cannot straggle: the rounds are walked from round 1 (a pure
    function of the config and ``t``, so a resumed run and every process agree). Without stragglers this is
    ``sample_clients``, untouched."""
    sampled = sample_clients(config, t)
    if config.straggler_rate == 0:
        return Participation(sampled, [], [], [])
    free_from: dict[int, int] = {}  # client → the round its late update arrives (it is free again then)
    for u in range(1, t + 1):
        sampled = sample_clients(config, u)
        busy = [c for c in sampled if u < free_from.get(c, 0)]
        draws = straggler_draws(config, u).tolist()
        stragglers = [c for c in sampled if c not in busy and draws[c] < config.straggler_rate]
        for client in stragglers:
            free_from[client] = u + config.straggler_delay
    arrives_in_time = t + config.straggler_delay <= config.rounds
    return Participation(fresh=[c for c in sampled if c not in busy and c not in stragglers],
                         late=stragglers if arrives_in_time else [], dropped=[] if arrives_in_time else stragglers,
                         busy=busy)


RANK_RULES = ("cycle", "random")


def client_ranks(config: RunConfig) -> list[int]:
    """Each client's LoRA rank, from ``config.client_ranks``: unset, every client has ``lora_r``; a list, one rank
    per client (also as text, ``"[2,4,8]"`` or ``"2,4,8"``); or a rule over a set of ranks, ``"cycle:2,4,8"``
    (client ``i`` gets the ``i``-th, round robin) or ``"random:2,4,8"`` (a seeded draw per client)."""
    spec = config.client_ranks
    if isinstance(spec, str) and ":" not in spec:  # text of a list, as the command line gives it: "[2,4]", "2,4"
        try:
            spec = [int(v) for v in spec.strip().strip("[]").split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"client_ranks {config.client_ranks!r} must be a list of integers or a rule such as "
                             "'cycle:4,8'") from None
    if spec is None or spec == []:
        return [config.lora_r] * config.clients
    if isinstance(spec, str):
        rule, sep, values = spec.partition(":")
        if not sep or rule.strip() not in RANK_RULES:
            raise ValueError(f"client_ranks rule {spec!r} must be 'cycle:r1,r2,...' or 'random:r1,r2,...'")
        try:
            choices = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"client_ranks rule {spec!r}: the ranks must be integers") from None
        if not choices:
            raise ValueError(f"client_ranks rule {spec!r} names no rank")
        if rule.strip() == "cycle":
            ranks = [choices[i % len(choices)] for i in range(config.clients)]
        else:
            generator = torch.Generator().manual_seed(config.seed * 7_919 + 17)
            ranks = [choices[i] for i in torch.randint(len(choices), (config.clients,), generator=generator).tolist()]
    elif isinstance(spec, list | tuple):
        ranks = list(spec)
        if len(ranks) != config.clients:
            raise ValueError(f"client_ranks lists {len(ranks)} ranks for {config.clients} clients; give one per "
                             "client, or a rule such as 'cycle:4,8'")
    else:
        raise ValueError(f"client_ranks must be a list of ranks or a rule such as 'cycle:4,8', got {spec!r}")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"client_ranks must be integers ≥ 1, got {bad[0]!r}")
    return ranks


def client_seed(config: RunConfig, t: int, client: int) -> int:
    """The seed of ``client``'s local training in round ``t`` (batch order, dropout)."""
    return config.seed * 1_000_003 + (t - 1) * 1_009 + client


def round_lr(base_lr: float, schedule: str, t: int, rounds: int, min_ratio: float = 0.1) -> float:
    """The learning rate of round ``t``: ``constant``, or ``cosine`` / ``linear`` decay from ``lr`` in round 1 to
    ``min_ratio·lr`` in the last round."""
    if schedule == "constant" or rounds <= 1:
        return base_lr
    progress = (t - 1) / (rounds - 1)
    if schedule == "cosine":
        factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1 - (1 - min_ratio) * progress
    else:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose {', '.join(LR_SCHEDULES)}")
    return base_lr * factor
