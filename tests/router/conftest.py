"""Fixtures for the router tests: a real redis-server per test, the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from pdserve.redis_server import RedisServer


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_module():
    """One redis-server for a whole test module (tests that only read from an empty registry)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (GGUF metadata; pulled on first use like `pdserve model pull`)."""
    from pdserve.model_pull import resolve_model_path
    from pdserve.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path("smollm2"))
