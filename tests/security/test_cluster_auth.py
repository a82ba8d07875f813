"""Cluster auth on real ZMQ sockets over TCP (no model): who gets through, and what is logged."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import zmq

from pdserve.config import RouterConfig, SecurityConfig, ServerConfig, config_from_args
from pdserve import security
from pdserve.security import ClusterAuth, derive_keys, redact_url
from pdserve.transfer.channel import BootstrapChannel, PeerLost
from pdserve.transfer.protocol import KVDest

SECRET = "correct-horse-battery-staple"
WRONG = "not-the-cluster-secret-at-all"


def test_keys_are_a_function_of_the_secret():
    a, b, c = derive_keys(SECRET), derive_keys(SECRET + " "), derive_keys(WRONG)
    assert a == derive_keys(str(SECRET))
    assert len({a.server_public, b.server_public, c.server_public}) == 3
    assert a.server_public != a.client_public and len(a.server_public) == 40
    assert SECRET not in repr(a) and SECRET not in repr(ServerConfig(security=SecurityConfig(SECRET)))


def test_secret_flag_env_and_refusals(monkeypatch):
    monkeypatch.delenv("PDSERVE_CLUSTER_SECRET", raising=False)
    assert ServerConfig().security.cluster_secret is None
    assert config_from_args(RouterConfig, {"cluster_secret": SECRET}).security.cluster_secret == SECRET
    with pytest.raises(ValueError, match="^--cluster-secret: must be at least 16 characters"):
        SecurityConfig("short")
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", WRONG)
    assert ServerConfig().security.cluster_secret == WRONG            # the env when the flag is absent
    assert SecurityConfig(SECRET).cluster_secret == SECRET            # the flag wins
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "tiny")
    with pytest.raises(ValueError, match=r"^\$PDSERVE_CLUSTER_SECRET: must be at least 16"):
        SecurityConfig()


def test_redact_url():
    assert redact_url("redis://:s3cr3t@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redact_url("redis://user:p@ss@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"


@pytest.fixture(autouse=True)
def fresh_refusal_log(monkeypatch):
    """Each test sees its own refusals (the log is rate-limited per host and reason, process-wide)."""
    monkeypatch.setattr(security, "_last_logged", {})


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _push(ctx: zmq.Context, addr: str, secret: str | None) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    ClusterAuth(secret).dial(sock, "a test client")
    sock.connect(addr)
    return sock


def _refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cluster auth: refused peer" in r.getMessage()]


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_node_socket_admits_only_the_cluster(ctx, caplog):
    caplog.set_level(logging.WARNING, logger="pdserve.security")
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    ClusterAuth(SECRET).serve(pull, "the request socket of a test node")
    addr = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    peers = [_push(ctx, addr, secret) for secret in (None, WRONG, SECRET)]   # (kept: GC would close them)
    peers[0].send(b"from a peer without the secret")
    peers[1].send(b"from a peer with another secret")
    assert not pull.poll(1500), pull.recv()
    peers[2].send(b"from a cluster member")
    assert pull.poll(5000) and pull.recv() == b"from a cluster member"
    assert not pull.poll(300)
    assert _wait_for(lambda: any("127.0.0.1:" in line for line in _refusals(caplog)))   # the peer, by address
    assert _wait_for(lambda: any("--cluster-secret differs" in line for line in _refusals(caplog)))
    lines = _refusals(caplog)
    assert any("no credentials" in line or "hung up" in line for line in lines), lines   # (who notices first varies)
    assert all("refused peer" in line and "on the request socket of a test node" in line for line in lines), lines
    time.sleep(1.0)   # the refused peers re-dial every 100 ms, but each (host, reason) is logged once per 30 s
    lines = _refusals(caplog)
    assert len(lines) <= 6, lines   # {127.0.0.1, address unknown} x at most 3 reasons


def test_zap_admits_only_the_cluster_client_key(ctx, caplog):
    """Knowing the server's public key is not enough: the client must hold the cluster's client key."""
    caplog.set_level(logging.WARNING, logger="pdserve.security")
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    ClusterAuth(SECRET).serve(pull, "the request socket of a test node")
    addr = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    rogue = ctx.socket(zmq.PUSH)
    rogue.linger = 0
    rogue.curve_serverkey = derive_keys(SECRET).server_public
    rogue.curve_publickey, rogue.curve_secretkey = zmq.curve_keypair()
    rogue.connect(addr)
    rogue.send(b"from a leaked server key")
    assert not pull.poll(1500)
    assert _wait_for(lambda: any("its client key is not the cluster's" in line and "refused peer 127.0.0.1" in line
                                 for line in _refusals(caplog))), _refusals(caplog)


class RecordingProxy:
    """A TCP proxy in front of ``target`` that keeps every byte the client sent (a wiretap)."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.target_port, self.sent = self.listener.getsockname()[1], target_port, bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()
        self._pipe(client, server, self.sent)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        while data := src.recv(65536):
            if record is not None:
                record += data
            dst.sendall(data)


