"""Cluster authentication: every ZMQ socket between pdserve processes speaks CURVE.

One shared secret (``--cluster-secret`` / ``$PDSERVE_CLUSTER_SECRET``) is stretched (PBKDF2) into
two CURVE keypairs, the same in every process: the *server* pair for sockets that bind (a node's
request socket, the router's reply socket, the bootstrap ROUTER), the *client* pair for sockets
that connect. CurveZMQ then authenticates both ends and encrypts every frame (fresh short-term
keys and nonces per connection, so a recorded session cannot be replayed or read): a client needs
the server's public key, which only holders of the secret can derive, and a ZAP handler on each
bound socket admits only the cluster's client key. A connecting socket without credentials, or
with another secret's, fails the handshake and never delivers a message; the bound side logs one
line naming the peer and the reason (at most once per peer and reason per ``LOG_EVERY_S``).

Nothing here parses or wraps messages: the message layer (``protocol.py``, ``transfer/protocol.py``)
is unchanged and pays no per-message Python cost. See docs/security.md for the threat model.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

KDF_SALT = b"pdserve-cluster-secret-v1"
KDF_ITERATIONS = 100_000          # ~0.05 s once per process; slows guessing a weak secret offline
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
LOG_EVERY_S = 30.0

_ids = itertools.count()


@dataclass(frozen=True)
class ClusterKeys:
    server_public: bytes     # z85 (40 bytes)
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    redis_password: str      # for a Redis that `pdserve up` starts

    def __repr__(self) -> str:
        return "ClusterKeys(***)"


@functools.lru_cache(maxsize=4)
def derive_keys(secret: str) -> ClusterKeys:
    """The cluster's keys, a pure function of ``secret`` (every process derives the same)."""
    master = hashlib.pbkdf2_hmac("sha256", secret.encode(), KDF_SALT, KDF_ITERATIONS)

    def sub(label: bytes) -> bytes:
        return hmac.new(master, label, hashlib.sha256).digest()

    server_secret, client_secret = z85.encode(sub(b"curve-server")), z85.encode(sub(b"curve-client"))
    return ClusterKeys(server_public=zmq.curve_public(server_secret), server_secret=server_secret,
                       client_public=zmq.curve_public(client_secret), client_secret=client_secret,
                       redis_password=sub(b"redis-password").hex()[:32])


def redact_url(url: str | None) -> str | None:
    """``redis://:pw@host:6379/0`` -> ``redis://:***@host:6379/0`` (for logs)."""
    return None if url is None else re.sub(r"(//[^/@:]*:)[^/]*@", r"\1***@", url)


class ClusterAuth:
    """Puts the cluster's CURVE keys on sockets; does nothing when there is no secret."""

    def __init__(self, secret: str | None) -> None:
        self.keys = derive_keys(secret) if secret else None

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def serve(self, sock: zmq.Socket, what: str) -> None:
        """Call before ``bind``: only peers holding the secret get through; refusals are logged."""
        if self.keys is None:
            return
        sock.curve_secretkey = self.keys.server_secret
        sock.curve_publickey = self.keys.server_public
        sock.curve_server = True
        sock.zap_domain = _ensure_zap_handler(sock.context, z85.decode(self.keys.client_public))
        _watch(sock, what, is_server=True, on_failure=None)

    def dial(self, sock: zmq.Socket, what: str, on_failure: Callable[[str, str], None] | None = None) -> None:
        """Call before ``connect``: authenticate as a cluster member and require the peer to be one.
        ``on_failure(endpoint, reason)`` runs (in a monitor thread) when a handshake fails."""
        if self.keys is None:
            return
        sock.curve_serverkey = self.keys.server_public
        sock.curve_publickey = self.keys.client_public
        sock.curve_secretkey = self.keys.client_secret
        _watch(sock, what, is_server=False, on_failure=on_failure)


_installed = ClusterAuth(None)


def install(auth: ClusterAuth) -> None:
    """Make ``auth`` the process's default: what a ``BootstrapChannel`` built without one uses (the
    transfer layer builds its channels deep inside; a node installs its auth before building it)."""
    global _installed
    _installed = auth


def installed_auth() -> ClusterAuth:
    return _installed


# -- refusal log (rate-limited per peer and reason) -------------------------------------------------

_last_logged: dict[tuple[str, str, str], float] = {}
_log_lock = threading.Lock()


def log_refusal(what: str, peer: str | None, reason: str) -> None:
    """``peer`` (``host:port``; None when unknown) was refused on ``what``: one warning line, then
    nothing for the same host and reason for ``LOG_EVERY_S`` (a refused ZMQ peer re-dials every 100 ms)."""
    host = peer.rsplit(":", 1)[0] if peer else "?"
    if _should_log((what, host, reason)):
        log.warning("cluster auth: refused peer %s on %s: %s", peer or "(address unknown: already gone)", what, reason)


def log_dial_failure(what: str, endpoint: str, reason: str) -> None:
    if _should_log((what, endpoint, reason)):
        log.warning("cluster auth: handshake with %s (%s) failed: %s", endpoint, what, reason)


