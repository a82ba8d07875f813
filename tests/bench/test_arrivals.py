"""Arrival process (Poisson / gamma burstiness, rescaled to the target rate) and the load runner."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from pdserve.bench.client import build_payload, endpoint_url
from pdserve.bench.datasets import random_requests
from pdserve.bench.runner import arrival_offsets, make_client, run_load


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_poisson_mean_rate_and_exponential_gaps():
    t = arrival_offsets(20000, rate=5.0, burstiness=1.0, rng=np.random.default_rng(0))
    assert np.all(np.diff(t) >= 0)
    assert t[-1] == pytest.approx(20000 / 5.0)               # rescaled: exactly the target rate
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.02)
    assert _cv(gaps) == pytest.approx(1.0, abs=0.05)          # exponential: std == mean
    # memoryless: P(gap > mean) = e^-1
    assert np.mean(gaps > 0.2) == pytest.approx(math.exp(-1), abs=0.02)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_sets_gap_variability(burstiness):
    t = arrival_offsets(20000, rate=10.0, burstiness=burstiness, rng=np.random.default_rng(1))
    assert t[-1] == pytest.approx(2000.0)
    # gamma(shape k): coefficient of variation 1/sqrt(k): 2.0 bursty, 0.5 even
    assert _cv(np.diff(t)) == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_infinite_rate_sends_all_at_once_and_seed_repeats():
    assert np.all(arrival_offsets(7, math.inf) == 0)
    a = arrival_offsets(50, 3.0, rng=np.random.default_rng(5))
    b = arrival_offsets(50, 3.0, rng=np.random.default_rng(5))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="--burstiness"):
        arrival_offsets(3, 1.0, burstiness=0)


def _payloads(server, n: int, out: int = 4):
    reqs = random_requests(n, 8, out, seed=0)
    return [build_payload(r, "scripted-model", "completions") for r in reqs], [r.prompt_len for r in reqs]


def test_run_load_paces_at_the_rate(make_server):
    server = make_server(ttft_s=0.005, itl_s=0.001)
    payloads, lens = _payloads(server, 12, out=2)

    async def go():
        async with make_client(32, 30.0) as client:
            return await run_load(client, endpoint_url(server.url, "completions"), payloads, lens,
                                  rate=12.0, seed=2)
    results, duration = asyncio.run(go())
    assert all(r.success for r in results)
    starts = sorted(r.start_s for r in results)
    assert starts[-1] == pytest.approx(1.0, abs=0.25)         # last arrival at n / rate = 1 s
    assert 1.0 <= duration < 3.0


def test_max_concurrency_caps_requests_in_flight(make_server):
    server = make_server(ttft_s=0.05, itl_s=0.002)
    payloads, lens = _payloads(server, 8)

    async def go():
        async with make_client(32, 30.0) as client:
            return await run_load(client, endpoint_url(server.url, "completions"), payloads, lens,
                                  rate=math.inf, max_concurrency=2)
    results, _ = asyncio.run(go())
    assert all(r.success for r in results)
    assert server.max_inflight == 2
