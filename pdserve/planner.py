"""SLO planner: how many prefill and decode nodes the current load needs, and admission control.

The model (docs/router.md, "SLO planner") works from what the router measures over its last
``--slo-window-s`` seconds (``WindowStats``), never from hardware constants:

- **Prefill pool**, each node an M/M/1 queue. Service time ``s_p`` = the 10th percentile of TTFT
  (the requests that did not queue: prefill + transfer + first token), so a node serves
  ``mu = 1 / s_p`` requests/s. Mean response time at per-node arrival rate ``a`` is
  ``1 / (mu - a)``; it meets ``ttft`` while ``a <= mu - 1/ttft``. Nodes needed:
  ``ceil(rate / (mu - 1/ttft))``; none suffice when ``s_p >= ttft`` (an idle node already misses).
- **Decode pool**, per-token step time linear in the node's batch: ``itl(b) = t0 + t1 * b``, fitted
  by least squares to (batch, ITL) samples; with a single batch size seen, ``itl`` is taken as
  proportional to the batch (``t0 = 0``: conservative, decode steps grow slower than that). A node
  keeps ``itl <= tpot`` up to ``b_max = floor((tpot - t0) / t1)`` requests. By Little's law the
  load keeps ``rate * output_tokens * tpot`` requests decoding at once; nodes needed:
  ``ceil(that / b_max)``.

Admission control asks the same model about one more request on the least loaded nodes: shed
(HTTP 429 + Retry-After) when its predicted TTFT ``(queue + 1) * s_p`` exceeds ``ttft`` or the
decode node's predicted ``itl(batch + 1)`` exceeds ``tpot`` -- but never when those nodes are idle
(shedding cannot help then) and never without samples (the model has nothing to go on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


def parse_slo(text: str) -> SLO:
    """'ttft=1.0,tpot=0.05' (seconds) -> SLO; ValueError naming --slo."""
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, raw = part.strip().partition("=")
        if not sep or key not in ("ttft", "tpot"):
            raise ValueError(f"--slo: expected 'ttft=SECONDS,tpot=SECONDS', got {text!r}")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"--slo: {key}={raw!r} is not a number of seconds") from None
        if not values[key] > 0 or math.isinf(values[key]):
            raise ValueError(f"--slo: {key} must be a positive number of seconds, got {raw}")
    if set(values) != {"ttft", "tpot"}:
        raise ValueError(f"--slo: give both ttft and tpot, e.g. 'ttft=1.0,tpot=0.05' (got {text!r})")
    return SLO(values["ttft"], values["tpot"])


class WindowStats(msgspec.Struct, kw_only=True):
    """What the router measured over its window (the planner's whole input; JSON at /dashboard/data)."""
    window_s: float
    request_rate: float                      # requests/s arriving
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    ttft_samples: list[float] = []           # seconds
    itl_samples: list[list[float]] = []      # [batch on the decode node, ITL seconds]
    prefill_nodes: int = 0
    decode_nodes: int = 0


class DecodeFit(msgspec.Struct):
    t0: float
    t1: float

    def itl(self, batch: float) -> float:
        return self.t0 + self.t1 * batch


class Plan(msgspec.Struct, kw_only=True):
    prefill_nodes: int | None                # None: no number of nodes meets the SLO
    decode_nodes: int | None
    current_prefill_nodes: int
    current_decode_nodes: int
    prefill_service_s: float | None
    decode_fit: DecodeFit | None
    max_batch_per_decode: int | None
    notes: list[str] = []


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; ``values`` need not be sorted."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def prefill_service_s(stats: WindowStats) -> float | None:
    return percentile(stats.ttft_samples, 0.10) if stats.ttft_samples else None


def fit_decode(samples: list[list[float]]) -> DecodeFit | None:
    """itl(b) = t0 + t1*b by least squares; proportional (t0 = 0) when one batch size was seen or
    the fit is not increasing."""
    points = [(max(1.0, b), itl) for b, itl in samples]
    if not points:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_b = sum((b - mean_b) ** 2 for b, _ in points)
    if var_b > 0:
        t1 = sum((b - mean_b) * (y - mean_y) for b, y in points) / var_b
        t0 = mean_y - t1 * mean_b
        if t1 > 0 and t0 >= 0:
            return DecodeFit(t0, t1)
    return DecodeFit(0.0, mean_y / mean_b)


def prefill_nodes_needed(rate: float, service_s: float, ttft_s: float) -> int | None:
    """M/M/1 per node: the fewest nodes whose mean response time stays within ``ttft_s``."""
    if service_s >= ttft_s:
        return None
    per_node = 1.0 / service_s - 1.0 / ttft_s      # requests/s one node takes within the SLO
    return max(1, math.ceil(rate / per_node - 1e-9))


def decode_nodes_needed(rate: float, output_tokens: float, fit: DecodeFit, tpot_s: float) -> tuple[int | None, int]:
    """(nodes, the batch one node holds within ``tpot_s``); nodes None when even batch 1 misses."""
    max_batch = math.floor((tpot_s - fit.t0) / fit.t1 + 1e-9) if fit.t1 > 0 else 1 << 30
    if max_batch < 1:
        return None, 0
    concurrent = rate * max(output_tokens, 1.0) * tpot_s    # Little's law at the SLO's pace
    return max(1, math.ceil(concurrent / max_batch - 1e-9)), max_batch


def plan(stats: WindowStats, slo: SLO) -> Plan:
    notes = []
    service = prefill_service_s(stats)
    fit = fit_decode(stats.itl_samples)
    need_p = need_d = None
    max_batch = None
    if service is None:
        notes.append("no TTFT samples in the window: prefill need unknown (send some traffic)")
        need_p = stats.prefill_nodes
    else:
        need_p = prefill_nodes_needed(stats.request_rate, service, slo.ttft_s)
        if need_p is None:
            notes.append(f"an idle prefill node takes {service:.3f}s > ttft {slo.ttft_s:g}s: no node count meets it")
    if fit is None:
        notes.append("no ITL samples in the window: decode need unknown (send some traffic)")
        need_d = stats.decode_nodes
    else:
        need_d, max_batch = decode_nodes_needed(stats.request_rate, stats.mean_output_tokens, fit, slo.tpot_s)
        if need_d is None:
            notes.append(f"ITL at batch 1 is {fit.itl(1):.4f}s > tpot {slo.tpot_s:g}s: no node count meets it")
    return Plan(prefill_nodes=need_p, decode_nodes=need_d, current_prefill_nodes=stats.prefill_nodes,
                current_decode_nodes=stats.decode_nodes, prefill_service_s=service, decode_fit=fit,
                max_batch_per_decode=max_batch, notes=notes)


@dataclass(frozen=True)
class Verdict:
    admit: bool
    retry_after_s: int = 0
    reason: str = ""


def admit(stats: WindowStats, slo: SLO, prefill_queue: int | None, decode_batch: int) -> Verdict:
    """One more request, given the least loaded prefill node's queue (None: it goes direct) and the
    least loaded decode node's batch."""
    service = prefill_service_s(stats)
    if service is not None and prefill_queue:
        predicted = (prefill_queue + 1) * service
        if predicted > slo.ttft_s:
            wait = math.ceil(predicted - slo.ttft_s)
            return Verdict(False, max(1, wait), f"predicted TTFT {predicted:.2f}s exceeds the SLO's {slo.ttft_s:g}s "
                                                f"({prefill_queue} request(s) queued per prefill node)")
    fit = fit_decode(stats.itl_samples)
    if fit is not None and decode_batch > 0:
        predicted = fit.itl(decode_batch + 1)
        if predicted > slo.tpot_s:
            drain = fit.itl(decode_batch) * max(stats.mean_output_tokens, 1.0)   # a running request's rest
            return Verdict(False, min(60, max(1, math.ceil(drain))),
                           f"predicted time per output token {predicted * 1e3:.1f}ms exceeds the SLO's "
                           f"{slo.tpot_s * 1e3:g}ms (batch {decode_batch} per decode node)")
    return Verdict(True)


def format_plan(p: Plan, slo: SLO, stats: WindowStats) -> str:
    def count(n: int | None) -> str:
        return "cannot meet the SLO" if n is None else str(n)
    lines = [f"SLO: ttft <= {slo.ttft_s:g}s, tpot <= {slo.tpot_s:g}s; load over the last {stats.window_s:g}s: "
             f"{stats.request_rate:.2f} req/s, {stats.mean_prompt_tokens:.0f} prompt / "
             f"{stats.mean_output_tokens:.0f} output tokens per request",
             f"prefill nodes: need {count(p.prefill_nodes)} (have {p.current_prefill_nodes})"
             + (f"; idle service time {p.prefill_service_s:.3f}s" if p.prefill_service_s is not None else ""),
             f"decode nodes:  need {count(p.decode_nodes)} (have {p.current_decode_nodes})"
             + (f"; itl(b) = {p.decode_fit.t0 * 1e3:.2f}ms + {p.decode_fit.t1 * 1e3:.2f}ms x b, "
                f"{p.max_batch_per_decode} requests per node within tpot" if p.decode_fit and p.max_batch_per_decode
                else "")]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``pdserve plan --base-url URL --slo ttft=1.0,tpot=0.05``: advice from a running router's window."""
    import httpx

    parser = argparse.ArgumentParser(prog="pdserve plan", description="How many prefill and decode nodes the "
                                     "router's current load needs to meet an SLO (docs/router.md).")
    parser.add_argument("--base-url", required=True, help="The router, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--slo", required=True, help="Targets in seconds, e.g. 'ttft=1.0,tpot=0.05'.")
    parser.add_argument("--api-key", default=None, help="The router's --api-key, if it has one.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    args = parser.parse_args(argv)
    try:
        slo = parse_slo(args.slo)
    except ValueError as exc:
        parser.exit(2, f"pdserve plan: error: {exc}\n")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        resp = httpx.get(args.base_url.rstrip("/") + "/dashboard/data", headers=headers, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        parser.exit(1, f"pdserve plan: error: --base-url: {exc}\n")
    stats = msgspec.convert(resp.json()["window"], WindowStats)
    result = plan(stats, slo)
    print(json.dumps(msgspec.to_builtins(result)) if args.json else format_plan(result, slo, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
