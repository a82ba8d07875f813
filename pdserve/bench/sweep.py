"""A sweep: every (request rate, max concurrency) point against one server, one run each.

Every point sends the same length mix with its own fresh prompt contents (no prefix-cache hits
carried over from the point before), on the same seeded arrival schedule for its rate; both
servers (``--compare``) get exactly the same prompts at each point. Per point it writes
``<output-dir>/<label>_rate-<r>_conc-<c>.json`` with the summary and every request's raw timeline,
and scrapes the server's ``/metrics`` before and after for the KV-transfer deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import msgspec
from tqdm import tqdm

from pdserve.bench import server_stats
from pdserve.bench.client import RequestResult, auth_headers, build_payload, endpoint_url
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import SLO, Summary, summarize
from pdserve.bench.runner import make_client, run_load

if TYPE_CHECKING:
    from pdserve.bench.cli import BenchConfig


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str
    model: str


@dataclass(frozen=True)
class SweepPoint:
    request_rate: float
    max_concurrency: int | None


class RunRecord(msgspec.Struct, kw_only=True):
    """What one point's JSON file holds."""
    target: str
    base_url: str
    model: str
    summary: Summary
    requests: list[RequestResult]


def sweep_points(rates: list[float], concurrencies: list[int | None]) -> list[SweepPoint]:
    """Rates (ascending, inf last) x concurrencies."""
    ordered = sorted(rates, key=lambda r: (math.isinf(r), r))
    return [SweepPoint(r, c) for c in concurrencies for r in ordered]


def _fmt(x: float | int | None) -> str:
    if x is None:
        return "none"
    if isinstance(x, float) and (math.isinf(x) or not x.is_integer()):
        return "inf" if math.isinf(x) else f"{x:g}"
    return str(int(x))


def run_file(out_dir: Path, label: str, point: SweepPoint) -> Path:
    return out_dir / f"{label}_rate-{_fmt(point.request_rate)}_conc-{_fmt(point.max_concurrency)}.json"


def load_run(path: str | Path) -> RunRecord:
    return msgspec.json.decode(Path(path).read_bytes(), type=RunRecord)


async def warmup(target: Target, requests: list[BenchRequest], cfg: "BenchConfig") -> int:
    """Send ``cfg.warmup_requests`` prompts all at once and discard them; returns how many failed."""
    if cfg.warmup_requests <= 0 or not requests:
        return 0
    reqs = [requests[i % len(requests)] for i in range(cfg.warmup_requests)]
    payloads = [build_payload(r, target.model, cfg.endpoint) for r in reqs]
    async with make_client(len(payloads), cfg.request_timeout_s) as client:
        results, _ = await run_load(client, endpoint_url(target.base_url, cfg.endpoint), payloads,
                                    [r.prompt_len for r in reqs], rate=math.inf,
                                    headers=auth_headers(cfg.api_key))
    return sum(not r.success for r in results)


async def run_point(target: Target, requests: list[BenchRequest], point: SweepPoint,
                    cfg: "BenchConfig", slo: SLO | None) -> RunRecord:
    payloads = [build_payload(r, target.model, cfg.endpoint) for r in requests]
    headers = auth_headers(cfg.api_key)
    max_conn = point.max_concurrency or max(1, len(payloads))
    desc = f"{target.label} rate={_fmt(point.request_rate)} conc={_fmt(point.max_concurrency)}"
    async with make_client(max_conn + 2, cfg.request_timeout_s) as client:
        before = await server_stats.fetch_metrics(client, target.base_url, headers)
        with tqdm(total=len(payloads), desc=desc, disable=cfg.disable_progress, leave=False) as bar:
            results, duration = await run_load(
                client, endpoint_url(target.base_url, cfg.endpoint), payloads,
                [r.prompt_len for r in requests], rate=point.request_rate, burstiness=cfg.burstiness,
                max_concurrency=point.max_concurrency, seed=cfg.seed, headers=headers, progress=bar)
        after = await server_stats.fetch_metrics(client, target.base_url, headers)
    summary = summarize(results, duration, label=target.label, request_rate=point.request_rate,
                        burstiness=cfg.burstiness, max_concurrency=point.max_concurrency, slo=slo)
    summary.server = server_stats.transfer_delta(before, after)
    return RunRecord(target=target.label, base_url=target.base_url, model=target.model,
                     summary=summary, requests=results)


async def run_sweep(target: Target, point_requests: list[list[BenchRequest]], points: list[SweepPoint],
                    cfg: "BenchConfig", slo: SLO | None,
                    on_summary: Callable[[Summary], None] | None = None) -> list[Summary]:
    """Run every point in order (``point_requests[i]`` for ``points[i]``), writing each point's JSON
    as soon as it finishes."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for point, requests in zip(points, point_requests, strict=True):
        record = await run_point(target, requests, point, cfg, slo)
        run_file(out_dir, target.label, point).write_bytes(msgspec.json.format(msgspec.json.encode(record)))
        summaries.append(record.summary)
        if on_summary is not None:
            on_summary(record.summary)
    return summaries
