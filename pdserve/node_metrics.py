"""A node's own Prometheus metrics, served over HTTP (``--metrics-port``; its URL is in the registry
record, ``NodeInfo.metrics_url``, and so in the router's ``/nodes``).

Read at scrape time from the node (the same ``load()`` its registry reports use): queue depth,
running requests, free / total / prefix-cached KV pages, KV usage, retractions. Observed as requests
move: prompt and prefix-cached tokens (the prefix-hit rate is their ratio), KV bytes pushed, transfer
time and GB/s (prefill nodes), and time to first token split into phases, each timed on the node
that sees it:

| node | phases of ``pdserve_node_ttft_phase_seconds{phase}`` |
|---|---|
| prefill | ``queue`` (arrival -> first chunk scheduled), ``prefill`` (-> first token sampled), ``transfer`` (-> KV and first token landed on the decode node) |
| decode | ``queue`` (arrival -> pages reserved), ``kv_wait`` (-> the prefill node's KV and first token arrived), ``first_decode`` (-> first token this node generated) |
| colocated (or a decode node serving a prompt itself) | ``prefill`` (arrival -> first token, queueing included) |

A request's phases are laps of one stopwatch: ``begin(rid, phase)`` starts it, ``lap(rid, phase,
then)`` observes the time since the last lap if ``phase`` is the one running (so a call repeated
every step counts once) and starts ``then``; ``end(rid)`` forgets the request.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from pdserve.node_base import NodeBase
    from pdserve.runtime.engine import RequestOutput

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                 3.0, 5.0, 10.0, 20.0, 40.0)
GBPS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_TRACKED = 100_000   # requests timed at once; beyond it the oldest stopwatch is dropped


class _NodeCollector:
    """Gauges read from the node at scrape time (the HTTP thread; ``load()`` only reads sizes)."""

    def __init__(self, node: "NodeBase") -> None:
        self.node = node

    def collect(self):
        node = self.node
        load = node.load()
        free, total, cached = load["free_pages"], load["total_pages"], node.cached_pages()
        gauges = [("pdserve_node_queue_depth", "Requests waiting (prefill: queued; decode: waiting for pages or KV).",
                   load["waiting"]),
                  ("pdserve_node_running_requests", "Requests running.", load["running"]),
                  ("pdserve_node_free_pages", "Free KV pages (prefix-cached pages not counted).", free),
                  ("pdserve_node_total_pages", "KV pages of the pool.", total),
                  ("pdserve_node_cached_pages", "KV pages held only by the prefix cache (reusable).", cached),
                  ("pdserve_node_kv_usage", "Fraction of KV pages held by requests.",
                   (total - free - cached) / total if total else 0.0)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        retractions = CounterMetricFamily("pdserve_node_retractions", "Requests retracted (pages ran out; "
                                          "recomputed later).")
        retractions.add_metric([], _retractions(node))
        yield retractions


def _retractions(node: "NodeBase") -> int:
    core = getattr(node, "core", None)   # colocated and decode nodes; a prefill node never retracts
    return sum(g.scheduler.num_retractions for g in core.groups) if core is not None else 0


class NodeMetrics:
    def __init__(self, node: "NodeBase") -> None:
        r = self.registry = CollectorRegistry()
        self.ttft_phase = Histogram("pdserve_node_ttft_phase_seconds", "Time to first token, by phase on this "
                                    "node (see pdserve/node_metrics.py).", ["phase"], buckets=PHASE_BUCKETS,
                                    registry=r)
        self.prompt_tokens = Counter("pdserve_node_prompt_tokens", "Prompt tokens prefilled here (cached ones "
                                     "included).", registry=r)
        self.cached_tokens = Counter("pdserve_node_prefix_cached_tokens", "Prompt tokens found in the prefix "
                                     "cache (hit rate = this / pdserve_node_prompt_tokens).", registry=r)
        self.transfer_bytes = Counter("pdserve_node_transfer_kv_bytes", "KV bytes pushed to decode nodes.",
                                      registry=r)
        self.transfer_seconds = Histogram("pdserve_node_transfer_seconds", "KV transfer time per request (NIXL "
                                          "busy time).", buckets=PHASE_BUCKETS, registry=r)
        self.transfer_gbps = Histogram("pdserve_node_transfer_gbps", "KV transfer throughput per request, GB/s.",
                                       buckets=GBPS_BUCKETS, registry=r)
        r.register(_NodeCollector(node))
        self._marks: dict[str, tuple[float, str]] = {}   # rid -> (lap start, phase running)
        self._server = None
        self.url: str | None = None

    # -- the stopwatch (node loop thread) -------------------------------------------------------
    def begin(self, rid: str, phase: str) -> None:
        if len(self._marks) >= MAX_TRACKED:
            self._marks.pop(next(iter(self._marks)))
        self._marks[rid] = (time.monotonic(), phase)

    def lap(self, rid: str, phase: str, then: str | None = None) -> None:
        mark = self._marks.get(rid)
        if mark is None or mark[1] != phase:
            return
        now = time.monotonic()
        self.ttft_phase.labels(phase).observe(now - mark[0])
        if then is None:
            del self._marks[rid]
        else:
            self._marks[rid] = (now, then)

    def end(self, rid: str) -> None:
        self._marks.pop(rid, None)

    def on_output(self, out: "RequestOutput") -> None:
        """An engine output: the first one of a request ends its ``first_decode`` (decode node) or
        ``prefill`` (colocated path) phase; the latter also counts the prompt's prefix hits."""
        mark = self._marks.get(out.rid)
        if mark is not None and out.token_ids:
            if mark[1] == "prefill":
                self.count_prompt(out.prompt_tokens, out.cached_tokens)
            self.lap(out.rid, mark[1])
        if out.finished:
            self.end(out.rid)

    def count_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)

    def on_transfer(self, kv_bytes: int, transfer_ms: float) -> None:
        if kv_bytes <= 0:
            return
        self.transfer_bytes.inc(kv_bytes)
        if transfer_ms > 0:
            self.transfer_seconds.observe(transfer_ms / 1e3)
            self.transfer_gbps.observe(kv_bytes / (transfer_ms / 1e3) / 1e9)

    # -- the HTTP server --------------------------------------------------------------------
    def serve(self, host: str, port: int) -> str | None:
        """Start ``/metrics`` on ``host:port`` (0: any free port; -1: none); its URL."""
        if port < 0:
            return None
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/metrics"
        log.info("metrics on %s", self.url)
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
