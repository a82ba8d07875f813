"""The router's HTTP side of #14: --api-key guards /metrics (unless --metrics-no-auth); a Redis
that `pdserve up` would start with a cluster secret needs its password."""

from __future__ import annotations

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pdserve.redis_server import RedisServer
from pdserve.security import derive_keys
from tests.router.util import RouterHarness, make_router


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.model_pull import resolve_model_path
    from pdserve.tokenizer import load_tokenizer
    return load_tokenizer(resolve_model_path("smollm2"))


@pytest.mark.parametrize("metrics_no_auth", [False, True])
def test_api_key_guards_metrics_unless_told_not_to(tokenizer, metrics_no_auth):
    harness = RouterHarness(make_router(tokenizer, None, api_key="sekret", metrics_no_auth=metrics_no_auth)).start()
    try:
        bare = httpx.get(harness.url + "/metrics")
        wrong = httpx.get(harness.url + "/metrics", headers={"Authorization": "Bearer nope"})
        good = httpx.get(harness.url + "/metrics", headers={"Authorization": "Bearer sekret"})
        assert good.status_code == 200 and "pdserve_router" in good.text
        if metrics_no_auth:
            assert bare.status_code == wrong.status_code == 200
        else:
            for resp in (bare, wrong):
                assert resp.status_code == 401
                assert resp.json()["error"]["code"] == "invalid_api_key"   # OpenAI's error shape
        assert httpx.get(harness.url + "/health").status_code == 503      # the probe stays open (no nodes)
    finally:
        harness.stop()


def test_redis_with_a_password_end_to_end():
    """The registry over redis://:PASSWORD@host:port/0: nodes and routers get in, others do not."""
    from pdserve.protocol import NodeInfo
    from pdserve.registry import NodeRegistrar, RegistryView

    password = derive_keys("correct-horse-battery-staple").redis_password
    with RedisServer(password=password) as server:
        assert server.url.startswith(f"redis://:{password}@127.0.0.1:")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, retry=Retry(NoBackoff(), 0)).keys("*")
        info = NodeInfo(node_id="d0", role="decode", addr="tcp://127.0.0.1:1", model="smollm2", fingerprint="f",
                        dtype="float32", page_size=16, context_length=2048, vocab_size=49152, max_total_tokens=4096)
        registrar = NodeRegistrar(server.url, info, ttl_s=5.0, interval_s=0.2, load_fn=None)
        registrar.start()
        view = RegistryView(server.url, scan_interval_s=0.2).start()
        try:
            assert view.wait_for(lambda nodes: "d0" in nodes, 10)
        finally:
            view.stop()
            registrar.stop()
