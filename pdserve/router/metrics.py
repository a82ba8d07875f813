"""Prometheus metrics of the router (``/metrics``).

Request-side series are observed as requests run; node-side series (queue depth, free pages) are
read from the registry view's latest LoadReports at scrape time and vanish with the node. When a
node's reports stop reaching the router (Redis down, node stalled) its gauges are not exported once
its latest report is older than the node's record TTL; ``pdserve_node_report_age_seconds`` says how
old each node's latest report is. Each router app has its own
``CollectorRegistry`` (several apps can live in one process, as in the tests).
"""

from __future__ import annotations

from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from pdserve.protocol import LoadReport, NodeInfo, PrefillStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.5, 1.0, 2.5)
GBPS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _NodeCollector:
    def __init__(self, nodes: Callable[[], Mapping[str, NodeInfo]], loads: Callable[[], Mapping[str, LoadReport]],
                 load_ages: Callable[[], Mapping[str, float]] | None = None):
        self.nodes, self.loads, self.load_ages = nodes, loads, load_ages

    def collect(self):
        labels = ["node_id", "role"]
        waiting = GaugeMetricFamily("pdserve_node_queue_depth", "Requests waiting on the node.", labels=labels)
        running = GaugeMetricFamily("pdserve_node_running_requests", "Requests running on the node.", labels=labels)
        free = GaugeMetricFamily("pdserve_node_free_pages", "Free KV pages on the node.", labels=labels)
        total = GaugeMetricFamily("pdserve_node_total_pages", "KV pages on the node.", labels=labels)
        age = GaugeMetricFamily("pdserve_node_report_age_seconds", "Seconds since the node's latest load "
                                "report reached this router.", labels=labels)
        nodes, loads = self.nodes(), self.loads()
        ages = self.load_ages() if self.load_ages is not None else {}
        for node_id, report in loads.items():
            info = nodes.get(node_id)
            if info is None:
                continue
            key = [node_id, info.role]
            if node_id in ages:
                age.add_metric(key, ages[node_id])
                if ages[node_id] > info.ttl_s:
                    continue   # stale: better no gauge than a frozen one
            waiting.add_metric(key, report.waiting)
            running.add_metric(key, report.running)
            free.add_metric(key, report.free_pages)
            total.add_metric(key, report.total_pages)
        up = GaugeMetricFamily("pdserve_nodes", "Nodes in the registry view, by role.", labels=["role"])
        for role in ("prefill", "decode", "colocated"):
            up.add_metric([role], sum(1 for n in nodes.values() if n.role == role))
        return [waiting, running, free, total, age, up]


class RouterMetrics:
    def __init__(self, nodes: Callable[[], Mapping[str, NodeInfo]], loads: Callable[[], Mapping[str, LoadReport]],
                 load_ages: Callable[[], Mapping[str, float]] | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdserve_router_requests", "Finished HTTP requests.", ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("pdserve_router_requests_in_flight", "Requests being served.", registry=r)
        self.ttft = Histogram("pdserve_router_ttft_seconds", "Time to first token (request arrival to first "
                              "token from a node).", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_router_itl_seconds", "Gap between consecutive token messages of a choice.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_router_e2e_seconds", "Request latency, arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdserve_router_prompt_tokens", "Prompt tokens of finished choices.", registry=r)
        self.completion_tokens = Counter("pdserve_router_completion_tokens", "Generated tokens.", registry=r)
        self.retries = Counter("pdserve_router_prefill_retries", "Attempts retried on another node.", ["reason"],
                               registry=r)
        self.transfer_rate = Histogram("pdserve_transfer_throughput", "KV transfer throughput per request in "
                                       "GB/s (from PrefillStatus).", buckets=GBPS_BUCKETS, registry=r)
        self.transfer_gbps = Gauge("pdserve_transfer_gbps", "GB/s of the latest KV transfer from each prefill "
                                   "node.", ["prefill_node"], registry=r)
        self.transfer_bytes = Counter("pdserve_transfer_kv_bytes", "KV bytes pushed prefill -> decode.",
                                      ["prefill_node"], registry=r)
        self.transfer_seconds = Histogram("pdserve_transfer_seconds", "KV transfer time per request.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        r.register(_NodeCollector(nodes, loads, load_ages))

    def observe_prefill(self, node_id: str, status: PrefillStatus) -> None:
        if not status.ok or status.kv_bytes <= 0:
            return
        self.transfer_bytes.labels(node_id).inc(status.kv_bytes)
        if status.transfer_ms > 0:
            self.transfer_seconds.observe(status.transfer_ms / 1e3)
            gbps = status.kv_bytes / (status.transfer_ms / 1e3) / 1e9
            self.transfer_rate.observe(gbps)
            self.transfer_gbps.labels(node_id).set(gbps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
