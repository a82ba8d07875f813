"""`pdserve up --cluster-secret`: the whole cluster (Redis with a password, prefill and decode nodes,
router) answers through the official openai client; a router with the wrong secret is refused by
the nodes (logged, naming the peer) and fails its request fast instead of hanging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pdserve.redis_server import free_port
from pdserve.security import derive_keys
from tests.up_procs import start_up, stop_up

pytestmark = pytest.mark.slow

SECRET = "correct-horse-battery-staple"
WRONG = "not-the-cluster-secret-at-all"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)   # (its liveness probe, refused too, evicts the nodes ~5 s after it starts)
    pytest.fail(f"not healthy after {timeout_s} s\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    up = start_up(tmp_path_factory.mktemp("up"), "--prefill", "1", "--decode", "1", "--max-total-tokens", "2048",
                  "--skip-server-warmup", "--cluster-secret", SECRET)
    try:
        yield up
    finally:
        stop_up(up)


def test_up_with_a_secret_answers_through_openai(cluster):
    reply = cluster.client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=12)
    assert "Paris" in reply.choices[0].message.content
    # The secret reached every child through the environment, never its argv (readable by all users).
    pids = cluster.pids()
    assert set(pids) >= {"prefill-0", "decode-0", "router", "redis"}
    for name, pid in pids.items():
        assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), name


def test_up_redis_needs_the_derived_password(cluster):
    printed = re.search(r"redis at (\S+)", cluster.output()).group(1)
    port = int(re.fullmatch(r"redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", printed).group(1))   # printed redacted
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).keys("*")   # (no retries: they back off for seconds)
    assert redis.Redis(port=port, password=derive_keys(SECRET).redis_password).ping()


def test_router_with_the_wrong_secret_is_refused_fast(cluster, tmp_path):
    port = int(re.search(r"redis at redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", cluster.output()).group(1))
    registry = f"redis://:{derive_keys(SECRET).redis_password}@127.0.0.1:{port}/0"   # it may read the registry
    http_port = free_port()
    log_path = tmp_path / "wrong-router.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "router", "--registry-url", registry,
                                 "--port", str(http_port), "--request-timeout-s", "120"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PDSERVE_CLUSTER_SECRET": WRONG})
    try:
        url = f"http://127.0.0.1:{http_port}"
        _wait_healthy(url, proc, log_path)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4)
        assert err.value.status_code >= 500 and time.monotonic() - t0 < 30, (err.value, log_path.read_text())
        nodes = (cluster.log_dir / "prefill-0.log").read_text() + (cluster.log_dir / "decode-0.log").read_text()
        assert re.search(r"cluster auth: refused peer 127\.0\.0\.1:\d+ on the request socket of this "
                         r"(prefill|decode) node: its --cluster-secret differs", nodes), nodes[-3000:]
        router_log = log_path.read_text()   # its node socket's handshake failed, or its liveness probe's did
        assert "cluster auth: handshake with tcp://" in router_log or "registry view: evicting" in router_log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
