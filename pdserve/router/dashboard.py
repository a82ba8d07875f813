"""The live cluster page (``/dashboard``) and what it shows: the router's recent measurements.

``LiveStats`` keeps the last ``--slo-window-s`` seconds of per-request samples (arrivals, TTFT,
ITL with the decode node's batch at the time, output lengths, KV transfers); the Prometheus
histograms in metrics.py are cumulative and cannot say "the last minute". The same window feeds
the SLO planner and admission control (pdserve/planner.py).

``/dashboard`` is one self-contained HTML file (static/dashboard.html: no CDN, no network) whose
script polls ``/dashboard/data`` every second. With ``--api-key``, the page takes the key from its
URL fragment (``/dashboard#key=KEY``; a fragment never reaches a server or its logs) and sends it
as a bearer token; ``/dashboard/data`` is guarded like ``/nodes``.
"""

from __future__ import annotations

import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry, Counter

from pdserve.planner import SLO, Verdict, WindowStats, admit, parse_slo, percentile, plan
from pdserve.router.pairing import is_usable, load_score

if TYPE_CHECKING:
    from pdserve.router.core import Router

MAX_SAMPLES = 2000        # per series in /dashboard/data (the newest)


class LiveStats:
    """Samples of the last ``window_s`` seconds (monotonic clock), pruned as new ones arrive."""

    def __init__(self, window_s: float, registry: CollectorRegistry | None = None) -> None:
        self.window_s = window_s
        self.started = time.monotonic()
        self.arrivals: deque[tuple[float, int]] = deque(maxlen=100_000)     # (t, prompt tokens)
        self.ttft: deque[tuple[float, float]] = deque(maxlen=20_000)        # (t, seconds)
        self.itl: deque[tuple[float, int, float]] = deque(maxlen=50_000)    # (t, decode batch, seconds)
        self.outputs: deque[tuple[float, int]] = deque(maxlen=100_000)      # (t, output tokens)
        self.transfers: deque[tuple[float, str, int, float]] = deque(maxlen=5_000)  # (t, prefill node, bytes, ms)
        self.path_counts: dict[str, int] = {}
        self.num_shed = 0
        self.dispatch = Counter("pdserve_router_dispatch", "Choices by path: disagg (prefill node, KV transfer), "
                                "direct (a decode node prefills itself) or colocated, and why.", ["path", "reason"],
                                registry=registry)
        self.shed = Counter("pdserve_router_shed", "Requests refused with 429 by --admission-control.",
                            registry=registry)

    # -- recording (event loop thread) ---------------------------------------------------------
    def on_arrival(self, prompt_tokens: int) -> None:
        self.arrivals.append((time.monotonic(), prompt_tokens))

    def on_ttft(self, seconds: float) -> None:
        self.ttft.append((time.monotonic(), seconds))

    def on_itl(self, seconds: float, batch: int) -> None:
        self.itl.append((time.monotonic(), batch, seconds))

    def on_output(self, num_tokens: int) -> None:
        self.outputs.append((time.monotonic(), num_tokens))

    def on_transfer(self, prefill_node: str, kv_bytes: int, ms: float) -> None:
        self.transfers.append((time.monotonic(), prefill_node, kv_bytes, ms))

    def on_dispatch(self, path: str, reason: str) -> None:
        self.dispatch.labels(path, reason).inc()
        self.path_counts[path] = self.path_counts.get(path, 0) + 1

    def on_shed(self) -> None:
        self.shed.inc()
        self.num_shed += 1

    # -- reading ------------------------------------------------------------------------------
    def _recent(self, series: deque) -> list:
        cutoff = time.monotonic() - self.window_s
        while series and series[0][0] < cutoff:
            series.popleft()
        return list(series)

    def window(self, prefill_nodes: int, decode_nodes: int) -> WindowStats:
        span = max(1e-3, min(self.window_s, time.monotonic() - self.started))
        arrivals, outputs = self._recent(self.arrivals), self._recent(self.outputs)
        return WindowStats(
            window_s=self.window_s, request_rate=len(arrivals) / span,
            mean_prompt_tokens=sum(n for _, n in arrivals) / len(arrivals) if arrivals else 0.0,
            mean_output_tokens=sum(n for _, n in outputs) / len(outputs) if outputs else 0.0,
            ttft_samples=[s for _, s in self._recent(self.ttft)[-MAX_SAMPLES:]],
            itl_samples=[[float(b), s] for _, b, s in self._recent(self.itl)[-MAX_SAMPLES:]],
            prefill_nodes=prefill_nodes, decode_nodes=decode_nodes)

    def transfer_summary(self) -> dict:
        recent = self._recent(self.transfers)
        timed = [(b, ms) for _, _, b, ms in recent if ms > 0]
        total_bytes = sum(b for _, _, b, _ in recent)
        return {"count": len(recent), "kv_bytes": total_bytes,
                "gbps_mean": (sum(b for b, _ in timed) / (sum(ms for _, ms in timed) / 1e3) / 1e9) if timed else None,
                "ms_p50": percentile([ms for _, ms in timed], 0.5) if timed else None,
                "recent": [{"prefill_node": n, "kv_bytes": b, "ms": round(ms, 3)} for _, n, b, ms in recent[-8:]]}


