"""Data: examples from reasoning-gym families, users' files and GSM8K; client partitions; tokenisation; scoring.

One source per module (``families``, ``files``, ``gsm8k``), all producing ``Example`` (``example``); users' files
are read record by record (``readers``) in one of a few forms (``forms``); ``heldout`` keeps a seeded slice of a
file for evaluation, ``partition`` splits examples across clients, ``formatting`` turns them into token ids,
``scoring`` grades completions. ``formatting``'s names are imported on first use, so reading a config does not
import torch.
"""

import importlib

from .example import ROLES, Example, Turn, by_family
from .families import FAMILIES, load_family, make_tasks
from .files import client_sources, data_sources, load_client_data, load_examples, load_jsonl
from .forms import FORMATS
from .gsm8k import GSM8K_FAMILY, gsm8k_near_duplicates, load_gsm8k_test
from .heldout import held_out_count, split_held_out
from .partition import SCHEMES, family_counts, partition
from .scoring import extract_answer, score

_TOKENS = ("IGNORE_INDEX", "collate", "encode", "prompt_ids", "prompt_text")  # from ``formatting``, which needs torch


def __getattr__(name: str):
    if name not in _TOKENS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".formatting", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "FAMILIES",
    "FORMATS",
    "GSM8K_FAMILY",
    "IGNORE_INDEX",
    "ROLES",
    "SCHEMES",
    "Example",
    "Turn",
    "by_family",
    "client_sources",
    "collate",
    "data_sources",
    "encode",
    "extract_answer",
    "family_counts",
    "gsm8k_near_duplicates",
    "held_out_count",
    "load_client_data",
    "load_examples",
    "load_family",
    "load_gsm8k_test",
    "load_jsonl",
    "make_tasks",
    "partition",
    "prompt_ids",
    "prompt_text",
    "score",
    "split_held_out",
]
