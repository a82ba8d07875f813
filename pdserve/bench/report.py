"""Text output: the per-run table, a tuning recommendation, and the one-screen final summary.

The recommendation is a first-order reading of the sweep against the SLOs, printed with its
reasoning so an operator can disagree with it:
1. Stress point: the lowest-rate run that fell below 90% SLO attainment (the knee's right
   neighbour); if none did, the highest-rate run (there is headroom).
2. Pressure of each SLO there: TTFT p90 / TTFT SLO, TPOT p90 / TPOT SLO, ITL p99 / ITL SLO.
   The largest is the binding constraint: TTFT means prefill capacity (or head-of-line blocking
   by long prompts) limits; TPOT/ITL means decode capacity or prefill interference does.
3. Prefill:decode ratio for the same GPU count: capacity needed is taken as proportional to
   pressure x current capacity, so P' = N * (p_ttft * P) / (p_ttft * P + p_decode * D), rounded
   and kept in [1, N-1]. Queueing is not linear, so this gives direction and rough size only.
4. Chunk size: ITL p99 / median > 3 means steps that carried a prefill chunk stretched the decode
   steps batched with them -> halve the chunk (min 128). A TTFT tail (p99 / median > 3) with TTFT
   binding means long prompts block short ones -> halve the chunk too; otherwise keep it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.bench.metrics import DISTSERVE_ATTAINMENT, SLO, Summary, distserve_goodput

SPIKY_RATIO = 3.0
MIN_CHUNK = 128


def _f(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _rate(s: Summary) -> str:
    return "inf" if math.isinf(s.rate) else f"{s.rate:g}"


_COLUMNS = ("label", "rate", "conc", "ok/sent", "req/s", "out tok/s", "TTFT mean", "TTFT p50",
            "TTFT p99", "TPOT mean", "TPOT p99", "ITL p50", "ITL p99", "E2E p50", "goodput", "in SLO")


def table_row(s: Summary) -> list[str]:
    return [s.label, _rate(s), str(s.max_concurrency or "-"), f"{s.completed}/{s.num_prompts}",
            _f(s.request_throughput, ".2f"), _f(s.output_throughput, ".0f"), _f(s.ttft_ms.mean),
            _f(s.ttft_ms.median), _f(s.ttft_ms.p99), _f(s.tpot_ms.mean, ".2f"), _f(s.tpot_ms.p99, ".2f"),
            _f(s.itl_ms.median, ".2f"), _f(s.itl_ms.p99, ".2f"), _f(s.e2e_ms.median, ".0f"),
            _f(s.goodput, ".2f"), "-" if s.slo_attainment is None else f"{100 * s.slo_attainment:.0f}%"]


def format_table(summaries: list[Summary]) -> str:
    """Fixed-width table, times in ms."""
    rows = [list(_COLUMNS)] + [table_row(s) for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def progress_line(s: Summary) -> str:
    """One line per finished run, printed while the sweep goes on."""
    conc = s.max_concurrency or "-"
    slo = "" if s.slo_attainment is None else f", {100 * s.slo_attainment:.0f}% in SLO"
    return (f"[{s.label}] rate={_rate(s)} conc={conc}: {s.completed}/{s.num_prompts} ok, "
            f"{s.request_throughput:.2f} req/s, TTFT p50 {s.ttft_ms.median:.1f} ms, "
            f"TPOT mean {s.tpot_ms.mean:.2f} ms, ITL p99 {s.itl_ms.p99:.2f} ms{slo}")


@dataclass
class Recommendation:
    binding: str                  # "ttft" | "tpot" | "itl" | "none" | "failed"
    prefill: int
    decode: int
    chunk_size: int
    reasons: list[str] = field(default_factory=list)


def _stress_point(summaries: list[Summary]) -> Summary:
    ordered = sorted(summaries, key=lambda s: s.rate)
    for s in ordered:
        if s.slo_attainment is not None and s.slo_attainment < DISTSERVE_ATTAINMENT:
            return s
    return ordered[-1]


def _pressures(s: Summary, slo: SLO) -> dict[str, float]:
    out = {}
    if slo.ttft_ms:
        out["ttft"] = s.ttft_ms.p90 / slo.ttft_ms
    if slo.tpot_ms:
        out["tpot"] = s.tpot_ms.p90 / slo.tpot_ms
    if slo.itl_ms:
        out["itl"] = s.itl_ms.p99 / slo.itl_ms
    return out


def _ratio(p_ttft: float, p_decode: float, prefill: int, decode: int) -> tuple[int, int]:
    n = prefill + decode
    if n < 2:
        return prefill, decode
    want_p = p_ttft * prefill
    want_d = p_decode * decode
    p = round(n * want_p / (want_p + want_d)) if want_p + want_d > 0 else prefill
    p = min(max(1, p), n - 1)
    return p, n - p


def _chunk_advice(s: Summary, binding: str, chunk: int, reasons: list[str]) -> int:
    itl_spike = s.itl_ms.p99 / s.itl_ms.median if s.itl_ms.median > 0 else 0.0
    ttft_tail = s.ttft_ms.p99 / s.ttft_ms.median if s.ttft_ms.median > 0 else 0.0
    if binding in ("tpot", "itl") and itl_spike > SPIKY_RATIO:
        reasons.append(f"ITL p99/median = {itl_spike:.1f} > {SPIKY_RATIO:g}: decode steps that shared a "
                       f"prefill chunk stretched; a smaller chunk cuts that interference")
        return max(MIN_CHUNK, chunk // 2)
    if binding == "ttft" and ttft_tail > SPIKY_RATIO:
        reasons.append(f"TTFT p99/median = {ttft_tail:.1f} > {SPIKY_RATIO:g}: long prompts block short "
                       f"ones; a smaller chunk lets short prompts interleave")
        return max(MIN_CHUNK, chunk // 2)
    reasons.append(f"ITL p99/median = {itl_spike:.1f}, TTFT p99/median = {ttft_tail:.1f}: no sign of "
                   f"chunk-driven interference; keep the chunk size")
    return chunk


def recommend(summaries: list[Summary], slo: SLO | None, roles: dict[str, int] | None = None,
              chunk_size: int = 512) -> Recommendation | None:
    """Tuning advice for one server's sweep (None without SLOs or runs)."""
    if slo is None or not summaries or not (slo.ttft_ms or slo.tpot_ms or slo.itl_ms):
        return None
    roles = roles or {}
    prefill, decode = roles.get("prefill", 0), roles.get("decode", 0)
    colocated = roles.get("colocated", 0)
    if prefill == 0 or decode == 0:  # colocated baseline or unknown layout: reason from 1:1
        n = max(2, colocated or prefill + decode)
        prefill, decode = n // 2, n - n // 2
    s = _stress_point(summaries)
    if s.failed > s.num_prompts // 10:
        reason = (f"rate {_rate(s)} req/s: {s.failed}/{s.num_prompts} requests failed "
                  f"({(s.errors or ['?'])[0][:120]}); fix the failures before tuning")
        return Recommendation("failed", prefill, decode, chunk_size, [reason])
    p = _pressures(s, slo)
    reasons = [f"stress point: rate {_rate(s)} req/s, {100 * (s.slo_attainment or 0):.0f}% within SLO "
               f"({slo.describe()}); pressure = observed/SLO: "
               + ", ".join(f"{k} {v:.2f}" for k, v in p.items())]
    binding = max(p, key=p.get) if p and max(p.values()) > 1.0 else "none"
    p_ttft, p_dec = p.get("ttft", 0.0), max(p.get("tpot", 0.0), p.get("itl", 0.0))
    if binding == "none":
        reasons.append("every SLO holds at the highest rate tried: raise --request-rate to find the knee")
        return Recommendation("none", prefill, decode, chunk_size, reasons)
    new_p, new_d = _ratio(p_ttft, p_dec, prefill, decode)
    if binding == "ttft":
        reasons.append("TTFT binds: prompts wait for prefill -> shift GPUs to prefill")
    else:
        reasons.append(f"{binding.upper()} binds: decode steps are too slow -> shift GPUs to decode "
                       "(more KV and batch room per node) and cut prefill interference")
    if (new_p, new_d) == (prefill, decode):   # too few nodes to shift one: grow the binding side
        new_p, new_d = (prefill + 1, decode) if binding == "ttft" else (prefill, decode + 1)
        reasons.append(f"P:D {prefill}:{decode} -> {new_p}:{new_d} (too few GPUs to move one; add a node)")
    else:
        reasons.append(f"P:D {prefill}:{decode} -> {new_p}:{new_d} (capacity ~ pressure x nodes, same GPU count)")
    if colocated:
        reasons.append(f"server is colocated ({colocated} nodes): read the ratio as a PD split to try")
    new_chunk = _chunk_advice(s, binding, chunk_size, reasons)
    return Recommendation(binding, new_p, new_d, new_chunk, reasons)


