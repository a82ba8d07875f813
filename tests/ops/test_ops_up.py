"""Issue 14 end to end: one real `pdserve up` (its own Redis, 1 prefill + 2 decode SmolLM2 nodes, the
router) driven with the official openai client, through the faults an operator meets: node /metrics,
SIGTERM to a node under load (drain), the registry hanging and then a node dying, Redis dying.

The tests run in file order on one cluster (each leaves it as the next one needs it).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.up_procs import Up, start_up, stop_up

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me a long story about a cat."}]


def open_stream(up: Up, max_tokens: int):
    return up.client.chat.completions.create(model="smollm2", messages=PROMPT, temperature=0, max_tokens=max_tokens,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})


def wait_until(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    handle = start_up(tmp_path_factory.mktemp("ops-up"), "--prefill", "1", "--decode", "2", "--max-total-tokens",
                      "4096", "--policy", "round_robin", "--drain-timeout-s", "60", "--skip-server-warmup",
                      num_nodes=3)
    try:
        yield handle
    finally:
        redis_pid = handle.pids().get("redis")
        if redis_pid:
            try:
                os.kill(redis_pid, signal.SIGCONT)   # in case a test left it stopped
            except ProcessLookupError:
                pass
        stop_up(handle)


def test_each_node_serves_metrics_listed_in_nodes(up):
    nodes = up.nodes()
    assert all(n["metrics_url"] and n["metrics_url"].startswith("http://127.0.0.1:") for n in nodes.values())
    reply = up.client.chat.completions.create(model="smollm2", messages=PROMPT, temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens == 4
    prefill = scrape(nodes["prefill-0"]["metrics_url"])
    for phase in ("queue", "prefill", "transfer"):
        assert prefill[f'pdserve_node_ttft_phase_seconds_count{{phase="{phase}"}}'] >= 1
    assert prefill["pdserve_node_transfer_kv_bytes_total"] > 0
    assert prefill["pdserve_node_transfer_gbps_count"] >= 1
    assert prefill["pdserve_node_prompt_tokens_total"] >= reply.usage.prompt_tokens
    assert prefill["pdserve_node_total_pages"] > 0 and "pdserve_node_queue_depth" in prefill
    decodes = [scrape(nodes[n]["metrics_url"]) for n in ("decode-0", "decode-1")]
    served = [d for d in decodes if d.get('pdserve_node_ttft_phase_seconds_count{phase="first_decode"}', 0) >= 1]
    assert len(served) == 1                                      # the one decode node that ran it
    for phase in ("queue", "kv_wait"):
        assert served[0][f'pdserve_node_ttft_phase_seconds_count{{phase="{phase}"}}'] >= 1
    assert "pdserve_node_retractions_total" in served[0] and "pdserve_node_kv_usage" in served[0]


def test_sigterm_drains_a_decode_node_under_load(up):
    num_requests, max_tokens = 4, 48
    results: list = [None] * num_requests

    def run(i: int) -> None:
        try:
            chunks = list(open_stream(up, max_tokens))
            results[i] = chunks[-1].usage.completion_tokens
        except Exception as exc:   # the assertion below shows it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_requests)]
    for t in threads:
        t.start()
    wait_until(lambda: up.nodes()["decode-1"]["router_inflight"] >= 1, 60, "work on decode-1")
    decode_1 = up.pids()["decode-1"]
    os.kill(decode_1, signal.SIGTERM)
    wait_until(lambda: up.nodes()["decode-1"]["draining"], 5, "decode-1 marked draining")
    late = up.client.chat.completions.create(model="smollm2", messages=PROMPT, temperature=0, max_tokens=2)
    assert late.usage.completion_tokens == 2                     # new work goes to decode-0
    for t in threads:
        t.join(timeout=120)
    assert results == [max_tokens] * num_requests               # every in-flight request completed
    wait_until(lambda: "decode-1" not in up.nodes(), 30, "decode-1 to leave")
    wait_until(lambda: "decode-1 exited with code 0" in up.output(), 10, "a clean exit")


def test_node_death_noticed_while_the_registry_hangs(up):
    redis_pid = up.pids()["redis"]
    os.kill(redis_pid, signal.SIGSTOP)                           # the registry hangs (no answers, no RST)
    try:
        wait_until(lambda: not up.health().json()["registry_connected"], 15, "the router to lose the registry")
        health = up.health()
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        stream = open_stream(up, 400)
        first = next(iter(stream))
        assert first.choices
        os.kill(up.pids()["decode-0"], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        assert time.monotonic() - killed < 10                    # the stream ends with an error, promptly
        assert "decode-0" not in up.nodes()
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:       # no decode node left: refused, not sent to the dead one
            up.client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and time.monotonic() - t0 < 10
        health = up.health()
        assert health.status_code == 503 and health.json()["registry_age_s"] > 1
    finally:
        os.kill(redis_pid, signal.SIGCONT)


def test_up_restarts_its_redis_and_nodes_reregister(up):
    old = up.pids()["redis"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: up.pids()["redis"] != old, 15, "up to start Redis again")
    assert "redis exited" in up.output()
    wait_until(lambda: up.health().json()["registry_connected"] and "prefill-0" in up.nodes(), 20,
               "the router to reconnect and prefill-0 to re-register")
