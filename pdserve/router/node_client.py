"""The router's ZMQ side: one PUSH socket per node, one PULL socket for every reply.

Nodes bind a PULL socket (``NodeInfo.addr``); the router connects a PUSH socket to each node it
talks to and binds one PULL socket of its own, whose address travels in every request's
``reply_to``. Replies (``TokenOut`` / ``PrefillStatus``) are decoded once and put on the asyncio
queue of the attempt whose ``rid`` they carry; replies for an attempt nobody waits for any more
(aborted, finished) are dropped.

With a cluster secret every socket is CURVE (``pdserve.security``). A node whose handshake fails
(another secret, or none) is held as refused for ``REFUSAL_HOLD_S``: sends to it raise
``NodeSendError`` at once and ``on_refused`` tells the router, which ends the attempts bound to it,
so a misconfigured node costs a retry, not a request timeout.

Sends are synchronous and non-blocking (ZMQ queues the message and returns), so an abort can be
sent from a ``finally`` block of a cancelled task, where awaiting is no longer possible.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from pdserve.protocol import NodeInfo, PrefillStatus, TokenOut, decode_router_message, encode
from pdserve.security import ClusterAuth

log = logging.getLogger(__name__)

REFUSAL_HOLD_S = 10.0


class NodeGone(msgspec.Struct):
    """Put on an attempt's queue when one of its nodes leaves the registry."""
    node_id: str
    role: str


Reply = TokenOut | PrefillStatus | NodeGone


class NodeSendError(Exception):
    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"could not send to node {node_id}: {reason}")
        self.node_id = node_id


def advertised_host(bind_host: str) -> str:
    """An address nodes can reach this router at when it binds ``bind_host``."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))   # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class NodeClient:
    def __init__(self, host: str = "127.0.0.1", cluster_secret: str | None = None) -> None:
        self.host = host
        self.auth = ClusterAuth(cluster_secret)   # CURVE on the reply socket and every node socket
        self._actx = zmq.asyncio.Context()
        self._ctx = zmq.Context()
        self._pull: zmq.asyncio.Socket | None = None
        self._push: dict[str, tuple[str, zmq.Socket]] = {}   # node_id -> (addr, socket)
        self._queues: dict[str, asyncio.Queue] = {}
        self._recv_task: asyncio.Task | None = None
        self.reply_to = ""
        self.num_dropped = 0
        self.refused: dict[str, tuple[str, float]] = {}        # node addr -> (why its handshake failed, when)
        self.on_refused: Callable[[str], None] | None = None   # node_id; called from a monitor thread

    async def start(self) -> None:
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self.auth.serve(self._pull, "the router's reply socket")
        bind = "*" if self.host in ("0.0.0.0", "::", "") else self.host
        port = self._pull.bind_to_random_port(f"tcp://{bind}")
        self.reply_to = f"tcp://{advertised_host(self.host)}:{port}"
        self._recv_task = asyncio.create_task(self._recv_loop(), name="node-client-recv")

    async def stop(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
            try:
                await self._recv_task
            except asyncio.CancelledError:
                pass
        for _, sock in self._push.values():
            sock.close(linger=0)
        self._push.clear()
        if self._pull is not None:
            self._pull.close(linger=0)
        self._ctx.term()
        self._actx.term()

    def open(self, rid: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        return queue

    def close(self, rid: str) -> None:
        self._queues.pop(rid, None)

    def post(self, rid: str, item: Reply) -> None:
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(item)

    def send(self, node: NodeInfo, msg: msgspec.Struct) -> None:
        """Queue ``msg`` for ``node`` without blocking; NodeSendError if ZMQ refuses it."""
        refusal = self.refused.get(node.addr)
        if refusal is not None and time.monotonic() - refusal[1] < REFUSAL_HOLD_S:
            raise NodeSendError(node.node_id, f"cluster auth: {refusal[0]}")
        entry = self._push.get(node.node_id)
        if entry is None or entry[0] != node.addr:
            if entry is not None:
                entry[1].close(linger=0)
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.LINGER, 0)
            self.auth.dial(sock, f"the router's socket to node {node.node_id}",
                           on_failure=functools.partial(self._on_handshake_failed, node.node_id))
            sock.connect(node.addr)
            entry = self._push[node.node_id] = (node.addr, sock)
        try:
            entry[1].send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise NodeSendError(node.node_id, str(exc)) from None

    def _on_handshake_failed(self, node_id: str, endpoint: str, reason: str) -> None:   # monitor thread
        self.refused[endpoint] = (reason, time.monotonic())
        if self.on_refused is not None:
            self.on_refused(node_id)

    def forget(self, node_id: str) -> None:
        """Close the socket of a node that left (undelivered messages are dropped)."""
        entry = self._push.pop(node_id, None)
        if entry is not None:
            entry[1].close(linger=0)

    async def _recv_loop(self) -> None:
        pull = self._pull
        while True:
            data = await pull.recv()
            try:
                msg = decode_router_message(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("node client: dropping undecodable reply (%s)", exc)
                continue
            queue = self._queues.get(msg.rid)
            if queue is None:
                self.num_dropped += 1
                continue
            queue.put_nowait(msg)
