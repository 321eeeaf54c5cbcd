"""What each round asks of whom: the sampled clients, each client's seed, and the learning rate.

Pure functions of the config and the round, so the simulation and every Flower node agree without talking.
"""

from __future__ import annotations

import math

import torch

from .config import RunConfig

LR_SCHEDULES = ("constant", "cosine", "linear")


def sample_clients(config: RunConfig, round: int) -> list[int]:
    """The clients of ``round`` (0-based): a seeded sample of ``clients_per_round``, the same for every method."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + round)
    return sorted(torch.randperm(config.clients, generator=generator)[: config.clients_per_round].tolist())


def client_seed(config: RunConfig, round: int, client: int) -> int:
    """The seed of ``client``'s local training in ``round`` (batch order, dropout)."""
    return config.seed * 1_000_003 + round * 1_009 + client


def round_lr(base_lr: float, schedule: str, round: int, rounds: int, min_ratio: float = 0.1) -> float:
    """The learning rate of a round: ``constant``, or ``cosine`` / ``linear`` decay to ``min_ratio·lr`` over rounds."""
    if schedule == "constant" or rounds <= 1:
        return base_lr
    progress = round / (rounds - 1)
    if schedule == "cosine":
        factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1 - (1 - min_ratio) * progress
    else:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose {', '.join(LR_SCHEDULES)}")
    return base_lr * factor
