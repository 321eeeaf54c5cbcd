"""A seeded held-out slice of a data file, for evaluation, kept out of training."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from .example import Example

__all__ = ["held_out_count", "split_held_out"]


def held_out_count(total: int, fraction: float, limit: int) -> int:
    """How many of ``total`` examples to hold out: ``round(fraction · total)``, at least one when ``fraction > 0``
    and there are two or more, at most ``limit``, and never all of them."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or total < 2 or limit <= 0:
        return 0
    return min(max(round(fraction * total), 1), limit, total - 1)


def split_held_out(examples: Sequence[Example], fraction: float, limit: int, seed: int,
                   name: str = "") -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: ``held_out_count`` examples drawn at random (seeded by ``seed`` and the source's
    ``name``, so one file's slice does not depend on the others), both in file order."""
    count = held_out_count(len(examples), fraction, limit)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    chosen = set(rng.choice(len(examples), size=count, replace=False).tolist()) if count else set()
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    held = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, held
