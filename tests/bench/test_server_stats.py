"""KV-transfer figures from Prometheus text (made by a real prometheus_client registry) and /nodes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.bench.server_stats import (chunk_size, node_records, parse_metrics, role_counts,
                                        transfer_delta, vocab_size)


def _registry():
    reg = CollectorRegistry()
    kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes pushed", ["peer"], registry=reg)
    kv_secs = Histogram("pdserve_kv_transfer_seconds", "KV transfer time", ["peer"], registry=reg)
    gauge = Gauge("pdserve_transfer_gbps", "latest KV bandwidth", ["prefill_node"], registry=reg)
    rate = Histogram("pdserve_transfer_throughput", "per-transfer GB/s", buckets=(1, 10, 100), registry=reg)
    Counter("pdserve_requests", "unrelated", registry=reg).inc(5)
    return reg, kv_bytes, kv_secs, gauge, rate


def test_transfer_delta_between_scrapes():
    reg, kv_bytes, kv_secs, gauge, rate = _registry()
    kv_bytes.labels("d0").inc(1e9)
    kv_secs.labels("d0").observe(0.5)
    before = parse_metrics(generate_latest(reg).decode())
    kv_bytes.labels("d0").inc(3e9)
    kv_bytes.labels("d1").inc(1e9)                 # summed over labels
    for _ in range(4):
        kv_secs.labels("d1").observe(0.025)
    gauge.labels("p0").set(38.5)
    rate.observe(30.0)
    rate.observe(50.0)
    after = parse_metrics(generate_latest(reg).decode())
    d = transfer_delta(before, after)
    assert d["kv_transfer_gb"] == pytest.approx(4.0)
    assert d["kv_transfer_busy_s"] == pytest.approx(0.1)
    assert d["kv_transfer_gb_per_s"] == pytest.approx(40.0)
    assert d["kv_transfers"] == 4
    assert d["kv_transfer_mean_ms"] == pytest.approx(25.0)
    assert d["kv_transfer_mean_gb_per_s"] == pytest.approx(40.0)
    assert d["pdserve_transfer_gbps"] == 38.5
    assert not any("requests" in k for k in d)


def test_fail_soft():
    assert transfer_delta(None, None) == {}
    assert transfer_delta({}, {"pdserve_requests_total": 3.0}) == {}
    assert parse_metrics("this is { not prometheus") is None


def test_node_records_any_shape():
    recs = [{"node_id": "p0", "role": "prefill", "vocab_size": 49152, "chunked_prefill_size": 256},
            {"node_id": "d0", "role": "decode", "vocab_size": 49152},
            {"node_id": "d1", "role": "decode", "vocab_size": 49152}]
    for shape in (recs, {"nodes": recs}, {r["node_id"]: {"info": r, "load": {"waiting": 0}} for r in recs}):
        assert len(node_records(shape)) == 3
        assert role_counts(shape) == {"prefill": 1, "decode": 2}
        assert vocab_size(shape) == 49152
        assert chunk_size(shape) == 256
    assert role_counts(None) == {} and vocab_size("oops") is None


def test_reads_the_router_transfer_metrics():
    """The name patterns match what the pdserve router exports (contract with pdserve.router.metrics)."""
    router_metrics = pytest.importorskip("pdserve.router.metrics", reason="router metrics not written yet")
    from pdserve.protocol import PrefillStatus

    m = router_metrics.RouterMetrics(lambda: {}, lambda: {})
    before = parse_metrics(m.render().decode())
    for _ in range(2):
        m.observe_prefill("p0", PrefillStatus(rid="r", transfer_id="t", ok=True, kv_bytes=2 * 10**8,
                                              transfer_ms=10.0))
    d = transfer_delta(before, parse_metrics(m.render().decode()))
    assert d["kv_transfer_gb"] == pytest.approx(0.4)
    assert d["kv_transfer_gb_per_s"] == pytest.approx(20.0)
    assert d["kv_transfer_mean_ms"] == pytest.approx(10.0)
    assert d["kv_transfer_mean_gb_per_s"] == pytest.approx(20.0)