def pool_counts(router: "Router") -> tuple[int, int]:
    """(prefill nodes, nodes that decode: decode + colocated) serving generation."""
    nodes = [n for n in router.nodes().values() if not n.is_embedding]
    return (sum(1 for n in nodes if n.role == "prefill"), sum(1 for n in nodes if n.role in ("decode", "colocated")))


def router_slo(router: "Router") -> SLO | None:
    text = router.config.dispatch.slo
    return parse_slo(text) if text else None


def admission(router: "Router") -> Verdict:
    """--admission-control: may one more request come in without breaking the --slo (planner.admit)?"""
    nodes, loads, inflight = router.nodes(), router.loads(), router.inflight()
    usable = [n for n in nodes.values() if is_usable(n) and not n.is_embedding]
    prefill = [load_score(n.node_id, loads, inflight)[0] for n in usable if n.role == "prefill"]
    decode = [load_score(n.node_id, loads, inflight)[0] for n in usable if n.role in ("decode", "colocated")]
    prefill_nodes, decode_nodes = pool_counts(router)
    return admit(router.live.window(prefill_nodes, decode_nodes), router_slo(router),
                 min(prefill) if prefill else None, min(decode) if decode else 0)


def _latency(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None}
    return {"count": len(values), **{f"p{q}": round(percentile(values, q / 100), 5) for q in (50, 90, 99)}}


def _node_rows(router: "Router") -> list[dict]:
    loads, inflight, now = router.loads(), router.inflight(), time.time()
    rows = []
    for node_id, info in sorted(router.nodes().items()):
        load = loads.get(node_id)
        used = (1 - load.free_pages / load.total_pages) if load is not None and load.total_pages else None
        rows.append({"node_id": node_id, "role": info.role, "addr": info.addr, "tp": info.tp, "dp": info.dp,
                     "waiting": load.waiting if load else None, "running": load.running if load else None,
                     "free_pages": load.free_pages if load else None, "total_pages": load.total_pages if load else None,
                     "kv_usage": round(used, 4) if used is not None else None,
                     "report_age_s": round(now - load.timestamp, 2) if load else None,
                     "router_inflight": inflight.get(node_id, 0)})
    return rows


def _pools(rows: list[dict]) -> dict:
    pools = {}
    for role in ("prefill", "decode", "colocated"):
        members = [r for r in rows if r["role"] == role]
        total = sum(r["total_pages"] or 0 for r in members)
        free = sum(r["free_pages"] or 0 for r in members)
        pools[role] = {"nodes": len(members), "waiting": sum(r["waiting"] or 0 for r in members),
                       "running": sum(r["running"] or 0 for r in members),
                       "kv_usage": round(1 - free / total, 4) if total else None}
    return pools


def dashboard_data(router: "Router") -> dict:
    live = router.live
    rows = _node_rows(router)
    prefill_nodes, decode_nodes = pool_counts(router)
    window = live.window(prefill_nodes, decode_nodes)
    slo = router_slo(router)
    itl_values = [s for _, s in window.itl_samples]
    return {"time": time.time(), "model": router.served_model_name, "policy": router.config.policy,
            "registry_connected": router.view is not None and router.view.is_connected,
            "pools": _pools(rows), "nodes": rows,
            "latency": {"ttft": _latency(window.ttft_samples), "itl": _latency(itl_values)},
            "transfers": live.transfer_summary(), "paths": dict(live.path_counts),
            "slo": None if slo is None else {"ttft": slo.ttft_s, "tpot": slo.tpot_s},
            "plan": None if slo is None else msgspec.to_builtins(plan(window, slo)),
            "admission_control": router.config.dispatch.admission_control, "shed": live.num_shed,
            "window": msgspec.to_builtins(window)}


def add_dashboard_routes(app: FastAPI, router: "Router") -> None:
    page = resources.files("pdserve.router").joinpath("static/dashboard.html").read_text(encoding="utf-8")

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/data")
    async def data(request: Request) -> JSONResponse:
        from pdserve.router.app import check_api_key
        check_api_key(router, request)
        return JSONResponse(dashboard_data(router), headers={"Cache-Control": "no-store"})
