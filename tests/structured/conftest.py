"""Fixtures for the structured-output tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (pulled on first use like `pdserve model pull smollm2`)."""
    from pdserve.model_pull import resolve_model_path
    from pdserve.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path("smollm2"))
