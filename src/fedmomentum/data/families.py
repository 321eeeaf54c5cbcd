"""Task families generated offline by reasoning-gym (seeded), as train and held-out examples."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from .example import Example

__all__ = ["EVAL_SEED_OFFSET", "FAMILIES", "NUMERIC_FAMILIES", "is_family", "load_family", "make_tasks", "scorer"]

FAMILIES: tuple[str, ...] = (
    "basic_arithmetic",
    "chain_sum",
    "gsm_symbolic",
    "leg_counting",
    "gcd",
    "lcm",
    "fraction_simplification",
    "prime_factorization",
    "products",
)
# Families whose answer is a single number: an unmarked completion is graded on its last number.
NUMERIC_FAMILIES = frozenset(
    {"basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "gcd", "lcm", "products"}
)
# Seed offset of held-out eval data in make_tasks (reasoning-gym seeds item i with seed + i).
EVAL_SEED_OFFSET = 1_000_003



@functools.cache
def scorer(name: str):
    """The family's own ``score_answer(answer, entry)`` (from a one-item dataset)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0).score_answer


def is_family(name: str) -> bool:
    """Whether reasoning-gym knows ``name``."""
    import reasoning_gym.factory

    return name in reasoning_gym.factory.DATASETS


def _check_family(name: str) -> None:
    if not is_family(name):
        raise ValueError(f"unknown reasoning-gym family {name!r}; supported: {', '.join(FAMILIES)}")


def _rg_example(name: str, entry: dict[str, Any]) -> Example:
    answer = str(entry["answer"]).strip()
    response = answer
    if name == "gsm_symbolic":
        cot = (entry.get("metadata") or {}).get("answer_cot")
        if cot:
            lines = str(cot).strip().splitlines()
            # The templates end in "#### <value>", sometimes as a float ("1638.0"): use the exact answer.
            if lines and lines[-1].lstrip().startswith("####"):
                lines = lines[:-1]
            body = "\n".join(lines).strip()
            response = f"{body}\n#### {answer}" if body else f"#### {answer}"
    return Example(prompt=str(entry["question"]), response=response, family=name, answer=answer, entry=entry)


def load_family(name: str, size: int, seed: int = 0, **config: Any) -> list[Example]:
    """``size`` examples of a reasoning-gym family, generated with ``reasoning_gym.create_dataset``.

    ``config`` goes to the family's config (e.g. ``min_terms=2, max_terms=3`` for ``basic_arithmetic``).
    The response is the bare answer, except for ``gsm_symbolic``: the template's short worked solution,
    ending in ``#### <answer>``.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    _check_family(name)
    if size == 0:
        return []
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    return [_rg_example(name, dataset[i]) for i in range(size)]



def make_tasks(
    families: Sequence[str] = FAMILIES,
    train_size: int = 200,
    eval_size: int = 50,
    seed: int = 0,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[Example], list[Example]]:
    """Train and held-out eval examples, ``train_size`` and ``eval_size`` per family.

    Train items come from seed ``seed``, eval items from ``seed + EVAL_SEED_OFFSET`` (so the eval set does not
    depend on ``train_size``); eval prompts that also occur in the train set (or twice in the eval set) are
    skipped and replaced, so the two are disjoint by prompt text. Returns ``(train, eval)``, each ordered by
    family; use ``by_family`` to split them. ``configs`` maps a family to its reasoning-gym config options.
    """
    families = list(families)
    if not families:
        raise ValueError("no families given")
    if len(set(families)) != len(families):
        raise ValueError(f"duplicate families in {families}")
    import reasoning_gym

    train: list[Example] = []
    held_out: list[Example] = []
    configs = dict(configs or {})
    unknown = set(configs) - set(families)
    if unknown:
        raise ValueError(f"configs given for families not in {families}: {sorted(unknown)}")
    for name in families:
        config = dict(configs.get(name, {}))
        fam_train = load_family(name, train_size, seed, **config)
        seen = {ex.prompt for ex in fam_train}
        fam_eval: list[Example] = []
        if eval_size > 0:
            budget = 20 * eval_size + 1000
            dataset = reasoning_gym.create_dataset(name, size=budget, seed=seed + EVAL_SEED_OFFSET, **config)
            for i in range(budget):
                ex = _rg_example(name, dataset[i])
                if ex.prompt in seen:
                    continue
                seen.add(ex.prompt)
                fam_eval.append(ex)
                if len(fam_eval) == eval_size:
                    break
            if len(fam_eval) < eval_size:
                raise ValueError(
                    f"{name}: found only {len(fam_eval)} eval prompts distinct from the {train_size} train "
                    f"prompts (wanted {eval_size}); the family has too few distinct problems"
                )
        train.extend(fam_train)
        held_out.extend(fam_eval)
    return train, held_out
