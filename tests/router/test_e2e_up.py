"""End to end: one real `pdserve up` (Redis, 2 prefill + 1 decode SmolLM2 nodes, router) per module,
driven with the official openai client, including kill -9 of nodes and client disconnects."""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.up_procs import start_up, stop_up

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    for module in ("pdserve.prefill.node", "pdserve.decode.node"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not built yet")
    handle = start_up(tmp_path_factory.mktemp("up"), "--prefill", "2", "--decode", "1", "--max-total-tokens",
                      "16384", "--policy", "round_robin")
    try:
        handle.nodes_at_start = handle.nodes()
        yield handle
    finally:
        stop_up(handle)


def test_paris_streamed_equals_non_streamed_with_usage(up, tokenizer):
    reply = up.client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    assert "Paris" in text
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = up.client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24,
                                               stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens >= 0     # the repeat may hit the prefill node's prefix cache


def test_completions_streamed_equals_non_streamed(up):
    kw = dict(model="smollm2", prompt="The three primary colors are", temperature=0, max_tokens=6)
    full = up.client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in up.client.completions.create(stream=True, **kw))
    assert full.choices[0].text == streamed and full.choices[0].text.strip()
    assert full.usage.completion_tokens == 6 or full.choices[0].finish_reason == "stop"
    ids = up.client.completions.create(model="smollm2", prompt=[504, 3575, 282], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_bad_input_is_4xx_and_the_server_keeps_serving(up):
    with pytest.raises(openai.BadRequestError):
        up.client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        up.client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        up.client.completions.create(model="smollm2", prompt="x" * 40000, max_tokens=4)
    resp = httpx.post(up.url + "/v1/chat/completions", content=b"{oops", timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    ok = up.client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4)
    assert ok.choices[0].message.content


def _wait_free_pages(up, baseline: dict[str, int], timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        now = {n: rec["load"]["free_pages"] for n, rec in up.nodes().items() if rec["load"]}
        if all(now.get(n) == free for n, free in baseline.items()) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_client_disconnect_returns_pages_on_both_nodes(up):
    prompt = [{"role": "user", "content": "Write a long story about a lighthouse keeper. " * 8}]
    kw = dict(model="smollm2", messages=prompt, temperature=0, max_tokens=1)
    for _ in range(2):      # round robin: both prefill nodes cache the prompt, so the baseline includes it
        up.client.chat.completions.create(**kw)
    time.sleep(1.0)
    baseline = {n: rec["load"]["free_pages"] for n, rec in up.nodes().items() if rec["load"]}
    for _ in range(2):
        with httpx.stream("POST", up.url + "/v1/chat/completions", timeout=60,
                          json={**kw, "max_tokens": 200, "ignore_eos": True, "stream": True}) as resp:
            for line in resp.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break                        # first real token: now walk away
    assert _wait_free_pages(up, baseline, 10.0) == baseline


def test_kill_one_of_two_prefill_nodes_under_load_all_complete(up):
    retries_before = up.metric("pdserve_router_prefill_retries_total")
    long_prompt = "Summarize the following notes. " + "The meeting covered budgets, hiring and timelines. " * 20
    results: list = []

    def one(i: int) -> None:
        try:
            r = up.client.completions.create(model="smollm2", prompt=str(i) + long_prompt, max_tokens=2,
                                             temperature=0)
            results.append(r.choices[0].text)
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and up.nodes().get("prefill-1", {}).get("router_inflight", 0) == 0:
        time.sleep(0.01)
    os.kill(up.pids()["prefill-1"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 6 and not errors, errors
    assert up.metric("pdserve_router_prefill_retries_total") > retries_before
    assert "prefill-1" not in up.nodes()


def test_kill_decode_streams_end_with_error_event_within_5s(up):
    streams = [up.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=400,
                                                 extra_body={"ignore_eos": True}, stream=True) for _ in range(2)]
    for s in streams:                            # each has produced content
        for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                break
    os.kill(up.pids()["decode-0"], signal.SIGKILL)
    t0 = time.monotonic()
    for s in streams:
        with pytest.raises(openai.APIError):
            for _ in s:
                pass
    assert time.monotonic() - t0 < 5.0
    resp = httpx.post(up.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
