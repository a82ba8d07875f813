"""The bootstrap channel: node <-> node control messages over ZMQ, with liveness.

One I/O thread owns every socket (ZMQ sockets are not thread-safe): a ROUTER bound at this node's
bootstrap endpoint (peers that dial us; key = their routing id, i.e. their agent name) and one
DEALER per peer we dial (key = the endpoint we dialed). The scheduler thread talks to it through
an inproc PAIR socket (commands) and a queue (received messages), so ``send`` never blocks and
``recv`` just drains.

Heartbeats live in the I/O thread on purpose: a scheduler stuck in a long forward step still
answers pings, so a busy peer is not taken for a dead one. Every message (heartbeat or not)
refreshes the peer's last-seen time; a peer silent for ``peer_timeout_s`` is reported once as
``PeerLost`` and forgotten (its DEALER closed). A dialed peer that never answers counts from the
dial, so an unreachable bootstrap endpoint is reported the same way.

With a cluster secret (``pdserve.security``) the ROUTER is a CURVE server that admits only cluster
members and every DEALER authenticates as one and requires its peer to be one: a peer without the
secret never gets a message through (nor this node's NIXL metadata out of it), and a DEALER never
hands its metadata to an endpoint that cannot prove it holds the secret. Its handshake fails; the
refusal is logged, and a dialed peer that never authenticates is reported as ``PeerLost`` like
any silent one. The messages themselves are untouched (``transfer/protocol.py``).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import NamedTuple

import msgspec
import zmq

from pdserve.security import ClusterAuth, installed_auth
from pdserve.transfer.protocol import Heartbeat, TransferMessage, decode_message, encode

log = logging.getLogger(__name__)

_ids = itertools.count()


class PeerLost(NamedTuple):
    silent_s: float


Received = tuple[str, "TransferMessage | PeerLost"]   # (peer key, message)


class BootstrapChannel:
    def __init__(self, host: str, port: int, identity: str, *, heartbeat_interval_s: float,
                 peer_timeout_s: float, auth: ClusterAuth | None = None) -> None:
        """``auth``: the cluster's credentials; default: the process's (``security.install``)."""
        self.identity = identity
        self._auth = auth if auth is not None else installed_auth()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.peer_timeout_s = peer_timeout_s
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a peer that re-dials keeps its id
        self._auth.serve(self._router, f"the bootstrap channel of {identity}")
        if port:
            self._router.bind(f"tcp://{host}:{port}")
        else:
            port = self._router.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        ctrl_addr = f"inproc://bootstrap-ctrl-{id(self)}-{next(_ids)}"
        self._ctrl = self._ctx.socket(zmq.PAIR)          # scheduler-thread end
        self._ctrl.bind(ctrl_addr)
        self._ctrl_io = self._ctx.socket(zmq.PAIR)       # I/O-thread end
        self._ctrl_io.connect(ctrl_addr)
        self._inbox: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._dealers: dict[str, zmq.Socket] = {}         # endpoint -> DEALER
        self._last_rx: dict[str, float] = {}              # peer key -> monotonic time last heard
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"bootstrap-{identity}", daemon=True)
        self._thread.start()

    # -- scheduler-thread API -----------------------------------------------------------------
    def dial(self, endpoint: str) -> None:
        """Open a DEALER to ``endpoint``; its messages arrive keyed by ``endpoint``."""
        self._ctrl.send_multipart([b"dial", endpoint.encode(), b""])

    def send(self, peer: str, msg: msgspec.Struct) -> None:
        self._ctrl.send_multipart([b"send", peer.encode(), encode(msg)])

    def drop(self, peer: str) -> None:
        """Forget a peer (close its DEALER if we dialed it); no PeerLost follows."""
        self._ctrl.send_multipart([b"drop", peer.encode(), b""])

    def recv(self) -> list[Received]:
        out = []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ctrl.send_multipart([b"stop", b"", b""])
        self._thread.join(timeout=5.0)
        self._ctrl.close(linger=0)
        if self._thread.is_alive():   # term() would wait for its sockets forever
            log.warning("bootstrap I/O thread did not stop; leaving its sockets to process exit")
            return
        self._ctx.term()

    # -- I/O thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctrl_io, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while True:
                timeout_ms = max(0.0, next_beat - time.monotonic()) * 1000
                for sock, _ in poller.poll(timeout_ms):
                    if sock is self._ctrl_io:
                        if not self._on_ctrl(poller):
                            return
                    elif sock is self._router:
                        self._drain(sock, router=True)
                    else:
                        self._drain(sock, router=False)
                now = time.monotonic()
                if now >= next_beat:
                    self._beat(now, poller)
                    next_beat = now + self.heartbeat_interval_s
        finally:
            for sock in [self._router, self._ctrl_io, *self._dealers.values()]:
                sock.close(linger=0)

    def _on_ctrl(self, poller: zmq.Poller) -> bool:
        while True:
            try:
                op, peer_b, data = self._ctrl_io.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            peer = peer_b.decode()
            if op == b"stop":
                return False
            if op == b"dial":
                self._open_dealer(peer, poller)
            elif op == b"drop":
                self._forget(peer, poller)
            elif op == b"send":
                self._send_raw(peer, data)

    def _open_dealer(self, endpoint: str, poller: zmq.Poller) -> None:
        if endpoint in self._dealers:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.identity.encode())
        self._auth.dial(sock, f"the bootstrap channel of {self.identity}")
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        self._dealers[endpoint] = sock
        self._last_rx[endpoint] = time.monotonic()

    def _forget(self, peer: str, poller: zmq.Poller) -> None:
        self._last_rx.pop(peer, None)
        sock = self._dealers.pop(peer, None)
        if sock is not None:
            poller.unregister(sock)
            sock.close(linger=0)

    def _send_raw(self, peer: str, data: bytes, *, is_heartbeat: bool = False) -> None:
        try:
            if peer in self._dealers:
                self._dealers[peer].send(data, zmq.NOBLOCK)
            elif peer.startswith("tcp://"):
                log.warning("dropping a message to %s: not dialed (or already lost)", peer)
            else:
                self._router.send_multipart([peer.encode(), data], zmq.NOBLOCK)
        except zmq.Again:   # (a dropped heartbeat is no news: a peer that stays unreachable is PeerLost)
            if not is_heartbeat:
                log.warning("dropping a message to %s: send queue full (peer not reading)", peer)

    def _drain(self, sock: zmq.Socket, *, router: bool) -> None:
        peer_of_dealer = None if router else next(e for e, s in self._dealers.items() if s is sock)
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = frames[0].decode() if router else peer_of_dealer
            try:
                msg = decode_message(frames[-1])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("malformed bootstrap message from %s dropped: %s", peer, exc)
                continue
            self._last_rx[peer] = time.monotonic()
            if not isinstance(msg, Heartbeat):
                self._inbox.put((peer, msg))

    def _beat(self, now: float, poller: zmq.Poller) -> None:
        beat = encode(Heartbeat(sent_at=time.time()))
        for peer, last in list(self._last_rx.items()):
            silent_s = now - last
            if silent_s > self.peer_timeout_s:
                self._forget(peer, poller)
                self._inbox.put((peer, PeerLost(silent_s=silent_s)))
            else:
                self._send_raw(peer, beat, is_heartbeat=True)
