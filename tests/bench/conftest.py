"""Fixtures for the benchmark tests: synthetic request timelines and a scripted SSE server."""

from __future__ import annotations

import pytest

from pdserve.bench.client import RequestResult

from .sse_server import Script, ScriptedServer


def timeline(chunk_times: list[float], *, tokens: list[int] | None = None, output_tokens: int | None = None,
             success: bool = True, prompt_len: int = 10, index: int = 0, error: str = "") -> RequestResult:
    """A finished request whose token chunks arrived at ``chunk_times`` (s after its POST)."""
    tokens = tokens or [1] * len(chunk_times)
    return RequestResult(index=index, prompt_len=prompt_len, max_tokens=sum(tokens), success=success,
                         error=error, chunk_times_s=list(chunk_times), chunk_tokens=list(tokens),
                         output_tokens=sum(tokens) if output_tokens is None else output_tokens)


@pytest.fixture
def sse_server():
    with ScriptedServer(Script()) as server:
        yield server


@pytest.fixture
def make_server():
    """Start scripted servers with a given Script; all stopped at the end of the test."""
    started: list[ScriptedServer] = []

    def make(**script) -> ScriptedServer:
        server = ScriptedServer(Script(**script)).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__(None, None, None)
