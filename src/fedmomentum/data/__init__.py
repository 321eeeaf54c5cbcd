"""Data: examples from reasoning-gym families, local files and GSM8K; client partitions; tokenisation; scoring.

One source per module (``families``, ``files``, ``gsm8k``), all producing ``Example`` (``example``);
``partition`` splits examples across clients, ``formatting`` turns them into token ids, ``scoring`` grades
completions.
"""

from .example import Example, by_family
from .families import FAMILIES, load_family, make_tasks
from .files import load_jsonl
from .formatting import IGNORE_INDEX, collate, encode, prompt_ids, prompt_text
from .gsm8k import GSM8K_FAMILY, gsm8k_near_duplicates, load_gsm8k_test
from .partition import SCHEMES, family_counts, partition
from .scoring import extract_answer, score

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
