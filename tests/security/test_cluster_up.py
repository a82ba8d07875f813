"""`pdserve up --cluster-secret`: the whole cluster (Redis with a password, prefill and decode nodes,
router) answers through the official openai client; a router with the wrong secret is refused by
the nodes (logged, naming the peer) and fails its request fast instead of hanging."""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.slow

SECRET = "correct-horse-battery-staple"
WRONG = "not-the-cluster-secret-at-all"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _wait_healthy(url: str, proc: subprocess.Popen, logs, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}\n{logs()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"not healthy after {timeout_s} s\n{logs()}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2500:] for p in sorted(log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("up")
    port = free_port()
    with open(log_dir / "up.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--prefill", "1", "--decode", "1",
                                 "--port", str(port), "--log-dir", str(log_dir), "--max-total-tokens", "2048",
                                 "--skip-server-warmup", "--cluster-secret", SECRET],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, lambda: (log_dir / "up.out").read_text() + _logs(log_dir))
        yield url, log_dir
    finally:
        _stop(proc)


def test_up_with_a_secret_answers_through_openai(cluster):
    url, log_dir = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=12)
    assert "Paris" in reply.choices[0].message.content
    # The secret reached every child through the environment, never its argv (readable by all users).
    pids = json.loads((log_dir / "processes.json").read_text())
    assert set(pids) >= {"prefill-0", "decode-0", "router", "redis"}
    for name, pid in pids.items():
        assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), name


def test_up_redis_needs_the_derived_password(cluster):
    _, log_dir = cluster
    printed = re.search(r"redis at (\S+)", (log_dir / "up.out").read_text()).group(1)
    port = int(re.fullmatch(r"redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", printed).group(1))   # printed redacted
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).keys("*")   # (no retries: they back off for seconds)
    assert redis.Redis(port=port, password=derive_keys(SECRET).redis_password).ping()


def test_router_with_the_wrong_secret_is_refused_fast(cluster, tmp_path):
    _, log_dir = cluster
    port = int(re.search(r"127\.0\.0\.1:(\d+)/0", (log_dir / "up.out").read_text()).group(1))
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
        _wait_healthy(url, proc, log_path.read_text, timeout_s=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=4)
        assert err.value.status_code >= 500 and time.monotonic() - t0 < 30, (err.value, log_path.read_text())
        nodes = (log_dir / "prefill-0.log").read_text() + (log_dir / "decode-0.log").read_text()
        assert re.search(r"cluster auth: refused peer 127\.0\.0\.1:\d+ on the request socket of this "
                         r"(prefill|decode) node: its --cluster-secret differs", nodes), nodes[-3000:]
        assert "cluster auth: handshake with tcp://" in log_path.read_text()
    finally:
        _stop(proc)
