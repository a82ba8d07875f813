"""Issue 14: a draining node is bounded by --drain-timeout-s (a real `pdserve serve` node with SmolLM2,
a real router over HTTP, the official openai client)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from pdserve.redis_server import RedisServer
from tests.node_procs import start_serve, stop, wait_ready
from tests.router.util import RouterHarness, make_router

pytestmark = pytest.mark.slow


def test_drain_ends_at_the_timeout_and_the_unfinished_stream_gets_an_error(smollm2_path, tokenizer):
    with RedisServer() as redis:
        proc, log_path = start_serve(smollm2_path, redis.url, "--drain-timeout-s", "1", "--skip-server-warmup")
        harness = RouterHarness(make_router(tokenizer, redis.url)).start()
        try:
            wait_ready(proc, log_path)
            nodes = lambda: httpx.get(harness.url + "/nodes").json()["nodes"]   # noqa: E731
            deadline = time.monotonic() + 20
            while not nodes():
                assert time.monotonic() < deadline
                time.sleep(0.1)
            client = openai.OpenAI(base_url=harness.url + "/v1", api_key="none", max_retries=0, timeout=60)
            stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=1500,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            assert next(iter(stream)).choices                  # running: far from done in 1 s on a CPU
            metrics = httpx.get(nodes()[0]["metrics_url"]).text  # a colocated node's own /metrics
            assert 'pdserve_node_ttft_phase_seconds_count{phase="prefill"} 1.0' in metrics
            assert "pdserve_node_running_requests 1.0" in metrics and "pdserve_node_prompt_tokens_total 4.0" in metrics
            os.killpg(proc.pid, signal.SIGTERM)
            t0 = time.monotonic()
            time.sleep(0.3)
            assert [n["draining"] for n in nodes()] == [True]  # listed, taking no new work
            assert httpx.get(harness.url + "/health").status_code == 503
            with pytest.raises(openai.APIError):
                for _ in stream:
                    pass
            proc.wait(timeout=10)
            assert proc.returncode == 0 and time.monotonic() - t0 < 8   # 1 s drain + shutdown
            assert nodes() == []
            assert "drain timeout: leaving with 1 request(s) unfinished" in open(log_path).read()
        finally:
            harness.stop()
            stop(proc)
