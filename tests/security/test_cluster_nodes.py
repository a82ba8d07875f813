"""A real decode node (SmolLM2, its own process) started with a cluster secret, probed over real
TCP: outsiders can neither submit work nor reach its bootstrap channel, and a request that names an
impostor's bootstrap endpoint never hands the impostor the node's NIXL metadata (so it can never
write KV into the node), fails instead of hanging, and leaks no KV page."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import zmq

from pdserve.protocol import GenerateReq, NodeStats, StatsReq, TokenOut, decode_router_message, encode
from pdserve.sampling_params import SamplingParams
from pdserve.security import ClusterAuth

pytestmark = pytest.mark.slow

SECRET = "correct-horse-battery-staple"
WRONG = "not-the-cluster-secret-at-all"
NODE_FLAGS = ["--max-total-tokens", "1024", "--page-size", "16", "--peer-timeout-s", "2.0",
              "--heartbeat-interval-s", "0.3", "--cpu-threads", "1", "--skip-server-warmup"]


@pytest.fixture(scope="module")
def decode_node(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("node") / "decode.log"
    env = {**os.environ, "PDSERVE_CLUSTER_SECRET": SECRET}      # the env form of --cluster-secret
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "decode", "--model-path", smollm2_path, *NODE_FLAGS],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    try:
        info = None
        deadline = time.time() + 180
        while info is None and time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                info = json.loads(line[len("READY "):])
            elif not line and proc.poll() is not None:
                pytest.fail(f"decode node exited: {log_path.read_text()[-3000:]}")
        assert info is not None, "decode node did not start"
        yield info, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Peer:
    """A router-like client: a PULL for replies, a PUSH to the node, with ``secret`` (or none)."""

    def __init__(self, ctx: zmq.Context, secret: str | None) -> None:
        self.auth = ClusterAuth(secret)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.linger = 0
        self.auth.serve(self.pull, "a test router's reply socket")
        self.reply_to = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        self.ctx, self.push = ctx, None

    def send(self, node: dict, msg) -> None:
        if self.push is None:
            self.push = self.ctx.socket(zmq.PUSH)
            self.push.linger = 0
            self.auth.dial(self.push, "a test router's node socket")
            self.push.connect(node["addr"])
        self.push.send(encode(msg))

    def replies(self, timeout_s: float, until=lambda msg: False) -> list:
        out, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pull.poll(50):
                out.append(decode_router_message(self.pull.recv()))
                if until(out[-1]):
                    break
        return out


def _impostor_bootstrap(ctx: zmq.Context, secret: str | None) -> tuple[zmq.Socket, str]:
    """A ROUTER posing as a prefill node's bootstrap endpoint (what would receive the Handshake)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    ClusterAuth(secret).serve(sock, "an impostor's bootstrap socket")
    return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


def _generate(reply_to: str, bootstrap: str) -> GenerateReq:
    rid = uuid.uuid4().hex[:8]
    return GenerateReq(rid=rid, input_ids=[1, 2, 3, 4, 5], reply_to=reply_to, transfer_id=rid,
                       prefill_bootstrap=bootstrap, sampling=SamplingParams(temperature=0, max_new_tokens=4))


def _stats(member: Peer, node: dict) -> NodeStats:
    member.send(node, StatsReq(reply_to=member.reply_to))
    got = member.replies(10, until=lambda m: isinstance(m, NodeStats))
    assert got and isinstance(got[-1], NodeStats), got
    return got[-1]


def test_outsiders_cannot_submit_work_or_get_metadata(decode_node):
    node, log_path = decode_node
    ctx = zmq.Context()
    try:
        outsiders = [Peer(ctx, None), Peer(ctx, WRONG)]
        bootstraps = [_impostor_bootstrap(ctx, secret) for secret in (None, WRONG)]
        for peer, (_, endpoint) in zip(outsiders, bootstraps):
            peer.send(node, StatsReq(reply_to=peer.reply_to))
            peer.send(node, _generate(peer.reply_to, endpoint))   # would make the node dial `endpoint`
        time.sleep(3.0)
        assert [p.replies(0.1) for p in outsiders] == [[], []]
        assert [sock.poll(0) for sock, _ in bootstraps] == [0, 0]    # no Handshake (NIXL metadata) came
        stats = _stats(Peer(ctx, SECRET), node)                    # a member is served ...
        assert (stats.waiting, stats.running) == (0, 0)            # ... and nothing of theirs was admitted
        log = log_path.read_text()
        assert "refused peer 127.0.0.1:" in log and "on the request socket of this decode node" in log, log[-3000:]
        assert "--cluster-secret differs" in log, log[-3000:]
    finally:
        ctx.destroy(linger=0)


def test_metadata_never_reaches_an_impostor_prefill(decode_node):
    """A member's request that names an impostor's bootstrap endpoint: the decode node's dial fails
    the CURVE handshake, so the impostor never receives the Handshake (agent metadata); the request
    fails within the peer timeout and its pages are freed."""
    node, log_path = decode_node
    ctx = zmq.Context()
    try:
        member = Peer(ctx, SECRET)
        total = _stats(member, node).free_pages
        for secret in (None, WRONG):
            sock, endpoint = _impostor_bootstrap(ctx, secret)
            req = _generate(member.reply_to, endpoint)
            t0 = time.monotonic()
            member.send(node, req)
            out = member.replies(20, until=lambda m: isinstance(m, TokenOut) and m.finish_reason is not None)
            assert out and out[-1].rid == req.rid and out[-1].finish_reason == "error", out
            assert time.monotonic() - t0 < 15
            assert sock.poll(0) == 0
            assert f"handshake with {endpoint}" in log_path.read_text()
        assert _stats(member, node).free_pages == total   # no KV page leaked
    finally:
        ctx.destroy(linger=0)


def test_outsider_gets_nothing_from_the_bootstrap_channel(decode_node):
    node, log_path = decode_node
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(node["bootstrap"])
        dealer.send(b"\x81\xa4type\xa9handshake")   # anything: the handshake fails before a frame is read
        assert dealer.poll(2000) == 0
        deadline = time.monotonic() + 5
        while "on the bootstrap channel of" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "on the bootstrap channel of" in log_path.read_text()
    finally:
        ctx.destroy(linger=0)
