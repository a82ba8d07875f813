"""One benchmark run: send prompts on an arrival schedule, at most N in flight, collect results.

Arrivals (as vLLM's ``get_request``): inter-arrival gaps are gamma(shape=burstiness,
scale=1/(rate*burstiness)) — burstiness 1 is a Poisson process, < 1 burstier, > 1 more even —
and the cumulative times are rescaled so the last arrival lands at num_prompts / rate, which
removes the 1-2% seed-to-seed drift of the realised rate. Rate inf sends everything at t=0.
``--max-concurrency`` caps requests in flight (a request that arrives while the cap is reached
waits for a slot; its TTFT clock starts when it is actually sent, as in vLLM).
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import nullcontext

import httpx
import numpy as np

from pdserve.bench.client import RequestResult, send_request


def arrival_offsets(num: int, rate: float, burstiness: float = 1.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Send times (s from the run start) of ``num`` requests.  # [num], non-decreasing"""
    if burstiness <= 0:
        raise ValueError(f"--burstiness: must be positive, got {burstiness}")
    if rate <= 0:
        raise ValueError(f"--request-rate: must be positive, got {rate}")
    if num == 0 or math.isinf(rate):
        return np.zeros(num)
    rng = rng if rng is not None else np.random.default_rng(0)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    times = np.cumsum(gaps)
    return times * ((num / rate) / times[-1])


def make_client(max_connections: int, timeout_s: float) -> httpx.AsyncClient:
    """One pooled HTTP client per run; read timeout bounds the wait between chunks."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    timeout = httpx.Timeout(connect=10.0, read=timeout_s, write=30.0, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def run_load(client: httpx.AsyncClient, url: str, payloads: list[dict], prompt_lens: list[int],
                   *, rate: float, burstiness: float = 1.0, max_concurrency: int | None = None,
                   seed: int = 0, headers: dict | None = None,
                   progress=None) -> tuple[list[RequestResult], float]:
    """Send ``payloads`` on the arrival schedule; returns (results in prompt order, duration s).

    Duration runs from the schedule's start to the last request's end (vLLM's benchmark
    duration), so throughputs include the drain of the last requests.
    """
    offsets = arrival_offsets(len(payloads), rate, burstiness, np.random.default_rng(seed))
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else nullcontext()
    results = [RequestResult(index=i, prompt_len=prompt_lens[i], max_tokens=int(p.get("max_tokens", 0)))
               for i, p in enumerate(payloads)]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        delay = t0 + float(offsets[i]) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots:
            await send_request(client, url, payloads[i], results[i], t0, headers)
        if progress is not None:
            progress.update(1)

    await asyncio.gather(*(one(i) for i in range(len(payloads))))
    return results, time.perf_counter() - t0
