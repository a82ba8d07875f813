"""Serving metrics, defined as ``vllm bench serve`` / ``sglang.bench_serving`` define them.

- TTFT: client clock from just before the POST to the first chunk carrying text.
- ITL: every gap between successive token chunks, pooled over all requests' tokens. A chunk that
  carried n > 1 tokens contributes n gaps of (gap / n) (sglang's adjustment; with one token a
  chunk this is vLLM's list of chunk gaps). p99 ITL is where prefill interference shows.
- TPOT: per request (E2E - TTFT) / (output tokens - 1), then averaged over requests; requests
  with one output token have no TPOT (they count as TPOT 0 against an SLO, as in vLLM).
- E2E: from just before the POST to the last token chunk.
- Throughput: completed requests, output tokens and input+output tokens per second of the run
  (first send to last completion).
- Goodput: completed requests per second that met every SLO given; SLO attainment: the fraction
  of all sent requests that did (failed requests miss). DistServe's form: the highest rate of a
  sweep whose attainment is >= 90%.
Percentiles are numpy's (linear interpolation), as in both tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from pdserve.bench.client import RequestResult

DISTSERVE_ATTAINMENT = 0.9


class Stats(msgspec.Struct, kw_only=True):
    """Distribution summary of one metric, in milliseconds (or the unit in the field name)."""
    count: int
    mean: float
    median: float
    p90: float
    p99: float
    std: float
    max: float

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> "Stats":
        if not values:
            return cls(count=0, mean=0.0, median=0.0, p90=0.0, p99=0.0, std=0.0, max=0.0)
        a = np.asarray(values, dtype=np.float64) * scale
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(count=len(values), mean=float(a.mean()), median=float(p50), p90=float(p90),
                   p99=float(p99), std=float(a.std()), max=float(a.max()))


@dataclass(frozen=True)
class SLO:
    """Per-request service-level objectives in milliseconds; None = not checked."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None      # every gap of the request (its largest ITL) within this
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> "SLO | None":
        """``"ttft=1000,tpot=50[,itl=200][,e2e=...]"`` -> SLO; None/"" -> None."""
        if not text:
            return None
        keys = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl_ms", "e2e": "e2e_ms", "e2el": "e2e_ms"}
        kwargs = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            name = name.strip().lower()
            if not sep or name not in keys:
                raise ValueError(f"--slo: {part!r} is not one of ttft=MS, tpot=MS, itl=MS, e2e=MS")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--slo: {value!r} in {part!r} is not a number of milliseconds") from None
            if ms <= 0:
                raise ValueError(f"--slo: {name} must be positive, got {ms}")
            kwargs[keys[name]] = ms
        return cls(**kwargs)

    def describe(self) -> str:
        parts = [f"{n}<={v:g}ms" for n, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms),
                                               ("ITL", self.itl_ms), ("E2E", self.e2e_ms)) if v]
        return " ".join(parts) or "none"


# ---------------------------------------------------------------------------------------------
# per request


def request_itls(r: RequestResult) -> list[float]:
    """Inter-token latencies (s) of one request: chunk gaps, split evenly over multi-token chunks."""
    out: list[float] = []
    for i in range(1, len(r.chunk_times_s)):
        gap = r.chunk_times_s[i] - r.chunk_times_s[i - 1]
        n = max(1, r.chunk_tokens[i] if i < len(r.chunk_tokens) else 1)
        out.extend([gap / n] * n)
    return out


def request_tpot(r: RequestResult) -> float | None:
    """(E2E - TTFT) / (output tokens - 1) in seconds; None with fewer than 2 output tokens."""
    if r.output_tokens <= 1:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def violations(r: RequestResult, slo: SLO) -> list[str]:
    """Names of the SLOs this request missed ('failed' when it did not complete)."""
    if not r.success:
        return ["failed"]
    missed = []
    if slo.ttft_ms is not None and r.ttft_s * 1e3 > slo.ttft_ms:
        missed.append("ttft")
    if slo.tpot_ms is not None and (request_tpot(r) or 0.0) * 1e3 > slo.tpot_ms:
        missed.append("tpot")
    if slo.itl_ms is not None and max(request_itls(r), default=0.0) * 1e3 > slo.itl_ms:
        missed.append("itl")
    if slo.e2e_ms is not None and r.e2e_s * 1e3 > slo.e2e_ms:
        missed.append("e2e")
    return missed