def _replay_zmtp(sock: socket.socket, sent: bytes) -> None:
    """Send a recorded client byte stream paced as a ZMTP 3 client paces it: the greeting's 10-byte
    signature, then (after the server's 11) the greeting's rest, then (after the server's whole
    64-byte greeting) everything else."""
    for chunk, wait_for in ((sent[:10], 11), (sent[10:64], 64 - 11)):
        sock.sendall(chunk)
        got = b""
        while len(got) < wait_for:
            got += sock.recv(wait_for - len(got))
    sock.sendall(sent[64:])


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_recorded_session_cannot_be_replayed(ctx, secret, caplog):
    """Wiretap a member's session, replay its bytes on a new connection: with the secret nothing is
    delivered (CURVE's per-connection keys); without one the replay delivers the message again."""
    caplog.set_level(logging.WARNING, logger="pdserve.security")
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    ClusterAuth(secret).serve(pull, "the request socket of a test node")
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    proxy = RecordingProxy(port)
    member = _push(ctx, f"tcp://127.0.0.1:{proxy.port}", secret)
    member.send(b"StatsReq from the router")
    assert pull.poll(5000) and pull.recv() == b"StatsReq from the router"
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port)) as replay:
        _replay_zmtp(replay, bytes(proxy.sent))
        delivered = pull.poll(1500)
    assert bool(delivered) == (secret is None)
    if secret is not None:
        assert b"StatsReq" not in proxy.sent   # and the wiretap read nothing
        assert _wait_for(lambda: any("replayed" in line for line in _refusals(caplog))), _refusals(caplog)


def test_client_refuses_a_server_without_the_secret(ctx, caplog):
    """A cluster member never delivers to an endpoint that cannot prove it holds the secret."""
    caplog.set_level(logging.WARNING, logger="pdserve.security")
    for server_secret in (None, WRONG):
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        ClusterAuth(server_secret).serve(pull, "an impostor")
        addr = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
        member = _push(ctx, addr, SECRET)
        member.send(b"a reply with tokens")
        assert not pull.poll(1000)
        assert _wait_for(lambda: any(f"handshake with {addr} (a test client) failed" in r.getMessage()
                                     for r in caplog.records))


def _channel(name: str, secret: str | None) -> BootstrapChannel:
    return BootstrapChannel("127.0.0.1", 0, name, heartbeat_interval_s=0.2, peer_timeout_s=1.5,
                            auth=ClusterAuth(secret))


def _received(chan: BootstrapChannel, timeout_s: float) -> list:
    out, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out += chan.recv()
        time.sleep(0.05)
    return out


def test_bootstrap_channel_refuses_outsiders(caplog):
    caplog.set_level(logging.WARNING, logger="pdserve.security")
    prefill = _channel("prefill-agent", SECRET)
    member, outsider, impostor = _channel("decode-agent", SECRET), _channel("x", None), _channel("y", WRONG)
    try:
        msg = KVDest(transfer_id="t1", page_ids=[3, 4])
        for chan in (member, outsider, impostor):
            chan.dial(prefill.endpoint)
            chan.send(prefill.endpoint, msg)
        got = _received(prefill, 1.0)
        assert [(peer, m) for peer, m in got] == [("decode-agent", msg)]   # only the member's message
        # ... and a member dialing an endpoint without the secret hands it nothing: the dial fails,
        # and the silent peer is reported lost like any other.
        member.dial(outsider.endpoint)
        member.send(outsider.endpoint, msg)
        assert not [m for _, m in _received(outsider, 2.0) if isinstance(m, KVDest)]
        assert any(peer == outsider.endpoint and isinstance(m, PeerLost) for peer, m in member.recv())
        lines = [line for line in _refusals(caplog) if "on the bootstrap channel of prefill-agent" in line]
        assert any("differs" in line for line in lines), lines
        assert any("refused peer 127.0.0.1:" in line for line in lines), lines
    finally:
        for chan in (prefill, member, outsider, impostor):
            chan.close()
