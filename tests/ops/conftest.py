"""Fixtures for the operations tests (faults, drain, metrics)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    """The real SmolLM2 tokenizer (what a router loads)."""
    from pdserve.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)
