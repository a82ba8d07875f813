"""Fixtures for the router tests: a real redis-server per test."""

from __future__ import annotations

import pytest

from pdserve.redis_server import RedisServer


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()
