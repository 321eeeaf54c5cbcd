"""Data: task examples (reasoning-gym, JSONL, GSM8K), client partitions, and tokenisation."""

from .formatting import IGNORE_INDEX, collate, encode, prompt_ids, prompt_text
from .partition import SCHEMES, family_counts, partition
from .tasks import (
    FAMILIES,
    GSM8K_FAMILY,
    Example,
    by_family,
    extract_answer,
    gsm8k_near_duplicates,
    load_family,
    load_gsm8k_test,
    load_jsonl,
    make_tasks,
    score,
)

__all__ = [
    "FAMILIES",
    "GSM8K_FAMILY",
    "IGNORE_INDEX",
    "SCHEMES",
    "Example",
    "by_family",
    "collate",
    "encode",
    "extract_answer",
    "family_counts",
    "gsm8k_near_duplicates",
    "load_family",
    "load_gsm8k_test",
    "load_jsonl",
    "make_tasks",
    "partition",
    "prompt_ids",
    "prompt_text",
    "score",
]