# ---------------------------------------------------------------------------------------------
# per run


class KVStats(msgspec.Struct, kw_only=True):
    """KV transfer figures of the requests whose responses reported them."""
    requests: int
    mean_kv_bytes: float
    transfer_ms: Stats
    gb_per_s: Stats              # per request: kv_bytes / transfer time


class Summary(msgspec.Struct, kw_only=True):
    label: str
    request_rate: float | None   # offered req/s; inf (null in JSON) = all at t=0; read via .rate
    burstiness: float
    max_concurrency: int | None
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float    # completed req/s
    output_throughput: float     # output tok/s
    total_token_throughput: float
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    slo: str | None = None
    goodput: float | None = None           # req/s meeting every SLO
    slo_attainment: float | None = None    # fraction of sent requests meeting every SLO
    slo_misses: dict[str, int] = msgspec.field(default_factory=dict)
    kv: KVStats | None = None
    server: dict = msgspec.field(default_factory=dict)  # router /metrics deltas (server_stats.py)
    errors: list[str] = msgspec.field(default_factory=list)  # first few distinct error texts

    @property
    def rate(self) -> float:
        return float("inf") if self.request_rate is None else self.request_rate


def _kv_stats(results: list[RequestResult]) -> KVStats | None:
    rep = [r for r in results if r.success and r.kv_bytes is not None]
    if not rep:
        return None
    timed = [r for r in rep if r.transfer_ms]
    return KVStats(requests=len(rep), mean_kv_bytes=float(np.mean([r.kv_bytes for r in rep])),
                   transfer_ms=Stats.of([r.transfer_ms for r in timed]),
                   gb_per_s=Stats.of([r.kv_bytes / (r.transfer_ms * 1e6) for r in timed]))


def _slo_fields(results: list[RequestResult], slo: SLO | None, duration_s: float) -> dict:
    if slo is None:
        return {}
    misses: dict[str, int] = {}
    good = 0
    for r in results:
        missed = violations(r, slo)
        good += not missed
        for m in missed:
            misses[m] = misses.get(m, 0) + 1
    return {"slo": slo.describe(), "goodput": good / duration_s if duration_s > 0 else 0.0,
            "slo_attainment": good / len(results) if results else 0.0, "slo_misses": misses}


def summarize(results: list[RequestResult], duration_s: float, *, label: str = "run",
              request_rate: float = float("inf"), burstiness: float = 1.0,
              max_concurrency: int | None = None, slo: SLO | None = None) -> Summary:
    """Aggregate one run's per-request results (all of them, failures included)."""
    ok = [r for r in results if r.success]
    tpots = [t for r in ok if (t := request_tpot(r)) is not None]
    itls = [x for r in ok for x in request_itls(r)]
    n_in, n_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    errors = list(dict.fromkeys(r.error for r in results if not r.success))[:5]
    return Summary(
        label=label, request_rate=request_rate, burstiness=burstiness, max_concurrency=max_concurrency,
        num_prompts=len(results), completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        total_input_tokens=n_in, total_output_tokens=n_out, request_throughput=per_s(len(ok)),
        output_throughput=per_s(n_out), total_token_throughput=per_s(n_in + n_out),
        ttft_ms=Stats.of([r.ttft_s for r in ok], 1e3), tpot_ms=Stats.of(tpots, 1e3),
        itl_ms=Stats.of(itls, 1e3), e2e_ms=Stats.of([r.e2e_s for r in ok], 1e3),
        kv=_kv_stats(results), errors=errors, **_slo_fields(results, slo, duration_s))


def distserve_goodput(summaries: list[Summary],
                      attainment: float = DISTSERVE_ATTAINMENT) -> Summary | None:
    """The sweep point with the highest finite offered rate whose SLO attainment >= ``attainment``."""
    ok = [s for s in summaries if s.slo_attainment is not None and s.slo_attainment >= attainment
          and np.isfinite(s.rate)]
    return max(ok, key=lambda s: s.rate, default=None)
