"""Loopback nodes: the real wire protocol and the real registry, a token script instead of a model.

A ``ScriptNode`` binds a real ZMQ PULL socket, registers a real ``NodeInfo`` through
``NodeRegistrar`` and answers ``GenerateReq`` / ``PrefillReq`` / ``AbortReq`` exactly as the
protocol says, but its "model" replays ``reply_ids``. Two uses: measuring the router alone (its
added latency and request rate, with nodes that cost nothing; see ``overhead_bench``), and tests
that inject the faults the router must survive (a prefill that fails, hangs or dies; a decode
node that dies mid-stream) in milliseconds. The PD handshake between a loopback prefill and
decode node is a shared in-process ``TransferBoard`` (the real one is the NIXL bootstrap), so
both must live in one process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import zmq

from pdserve.protocol import (AbortReq, GenerateReq, LoadReport, NodeInfo, PrefillReq, PrefillStatus, TokenLogprob,
                              TokenOut, decode_node_message, encode)
from pdserve.registry import NodeRegistrar


class TransferBoard:
    """transfer_id -> prefill done (shared by the scripted prefill and decode nodes of one test)."""

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def complete(self, transfer_id: str) -> None:
        with self._lock:
            self._done.add(transfer_id)

    def is_done(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._done


@dataclass
class _Gen:
    req: GenerateReq
    tokens: list[int]
    num_sent: int = 0
    next_at: float = 0.0


@dataclass
class ScriptNode:
    redis_url: str
    node_id: str
    role: str                                  # prefill | decode | colocated
    reply_ids: list[int] = field(default_factory=list)
    eos_id: int = 2
    board: TransferBoard | None = None
    token_delay_s: float = 0.0
    prefill_mode: str = "ok"                   # ok | fail | hang
    fingerprint: str = "fp-a"
    page_size: int = 16
    context_length: int = 2048
    vocab_size: int = 49152
    total_pages: int = 128
    ttl_s: float = 1.0

    def __post_init__(self) -> None:
        self.received: list = []
        self.active: dict[str, _Gen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        port = self._pull.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self._push: dict[str, zmq.Socket] = {}
        self.info = NodeInfo(node_id=self.node_id, role=self.role, addr=self.addr, bootstrap=f"script://{self.node_id}",
                             model="script", fingerprint=self.fingerprint, dtype="float32", page_size=self.page_size,
                             context_length=self.context_length, vocab_size=self.vocab_size,
                             max_total_tokens=self.total_pages * self.page_size, started_at=time.time())
        self.registrar = NodeRegistrar(self.redis_url, self.info, ttl_s=self.ttl_s, interval_s=0.1,
                                       load_fn=self._load)
        self._thread = threading.Thread(target=self._loop, name=f"script-{self.node_id}", daemon=True)

    def start(self) -> "ScriptNode":
        self._thread.start()
        self.registrar.start()
        self.registrar.wait_registered(2.0)
        return self

    def stop(self) -> None:
        """Graceful: deregister, stop."""
        self.registrar.stop(deregister=True)
        self._shutdown()

    def kill(self) -> None:
        """A crash: stop answering and heartbeating; the registry record expires after ttl_s."""
        self.registrar.stop(deregister=False)
        self._shutdown()

    def messages(self, cls) -> list:
        with self._lock:
            return [m for m in self.received if isinstance(m, cls)]

    def _shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in self._push.values():
            sock.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()

    def _load(self):
        with self._lock:
            n = len(self.active)
        return LoadReport(node_id=self.node_id, waiting=0, running=n, free_pages=self.total_pages - n,
                          total_pages=self.total_pages, timestamp=time.time())

    def _send(self, reply_to: str, msg) -> None:
        sock = self._push.get(reply_to)
        if sock is None:
            sock = self._push[reply_to] = self._ctx.socket(zmq.PUSH)
            sock.connect(reply_to)
        sock.send(encode(msg))

    def _loop(self) -> None:
        while not self._stop.is_set():
            is_busy = bool(self.active) and self.token_delay_s == 0
            if self._pull.poll(0 if is_busy else 2):
                while True:
                    try:
                        msg = decode_node_message(self._pull.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    with self._lock:
                        self.received.append(msg)
                    self._handle(msg)
            self._step()

    def _handle(self, msg) -> None:
        if isinstance(msg, AbortReq):
            with self._lock:
                self.active.pop(msg.rid, None)
        elif isinstance(msg, PrefillReq):
            if self.prefill_mode == "ok":
                if self.board is not None:
                    self.board.complete(msg.transfer_id)
                self._send(msg.reply_to, PrefillStatus(rid=msg.rid, transfer_id=msg.transfer_id, ok=True,
                                                       kv_bytes=len(msg.input_ids) * 1000, transfer_ms=2.0))
            elif self.prefill_mode == "fail":
                self._send(msg.reply_to, PrefillStatus(rid=msg.rid, transfer_id=msg.transfer_id, ok=False,
                                                       error="injected prefill failure"))
        elif isinstance(msg, GenerateReq):
            with self._lock:
                self.active[msg.rid] = _Gen(msg, self._script(msg))

    def _script(self, req: GenerateReq) -> list[int]:
        s = req.sampling
        body = [t for t in self.reply_ids if t != self.eos_id] or [42]
        if s.ignore_eos:
            tokens = (body * (s.max_new_tokens // len(body) + 1))[:s.max_new_tokens]
        else:
            tokens = (self.reply_ids + [self.eos_id])[:s.max_new_tokens]
        for i, t in enumerate(tokens):
            if t in s.stop_token_ids:
                return tokens[:i + 1]
        return tokens

    def _step(self) -> None:
        now = time.monotonic()
        with self._lock:
            gens = list(self.active.values())
        for gen in gens:
            req = gen.req
            if req.transfer_id is not None and self.board is not None and not self.board.is_done(req.transfer_id):
                continue   # without a board (nodes in separate processes) the prefill counts as instant
            if now < gen.next_at:
                continue
            gen.next_at = now + self.token_delay_s
            self._emit(gen)

    def _emit(self, gen: _Gen) -> None:
        req, s = gen.req, gen.req.sampling
        tid = gen.tokens[gen.num_sent]
        gen.num_sent += 1
        finish = matched = None
        if gen.num_sent == len(gen.tokens):
            if tid in s.stop_token_ids or (tid == self.eos_id and not s.ignore_eos):
                finish, matched = "stop", tid
            else:
                finish = "length"
        out = TokenOut(rid=req.rid, token_ids=[tid], finish_reason=finish, matched_stop=matched,
                       prompt_tokens=len(req.input_ids) if gen.num_sent == 1 else 0)
        if s.logprobs:
            out.logprobs = [-0.25]
            out.top_logprobs = [[TokenLogprob(tid, -0.25), TokenLogprob(tid + 1, -2.0)][:s.top_logprobs]]
        if finish is not None:
            with self._lock:
                self.active.pop(req.rid, None)
        self._send(req.reply_to, out)


def main(argv: list[str] | None = None) -> int:
    """``python -m pdserve.router.loopback --registry-url URL --role decode --count 2``: loopback nodes
    in this process until SIGTERM (for router benchmarks; no handshake board across processes)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m pdserve.router.loopback")
    parser.add_argument("--registry-url", required=True)
    parser.add_argument("--role", choices=["prefill", "decode", "colocated"], required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--reply-ids", default="504,3575,282,4649,314,7042,30", help="Comma-separated token ids.")
    parser.add_argument("--eos-id", type=int, default=2)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--name-prefix", default="loop")
    args = parser.parse_args(argv)
    reply = [int(t) for t in args.reply_ids.split(",") if t]
    nodes = [ScriptNode(args.registry_url, f"{args.name_prefix}-{args.role}-{i}", args.role, reply, eos_id=args.eos_id,
                        token_delay_s=args.token_delay_s, ttl_s=3.0, total_pages=4096).start()
             for i in range(args.count)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    for node in nodes:
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
