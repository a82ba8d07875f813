"""The streaming client against a real HTTP server with scripted timing and failures."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pdserve.bench.client import RequestResult, build_payload, endpoint_url, first_model, send_request
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import request_itls, request_tpot
from pdserve.bench.runner import make_client


def _send(url: str, payload: dict) -> RequestResult:
    async def go():
        async with make_client(4, 10.0) as client:
            result = RequestResult(index=0, prompt_len=3, max_tokens=payload["max_tokens"])
            return await send_request(client, url, payload, result, time.perf_counter())
    return asyncio.run(go())


def _completion(model: str = "scripted-model", out: int = 6) -> dict:
    return build_payload(BenchRequest(prompt=[101, 102, 103], prompt_len=3, output_len=out), model, "completions")


def test_payload_is_greedy_streamed_and_ignores_eos():
    p = _completion(out=9)
    assert p["prompt"] == [101, 102, 103] and p["max_tokens"] == 9
    assert p["temperature"] == 0.0 and p["ignore_eos"] is True and p["stream"] is True
    assert p["stream_options"]["include_usage"] is True
    chat = build_payload(BenchRequest(prompt="hi there", prompt_len=2, output_len=3), "m", "chat")
    assert chat["messages"] == [{"role": "user", "content": "hi there"}]
    with pytest.raises(ValueError, match="--endpoint chat"):
        build_payload(BenchRequest(prompt=[1, 2], prompt_len=2, output_len=3), "m", "chat")


def test_completion_timeline(make_server):
    server = make_server(ttft_s=0.08, itl_s=0.02)
    r = _send(endpoint_url(server.url, "completions"), _completion(out=6))
    assert r.success, r.error
    assert r.output_tokens == 6 and len(r.chunk_times_s) == 6
    assert 0.08 <= r.ttft_s < 2.0
    assert r.e2e_s - r.ttft_s >= 5 * 0.02 * 0.9          # the server slept 20 ms before each later token
    assert len(request_itls(r)) == 5
    assert request_tpot(r) == pytest.approx((r.e2e_s - r.ttft_s) / 5)
    assert r.prompt_len == 3                       # from usage.prompt_tokens
    assert (r.kv_bytes, r.transfer_ms) == (3 * 1024, 0.5)


def test_chat_skips_the_role_only_first_chunk(make_server):
    server = make_server(ttft_s=0.1, itl_s=0.005)
    payload = build_payload(BenchRequest(prompt="a b c d", prompt_len=4, output_len=3), "scripted-model", "chat")
    r = _send(endpoint_url(server.url, "chat"), payload)
    assert r.success, r.error
    assert r.ttft_s >= 0.1                         # the empty role delta does not count as a token
    assert r.output_tokens == 3 and r.prompt_len == 4


def test_multi_token_chunks_counted_from_per_chunk_usage(make_server):
    server = make_server(ttft_s=0.01, itl_s=0.01, tokens_per_chunk=3, per_chunk_usage=True)
    r = _send(endpoint_url(server.url, "completions"), _completion(out=7))
    assert r.success, r.error
    assert r.chunk_tokens == [3, 3, 1] and r.output_tokens == 7
    assert len(request_itls(r)) == 4               # 3 + 1 tokens after the first chunk


def test_without_per_chunk_usage_each_chunk_is_one_token(make_server):
    server = make_server(ttft_s=0.01, itl_s=0.001, tokens_per_chunk=2)
    r = _send(endpoint_url(server.url, "completions"), _completion(out=4))
    assert r.chunk_tokens == [1, 1] and r.output_tokens == 4     # total from the final usage chunk


@pytest.mark.parametrize("model, expect", [("fail-500", "HTTP 500"), ("stream-error", "engine died"),
                                           ("no-tokens", "without a token chunk")])
def test_failures_are_recorded_not_raised(make_server, model, expect):
    server = make_server()
    r = _send(endpoint_url(server.url, "completions"), _completion(model=model))
    assert not r.success
    assert expect in r.error


def test_refused_connection_is_a_failed_request():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _send(f"http://127.0.0.1:{port}/v1/completions", _completion())
    assert not r.success and "ConnectError" in r.error


def test_first_model(sse_server):
    async def go():
        async with make_client(2, 5.0) as client:
            return await first_model(client, sse_server.url, {})
    assert asyncio.run(go()) == "scripted-model"


def test_stream_state_folds_usage_deltas():
    """Per-chunk usage: multi-token chunks, a token with no text yet, a flush with no new token."""
    from pdserve.bench.client import _StreamState
    r = RequestResult(index=0, prompt_len=1, max_tokens=6)
    st = _StreamState(r, "completions", t0=0.0)
    events = [({"text": "a"}, 1), ({"text": ""}, 2), ({"text": "bc"}, 4), ({"text": "!"}, 4), ({"text": "d"}, 6)]
    for t, (choice, total) in enumerate(events, start=1):
        st.on_event({"choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": total}}, t * 0.1)
    st.on_event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 6}}, 0.7)
    st.finish()
    assert r.success and r.output_tokens == 6
    assert r.chunk_tokens == [1, 3, 2]                     # the empty chunk's token joins the next one
    assert r.chunk_times_s == pytest.approx([0.1, 0.3, 0.5])
