"""The router's own view of which nodes are alive, independent of the registry.

The registry notices a dead node when its record's TTL lapses, which needs Redis. So a router also
keeps one idle probe connection to each node's request socket (a ZMQ PUSH socket that never sends)
with ZMTP heartbeats on (``HEARTBEAT_IVL_S``; libzmq's I/O thread on the node answers them, busy
engine or not) and a socket monitor. A node counts as dead when its connection is down and not
back (handshake done) within ``GRACE_S`` (a killed process: its connection closes at once), when
heartbeats go unanswered for ``HEARTBEAT_TIMEOUT_S`` (a frozen or unreachable host), or when it was
never reachable within ``CONNECT_TIMEOUT_S`` of joining. ``on_dead`` then evicts it from the view
(``RegistryView.evict``): new requests avoid it, ``/nodes`` drops it and the attempts bound to it
end at once (retried elsewhere before their first token, an error event after it).

All sockets live in the prober's one thread; ``watch``/``unwatch`` queue commands to it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.protocol import NodeInfo
from pdserve.security import ClusterAuth

log = logging.getLogger(__name__)

HEARTBEAT_IVL_S = 0.5
HEARTBEAT_TIMEOUT_S = 3.0
GRACE_S = 1.0             # a dropped connection not back within this is a dead node
CONNECT_TIMEOUT_S = 5.0   # a node never reached within this of joining is dead too
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED
_ids = count()


@dataclass
class _Probe:
    info: NodeInfo
    sock: zmq.Socket
    monitor: zmq.Socket
    is_up: bool = False
    was_up: bool = False
    down_since: float = field(default_factory=time.monotonic)
    is_reported: bool = False


class NodeProber:
    def __init__(self, auth: ClusterAuth, on_dead: Callable[[str, str], None], *,
                 grace_s: float = GRACE_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 heartbeat_ivl_s: float = HEARTBEAT_IVL_S, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        self.auth, self.on_dead = auth, on_dead
        self.grace_s, self.connect_timeout_s = grace_s, connect_timeout_s
        self.heartbeat_ivl_ms, self.heartbeat_timeout_ms = int(heartbeat_ivl_s * 1000), int(heartbeat_timeout_s * 1000)
        self._ctx = zmq.Context()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._probes: dict[str, _Probe] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-prober", daemon=True)

    def start(self) -> "NodeProber":
        self._thread.start()
        return self

    def watch(self, info: NodeInfo) -> None:
        self._commands.put(("watch", info))

    def unwatch(self, node_id: str) -> None:
        self._commands.put(("unwatch", node_id))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.term()

    # -- prober thread -----------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                self._apply_commands(poller)
                for sock, _ in poller.poll(100):
                    self._on_event(sock)
                self._check_deadlines()
        finally:
            for node_id in list(self._probes):
                self._close(node_id, poller)

    def _apply_commands(self, poller: zmq.Poller) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "unwatch":
                self._close(arg, poller)
                continue
            old = self._probes.get(arg.node_id)
            if old is not None and (old.info.addr, old.info.started_at) == (arg.addr, arg.started_at):
                old.info = arg
                continue
            self._close(arg.node_id, poller)
            probe = self._probes[arg.node_id] = self._open(arg)
            poller.register(probe.monitor, zmq.POLLIN)

    def _open(self, info: NodeInfo) -> _Probe:
        sock = self._ctx.socket(zmq.PUSH)
        sock.linger = 0
        sock.setsockopt(zmq.HEARTBEAT_IVL, self.heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.heartbeat_timeout_ms)
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.heartbeat_timeout_ms)   # a frozen peer accepts TCP, never greets
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        keys = self.auth.keys
        if keys is not None:   # the cluster's CURVE keys, as ClusterAuth.dial sets them (its monitor is ours)
            sock.curve_serverkey, sock.curve_publickey = keys.server_public, keys.client_public
            sock.curve_secretkey = keys.client_secret
        addr = f"inproc://pdserve-liveness-{os.getpid()}-{next(_ids)}"
        sock.monitor(addr, _EVENTS)
        monitor = self._ctx.socket(zmq.PAIR)
        monitor.linger = 0
        monitor.connect(addr)
        sock.connect(info.addr)
        return _Probe(info, sock, monitor)

    def _close(self, node_id: str, poller: zmq.Poller) -> None:
        probe = self._probes.pop(node_id, None)
        if probe is None:
            return
        poller.unregister(probe.monitor)
        probe.sock.disable_monitor()
        probe.sock.close(linger=0)
        probe.monitor.close(linger=0)

    def _on_event(self, monitor: zmq.Socket) -> None:
        probe = next((p for p in self._probes.values() if p.monitor is monitor), None)
        event = recv_monitor_message(monitor)
        if probe is None:
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            probe.is_up = probe.was_up = True
            if probe.is_reported:
                log.info("liveness: %s reachable again", probe.info.node_id)
                probe.is_reported = False
        elif event["event"] == zmq.EVENT_DISCONNECTED and probe.is_up:
            probe.is_up, probe.down_since = False, time.monotonic()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for node_id, probe in list(self._probes.items()):
            if probe.is_up or probe.is_reported:
                continue
            limit = self.grace_s if probe.was_up else self.connect_timeout_s
            if now - probe.down_since < limit:
                continue
            probe.is_reported = True
            reason = (f"its connection at {probe.info.addr} dropped and was not back within {limit:g} s"
                      if probe.was_up else f"unreachable at {probe.info.addr} for {limit:g} s")
            try:
                self.on_dead(node_id, reason)
            except Exception:   # a failing callback must not stop the prober that watches every node
                log.exception("liveness: on_dead failed for %s", node_id)


def attach(router) -> NodeProber | None:
    """Probe every node in ``router``'s registry view (joins and leaves followed); dead ones are evicted."""
    view = router.view
    if view is None:
        return None
    prober = NodeProber(router.client.auth, on_dead=view.evict).start()

    def follow(event: str, info: NodeInfo) -> None:
        if event == "added":
            prober.watch(info)
        else:
            prober.unwatch(info.node_id)

    view.add_listener(follow)
    for info in [*view.nodes().values(), *view.draining_nodes().values()]:   # those that joined before
        prober.watch(info)
    return prober
