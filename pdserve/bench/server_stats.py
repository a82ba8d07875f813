"""What the server says about itself: the router's ``/nodes`` JSON and Prometheus ``/metrics``.

Everything here fails soft: a server without these endpoints (another engine, the colocated
baseline) gives ``None`` / ``{}`` and the benchmark goes on.

KV-transfer figures are read from ``/metrics`` by name pattern, summed over labels, as deltas
between a scrape before and after each run:
- bytes moved:   a counter/histogram sum whose name has ``transfer`` and ``bytes``
  (e.g. ``pdserve_kv_transfer_bytes_total``);
- time spent:    ``transfer`` and ``seconds`` (``pdserve_kv_transfer_seconds_sum`` / ``_total``),
  with the histogram's ``_count`` as the number of transfers;
- per-transfer GB/s histogram: ``transfer`` ... ``throughput_sum`` / ``_count`` (mean over the run);
- bandwidth gauges: names with ``gbps`` / ``gb_per_s`` / ``bandwidth`` (last value, not a delta).
From these: busy bandwidth = bytes / transfer seconds, mean transfer ms = seconds / count.
The pdserve router exports ``pdserve_transfer_kv_bytes_total``, ``pdserve_transfer_seconds``,
``pdserve_transfer_throughput`` and ``pdserve_transfer_gbps``, which these patterns match.
"""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

_BYTES = re.compile(r"transfer.*bytes(_total|_sum)?$")
_SECONDS = re.compile(r"transfer.*seconds(_total|_sum)$")
_COUNT = re.compile(r"transfer.*seconds_count$|transfers_total$")
_RATE_SUM = re.compile(r"transfer.*throughput_sum$")      # histogram of per-transfer GB/s
_RATE_COUNT = re.compile(r"transfer.*throughput_count$")
_GAUGE = re.compile(r"gbps|gb_per_s|bandwidth")


async def fetch_json(client: httpx.AsyncClient, url: str, headers: dict | None = None):
    try:
        resp = await client.get(url, headers=headers, timeout=5.0)
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, OSError):
        return None


async def fetch_metrics(client: httpx.AsyncClient, base_url: str,
                        headers: dict | None = None) -> dict[str, float] | None:
    """Prometheus samples summed over labels: {sample name: value}; None when unavailable."""
    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics", headers=headers, timeout=5.0)
        if resp.status_code != 200:
            return None
        return parse_metrics(resp.text)
    except (httpx.HTTPError, OSError):
        return None


def parse_metrics(text: str) -> dict[str, float] | None:
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    continue
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    except ValueError:
        return None
    return out


def _sum_matching(samples: dict[str, float], pattern: re.Pattern) -> float:
    return sum(v for k, v in samples.items() if pattern.search(k))


def transfer_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """KV-transfer figures over one run (see the module docstring); {} when none are exported."""
    if not after:
        return {}
    before = before or {}
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict[str, float] = {}
    if any(_BYTES.search(k) for k in after):
        out["kv_transfer_gb"] = _sum_matching(delta, _BYTES) / 1e9
    seconds = _sum_matching(delta, _SECONDS)
    count = _sum_matching(delta, _COUNT)
    if seconds > 0:
        out["kv_transfer_busy_s"] = seconds
        if "kv_transfer_gb" in out:
            out["kv_transfer_gb_per_s"] = out["kv_transfer_gb"] / seconds
    if count > 0:
        out["kv_transfers"] = count
        if seconds > 0:
            out["kv_transfer_mean_ms"] = seconds / count * 1e3
    rate_count = _sum_matching(delta, _RATE_COUNT)
    if rate_count > 0:
        out["kv_transfer_mean_gb_per_s"] = _sum_matching(delta, _RATE_SUM) / rate_count
    for k, v in after.items():
        if _GAUGE.search(k) and not _BYTES.search(k):
            out[k] = v
    return out


def node_records(nodes_json) -> list[dict]:
    """Node records (dicts with a 'role') from whatever shape /nodes returns."""
    found: list[dict] = []

    def walk(obj, depth: int = 0) -> None:
        if depth > 4:
            return
        if isinstance(obj, dict):
            if isinstance(obj.get("role"), str):
                found.append(obj)
                return
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, depth + 1)

    walk(nodes_json)
    return found


def role_counts(nodes_json) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in node_records(nodes_json):
        counts[rec["role"]] = counts.get(rec["role"], 0) + 1
    return counts


def vocab_size(nodes_json) -> int | None:
    sizes = [int(r["vocab_size"]) for r in node_records(nodes_json) if r.get("vocab_size")]
    return min(sizes) if sizes else None


def chunk_size(nodes_json) -> int | None:
    """The prefill chunk size if the records carry it (``chunked_prefill_size``)."""
    sizes = [int(r["chunked_prefill_size"]) for r in node_records(nodes_json)
             if r.get("chunked_prefill_size")]
    return max(sizes) if sizes else None
