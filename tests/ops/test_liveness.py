"""Issue 14: a router notices a dead node on its own connections, with the registry down.

Real parts: a real redis-server, a real process per node holding a real ZMQ request socket and a
real NodeRegistrar (the engine is not what is under test here; tests/ops/test_ops_up.py runs the
same faults against real SmolLM2 nodes), the real router app over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.redis_server import RedisServer
from tests.router.util import RouterHarness, make_router

NODE_SCRIPT = """
import sys, time, zmq
from pdserve.protocol import LoadReport, NodeInfo
from pdserve.registry import NodeRegistrar
url, node_id, role = sys.argv[1:4]
pull = zmq.Context.instance().socket(zmq.PULL)
port = pull.bind_to_random_port("tcp://127.0.0.1")
info = NodeInfo(node_id=node_id, role=role, addr=f"tcp://127.0.0.1:{port}", bootstrap="tcp://127.0.0.1:1",
                model="smollm2", fingerprint="fp", dtype="float32", page_size=16, context_length=2048,
                vocab_size=49152, max_total_tokens=4096, started_at=time.time(), ttl_s=1.0)
load = lambda: LoadReport(node_id=node_id, waiting=0, running=0, free_pages=256, total_pages=256,
                          timestamp=time.time())
NodeRegistrar(url, info, ttl_s=1.0, interval_s=0.1, load_fn=load).start()
print("READY", flush=True)
while True:
    time.sleep(1)
"""


def start_node(url: str, node_id: str, role: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, url, node_id, role], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def wait_until(predicate, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture
def cluster(tokenizer):
    redis = RedisServer()
    redis.start()
    procs = {name: start_node(redis.url, name, role) for name, role in
             (("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode"))}
    harness = RouterHarness(make_router(tokenizer, redis.url)).start()
    try:
        yield redis, procs, harness
    finally:
        harness.stop()
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        redis.stop()


def metric_lines(url: str, name: str) -> list[str]:
    return [ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(name + "{")]


def test_dead_node_noticed_and_gauges_go_stale_while_redis_is_down(cluster):
    redis, procs, h = cluster
    view = h.router.view
    wait_until(lambda: len(view.nodes()) == 3, 10)
    wait_until(lambda: len(metric_lines(h.url, "pdserve_node_free_pages")) == 3, 10)
    redis.proc.kill()                                  # the registry dies first ...
    redis.proc.wait()
    wait_until(lambda: not view.is_connected, 5)
    health = httpx.get(h.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert health.json()["registry_age_s"] >= 0

    os.killpg(procs["decode-1"].pid, signal.SIGKILL)   # ... then a node: the router's own probe sees it
    took = wait_until(lambda: "decode-1" not in view.nodes(), 10)
    assert took < 5
    listed = {n["node_id"] for n in httpx.get(h.url + "/nodes").json()["nodes"]}
    assert listed == {"prefill-0", "decode-0"}

    os.kill(procs["decode-0"].pid, signal.SIGSTOP)    # a frozen node: heartbeats go unanswered
    try:
        wait_until(lambda: "decode-0" not in view.nodes(), 10)
    finally:
        os.kill(procs["decode-0"].pid, signal.SIGCONT)
    health = httpx.get(h.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert health.json()["registry_age_s"] > 1.0

    # No report has arrived for longer than the nodes' TTL (1 s): their gauges are not exported any more.
    wait_until(lambda: not metric_lines(h.url, "pdserve_node_free_pages"), 5)
    ages = metric_lines(h.url, "pdserve_node_report_age_seconds")
    assert ages and all(float(ln.rsplit(" ", 1)[1]) > 1.0 for ln in ages)


def test_evicted_instance_is_not_brought_back_by_a_scan(cluster):
    redis, procs, h = cluster
    view = h.router.view
    wait_until(lambda: len(view.nodes()) == 3, 10)
    view.evict("decode-0", "test")                     # its record is still refreshed in Redis
    time.sleep(1.5)                                     # > 2 scans
    assert "decode-0" not in view.nodes()
    redis_alive = httpx.get(h.url + "/health").json()
    assert redis_alive["registry_connected"] and redis_alive["status"] == "ok"


def test_probe_passes_cluster_auth_and_a_node_of_another_cluster_is_unreachable():
    import zmq

    from pdserve.router.liveness import NodeProber
    from pdserve.security import ClusterAuth
    from tests.router.util import make_info

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ClusterAuth("a-cluster-secret-1").serve(pull, "the test node's request socket")
    info = make_info("d0", "decode", addr=f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
    verdicts: dict[str, list[str]] = {"same": [], "other": []}
    probers = [NodeProber(ClusterAuth(secret), on_dead=lambda n, r, k=k: verdicts[k].append(r),
                          connect_timeout_s=1.5).start()
               for k, secret in (("same", "a-cluster-secret-1"), ("other", "another-secret-22"))]
    try:
        for prober in probers:
            prober.watch(info)
        wait_until(lambda: verdicts["other"], 10)
        time.sleep(0.5)
        assert verdicts["same"] == []                      # handshake done: alive
        assert "unreachable" in verdicts["other"][0]       # refused by the node's key check: never up
    finally:
        for prober in probers:
            prober.stop()
        pull.close(linger=0)
        ctx.term()