def format_recommendation(label: str, rec: Recommendation | None) -> str:
    if rec is None:
        return f"[{label}] no recommendation: pass --slo ttft=MS,tpot=MS to get one"
    head = (f"[{label}] recommendation: prefill:decode = {rec.prefill}:{rec.decode}, "
            f"--chunked-prefill-size {rec.chunk_size} (binding: {rec.binding})")
    return "\n".join([head] + [f"    - {r}" for r in rec.reasons])


def _kv_line(summaries: list[Summary]) -> str | None:
    per_req = [s.kv for s in summaries if s.kv is not None]
    server = [s.server for s in summaries if s.server.get("kv_transfer_gb_per_s")]
    if per_req:
        kv = max(per_req, key=lambda k: k.requests)
        return (f"KV transfer (per request): {kv.mean_kv_bytes / 2**20:.1f} MiB, "
                f"{kv.transfer_ms.median:.2f} ms median, {kv.gb_per_s.median:.1f} GB/s median")
    if server:
        gbps = [x["kv_transfer_gb_per_s"] for x in server]
        return f"KV transfer (router /metrics): {min(gbps):.1f}-{max(gbps):.1f} GB/s busy bandwidth"
    return None


def final_summary(by_label: dict[str, list[Summary]], recs: dict[str, Recommendation | None],
                  slo: SLO | None, files: list[str]) -> str:
    """The one-screen summary printed at the end."""
    lines = ["=" * 30 + " pdserve bench " + "=" * 30, f"SLO: {slo.describe() if slo else 'none'}"]
    for label, summaries in by_label.items():
        best = max(summaries, key=lambda s: s.output_throughput)
        knee = distserve_goodput(summaries)
        lines.append(f"[{label}] {len(summaries)} runs; peak {best.output_throughput:.0f} out tok/s "
                     f"({best.request_throughput:.2f} req/s at rate {_rate(best)})")
        if knee is not None:
            lines.append(f"    DistServe goodput: {knee.rate:g} req/s (>= 90% in SLO); there TTFT p99 "
                         f"{knee.ttft_ms.p99:.0f} ms, ITL p99 {knee.itl_ms.p99:.1f} ms, TPOT mean "
                         f"{knee.tpot_ms.mean:.1f} ms")
        elif slo is not None:
            lines.append("    DistServe goodput: no finite rate kept >= 90% of requests within SLO")
        failed = sum(s.failed for s in summaries)
        if failed:
            errs = {e for s in summaries for e in s.errors}
            lines.append(f"    {failed} failed requests, e.g. {sorted(errs)[0][:150]!r}")
        if (kv := _kv_line(summaries)) is not None:
            lines.append("    " + kv)
        lines.append(format_recommendation(label, recs.get(label)))
    lines += _compare_lines(by_label)
    lines.append("files: " + ", ".join(files))
    return "\n".join(lines)


def _compare_lines(by_label: dict[str, list[Summary]]) -> list[str]:
    if len(by_label) != 2:
        return []
    (a, sa), (b, sb) = by_label.items()
    ka, kb = distserve_goodput(sa), distserve_goodput(sb)
    out = []
    if ka is not None and kb is not None:
        out.append(f"compare: goodput {a} {ka.rate:g} vs {b} {kb.rate:g} req/s ({ka.rate / kb.rate:.2f}x)")
    common = sorted({s.rate for s in sa if s.completed} & {s.rate for s in sb if s.completed})
    if common:
        r = common[-1]
        pa = next(s for s in sa if s.rate == r and s.completed)
        pb = next(s for s in sb if s.rate == r and s.completed)
        out.append(f"compare at rate {_rate(pa)}: ITL p99 {a} {pa.itl_ms.p99:.1f} vs {b} {pb.itl_ms.p99:.1f} ms; "
                   f"TTFT p99 {pa.ttft_ms.p99:.0f} vs {pb.ttft_ms.p99:.0f} ms")
    return out
