"""Fixtures for the model tests (the SmolLM2 path and transformers' GGUF model are in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    """transformers' tokenizer built from the same GGUF: the tokenizer parity oracle (~6 s)."""
    from transformers import AutoTokenizer
    folder, name = os.path.split(smollm2_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from pdserve.config import ModelConfig
    from pdserve.loader import load_model
    return load_model(ModelConfig(model_path=smollm2_path), "cpu")