def _should_log(key: tuple[str, str, str]) -> bool:
    now = time.monotonic()
    with _log_lock:
        if now - _last_logged.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
            return False
        _last_logged[key] = now
        return True


_SERVER_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it sent no credentials (started without --cluster-secret?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: ("its --cluster-secret differs from this process's (CURVE handshake "
                                            "failed; or a recorded handshake replayed)"),
}
_CLIENT_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer runs without --cluster-secret",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the peer's --cluster-secret differs from ours (CURVE handshake failed)",
}


# -- ZAP: one handler per libzmq context; each secret's sockets are a ZAP domain of their own -------

_zap_domains: dict[int, dict[bytes, bytes]] = {}   # context address -> {ZAP domain: client key (raw) it admits}
_zap_lock = threading.Lock()


def zap_domain(client_key: bytes) -> bytes:
    """The ZAP domain of one secret's sockets (a process normally has one; tests hold several)."""
    return b"pdserve-" + hashlib.sha256(client_key).hexdigest()[:16].encode()


def _ensure_zap_handler(ctx: zmq.Context, client_key: bytes) -> bytes:
    """Start ``ctx``'s ZAP handler if it has none; admit ``client_key`` in its domain (returned)."""
    domain = zap_domain(client_key)
    with _zap_lock:
        domains = _zap_domains.get(ctx.underlying)
        if domains is not None:
            domains[domain] = client_key
            return domain
        rep = zmq.Context.shadow(ctx.underlying).socket(zmq.REP)
        rep.linger = 0
        rep.bind(ZAP_ENDPOINT)
        domains = _zap_domains[ctx.underlying] = {domain: client_key}
    threading.Thread(target=_zap_loop, args=(rep, domains, ctx.underlying), name="pdserve-zap", daemon=True).start()
    return domain


def _zap_loop(rep: zmq.Socket, domains: dict[bytes, bytes], ctx_addr: int) -> None:
    try:
        while True:
            frames = rep.recv_multipart()
            version, request_id, domain, address, _identity, mechanism = frames[:6]
            credentials, client_key = frames[6:], domains.get(domain)
            is_ok = (mechanism == b"CURVE" and bool(credentials) and client_key is not None
                     and hmac.compare_digest(credentials[0], client_key))
            if not is_ok:
                log_refusal("a CURVE socket", address.decode(errors="replace"),
                            "its client key is not the cluster's (different --cluster-secret)")
            rep.send_multipart([version, request_id, b"200" if is_ok else b"400",
                                b"OK" if is_ok else b"not a cluster member", b"cluster" if is_ok else b"", b""])
    except zmq.ContextTerminated:
        pass
    finally:
        rep.close(linger=0)
        with _zap_lock:
            _zap_domains.pop(ctx_addr, None)


# -- handshake monitors -----------------------------------------------------------------------------

_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def _watch(sock: zmq.Socket, what: str, *, is_server: bool, on_failure: Callable[[str, str], None] | None) -> None:
    """A thread that reads ``sock``'s monitor events and reports failed handshakes (until it closes)."""
    addr = f"inproc://pdserve-auth-monitor-{os.getpid()}-{next(_ids)}"
    events = _FAILED | zmq.EVENT_MONITOR_STOPPED | (zmq.EVENT_ACCEPTED if is_server else 0)
    sock.monitor(addr, events)
    pair = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
    pair.linger = 0
    pair.connect(addr)
    threading.Thread(target=_monitor_loop, args=(pair, what, is_server, on_failure), name="pdserve-auth-monitor",
                     daemon=True).start()


def _monitor_loop(pair: zmq.Socket, what: str, is_server: bool,
                  on_failure: Callable[[str, str], None] | None) -> None:
    last_peer: str | None = None   # the most recently accepted connection's address
    try:
        while True:
            event = recv_monitor_message(pair)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_MONITOR_STOPPED:
                return
            if kind == zmq.EVENT_ACCEPTED:
                last_peer = _peer_of_fd(value)
                continue
            if is_server:
                if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH:   # the ZAP handler logged those, address and all
                    log_refusal(what, last_peer, _reason(kind, value, True))
                continue
            endpoint = event["endpoint"].decode(errors="replace")
            reason = _reason(kind, value, False)
            log_dial_failure(what, endpoint, reason)
            if on_failure is not None:
                on_failure(endpoint, reason)
    except zmq.ContextTerminated:
        pass
    finally:
        pair.close(linger=0)


def _reason(kind: int, value: int, is_server: bool) -> str:
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the peer refused our key (ZAP status {value}: a different --cluster-secret)"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:   # value: an errno (the other end hung up)
        return ("the peer closed the connection during the handshake (a different --cluster-secret, or none?)"
                if not is_server else "it hung up during the handshake (no --cluster-secret, or another?)")
    reasons = _SERVER_REASONS if is_server else _CLIENT_REASONS
    return reasons.get(value, f"handshake failed (ZMTP error {value:#x})")


def _peer_of_fd(fd: int) -> str | None:
    """``host:port`` of the connection on ``fd`` (None if it is already closed)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return None
    finally:
        sock.close()
