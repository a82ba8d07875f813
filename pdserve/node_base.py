"""What every node process shares: CLI, sockets, registry record, the serve loop.

A node binds a ZMQ PULL socket for ``pdserve.protocol.NodeMessage``s, answers each router on a
PUSH socket to the request's ``reply_to``, registers its ``NodeInfo`` (and load) in Redis when
``--registry-url`` is given, and otherwise prints one ``READY {json}`` line on stdout so a
launcher or test can find it. Subclasses implement ``handle`` (one message) and ``tick`` (one
unit of engine work; True while there is more).

SIGTERM drains: the registry record is rewritten with ``draining`` set (routers send no new work;
they keep the node listed, so the requests it holds are not ended as if it had died), the loop
serves on until nothing is in flight or ``--drain-timeout-s`` has passed, then the node deregisters
and exits; a router re-dispatches what was left unfinished before its first token (the node's
leaving ends those attempts). A second SIGTERM, or ``--drain-timeout-s 0``, stops at once.
Each node also serves Prometheus ``/metrics`` (``pdserve.node_metrics``, ``--metrics-port``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

import msgspec
import zmq

from pdserve.config import ServerConfig, add_config_args, config_from_args
from pdserve.protocol import (EmbedOut, EmbedReq, GenerateReq, LoadReport, NodeInfo, NodeMessage, NodeStats, StatsReq,
                              TokenOut, decode_node_message, encode)
from pdserve.node_metrics import NodeMetrics
from pdserve.runtime.embedding import Embedder
from pdserve.runtime.kv_manager import KVManager
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.watchdog import Watchdog, warm_up
from pdserve.security import ClusterAuth, install

log = logging.getLogger(__name__)

IDLE_POLL_MS = 5
MIN_DRAIN_S = 0.5   # served on after marking the record draining, for requests sent before routers saw it


class NodeBase:
    role = "colocated"

    def __init__(self, cfg: ServerConfig, runner: ModelRunner | None = None) -> None:
        self.cfg = cfg
        self.runner = runner or ModelRunner(cfg.engine, role=cfg.role)
        model = cfg.engine.model
        self.embedder = (Embedder(self.runner, model.embedding_pooling, cfg.engine.scheduler.max_prefill_tokens)
                         if model.is_embedding else None)
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.auth = ClusterAuth(cfg.security.cluster_secret)   # CURVE on every socket (pdserve/security.py)
        install(self.auth)                                      # ... the bootstrap channel's too
        self.auth.serve(self.pull, f"the request socket of this {self.role} node")
        host = cfg.node.host
        if cfg.node.port:
            self.pull.bind(f"tcp://{host}:{cfg.node.port}")
            port = cfg.node.port
        else:
            port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.addr = f"tcp://{host}:{port}"
        self.node_id = cfg.node.node_id or f"{self.role}-{host}-{port}"
        self._push: dict[str, zmq.Socket] = {}
        self._running = True
        self._drain_deadline: float | None = None   # set by SIGTERM: drain until then
        self._drain_started: float | None = None
        self.started_at = time.time()
        self.node_metrics = NodeMetrics(self)
        self.metrics_url: str | None = None

    # -- to be provided by each role ---------------------------------------------------------
    def handle(self, msg: NodeMessage) -> None:
        raise NotImplementedError

    def tick(self) -> bool:
        raise NotImplementedError

    kv: KVManager  # set by each role: the page tables of its engine

    def load(self) -> dict:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Engine counters beyond ``load()`` (NodeStats.metrics); none by default."""
        return {}

    def bootstrap_endpoint(self) -> str | None:
        return None

    def cached_pages(self) -> int:
        """Pages held only by the prefix cache (free pages + these = an idle node's whole pool)."""
        cache = self.kv.cache
        return cache.num_pages if cache is not None else 0

    # -- shared -------------------------------------------------------------------------------
    def send(self, reply_to: str, msg: msgspec.Struct) -> None:
        sock = self._push.get(reply_to)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 0)
            self.auth.dial(sock, "a reply socket")
            sock.connect(reply_to)
            self._push[reply_to] = sock
        sock.send(encode(msg))

    def node_info(self) -> NodeInfo:
        r = self.runner
        return NodeInfo(node_id=self.node_id, role=self.role, addr=self.addr, bootstrap=self.bootstrap_endpoint(),
                        model=r.loaded.tokenizer.name if r.loaded.tokenizer is not None else self.cfg.engine.model.model_path,
                        fingerprint=r.fingerprint, dtype=r.layout.dtype, page_size=r.layout.page_size,
                        context_length=r.context_length, vocab_size=r.vocab_size, tp=self.cfg.engine.parallel.tp,
                        dp=self.cfg.engine.parallel.dp, max_total_tokens=r.pool.capacity_tokens,
                        started_at=self.started_at, is_embedding=self.embedder is not None,
                        metrics_url=self.metrics_url, ttl_s=self.cfg.node.registry_ttl_s)

    def load_report(self) -> LoadReport:
        return LoadReport(node_id=self.node_id, timestamp=time.time(), **self.load())

    def _drain(self, timeout_ms: int) -> None:
        if not self.pull.poll(timeout_ms):
            return
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_node_message(data)
            except msgspec.DecodeError as exc:
                log.warning("dropping undecodable message: %s", exc)
                continue
            if isinstance(msg, StatsReq):
                self.send(msg.reply_to, NodeStats(node_id=self.node_id, role=self.role,
                                                  cached_pages=self.cached_pages(), metrics=self.metrics(),
                                                  **self.load()))
            elif isinstance(msg, EmbedReq) or (self.embedder is not None and isinstance(msg, GenerateReq)):
                self._embed_or_refuse(msg)
            else:
                self.handle(msg)

    def _embed_or_refuse(self, msg: EmbedReq | GenerateReq) -> None:
        """Embeddings on an --is-embedding node; generation there (or embeddings elsewhere) is a 400."""
        if isinstance(msg, GenerateReq):
            self.send(msg.reply_to, TokenOut(rid=msg.rid, token_ids=[], finish_reason="error", error_code=400,
                                             error="this node serves embeddings only (--is-embedding)"))
        elif self.embedder is None:
            self.send(msg.reply_to, EmbedOut(rid=msg.rid, error_code=400,
                                             error="this node does not serve embeddings (start it with --is-embedding)"))
        else:
            self.send(msg.reply_to, self.embedder.handle(msg, self.kv))

    def serve_forever(self) -> None:
        serving = self.cfg.engine.serving
        if not serving.skip_server_warmup:
            warm_up(self.runner, self.kv)
            if self.runner.sampler.grammar is not None:
                self.runner.sampler.grammar.warm()   # structured output's library, in the background
        self.metrics_url = self.node_metrics.serve(self.cfg.node.host, self.cfg.node.metrics_port)
        registrar = self._start_registrar()
        watchdog = Watchdog(serving.watchdog_timeout, on_stuck=lambda _: registrar and registrar.stop()).start()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        info = self.node_info()
        print("READY " + json.dumps(msgspec.to_builtins(info)), flush=True)
        busy, steps_since_drain = False, 0
        steps_per_drain = self.cfg.engine.scheduler.num_continuous_decode_steps
        try:
            while self._running:
                if not busy or steps_since_drain >= steps_per_drain:  # --num-continuous-decode-steps
                    self._drain(0 if busy else IDLE_POLL_MS)
                    steps_since_drain = 0
                self.runner.check_ranks()   # a dead TP rank stops the node (RankLost), idle or not
                with watchdog.step():
                    busy = self.tick()
                steps_since_drain += 1
                if self._drain_deadline is not None and self._is_drained(registrar):
                    break
        except KeyboardInterrupt:
            pass
        finally:
            watchdog.stop()
            if registrar is not None:
                registrar.stop()
            self.close()

    def _start_registrar(self):
        if not self.cfg.node.registry_url:
            return None
        from pdserve.registry import NodeRegistrar
        registrar = NodeRegistrar(self.cfg.node.registry_url, self.node_info(), ttl_s=self.cfg.node.registry_ttl_s,
                                  interval_s=self.cfg.node.load_report_interval_s, load_fn=self.load_report)
        registrar.start()
        return registrar

    def stop(self) -> None:
        self._running = False

    def _on_sigterm(self, *_) -> None:
        if self._drain_deadline is not None or self.cfg.node.drain_timeout_s == 0:
            self.stop()   # a second SIGTERM, or no draining asked for
        else:
            self._drain_deadline = time.monotonic() + self.cfg.node.drain_timeout_s

    def num_in_flight(self) -> int:
        load = self.load()
        return load["waiting"] + load["running"]

    def _is_drained(self, registrar) -> bool:
        """One loop turn of draining: True once nothing is in flight (or the time is up)."""
        now = time.monotonic()
        if self._drain_started is None:
            self._drain_started = now
            log.info("SIGTERM: draining %d request(s), at most %g s", self.num_in_flight(),
                     self.cfg.node.drain_timeout_s)
            if registrar is not None:
                registrar.mark_draining()
        if now - self._drain_started < MIN_DRAIN_S:
            return False
        left = self.num_in_flight()
        if left and now < self._drain_deadline:
            return False
        if left:
            log.warning("drain timeout: leaving with %d request(s) unfinished (routers retry those not started)", left)
        else:
            log.info("drained in %.2f s", now - self._drain_started)
        return True

    def close(self) -> None:
        for sock in self._push.values():
            sock.close(linger=200)
        self.pull.close(linger=0)
        self.node_metrics.close()
        self.runner.close()   # a TP node's other ranks


def run_node(node_cls: type[NodeBase], role: str, argv: list[str]) -> int:
    """Parse the node CLI (generated from ServerConfig), build the node, serve until stopped."""
    parser = argparse.ArgumentParser(prog=f"pdserve {'serve' if role == 'colocated' else role}",
                                     description=f"Run a {role} node.")
    add_config_args(parser, ServerConfig)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    values = {k: v for k, v in vars(args).items() if k != "log_level"}
    try:
        cfg = config_from_args(ServerConfig, values, role=role)
    except ValueError as exc:
        parser.exit(2, f"pdserve: error: {exc}\n")
    try:
        node = node_cls(cfg)
    except ValueError as exc:  # bad model path, corrupt weights, pool too small ...
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    node.serve_forever()
    return 0
