"""Table, tuning recommendation and plots from synthetic sweep summaries."""

from __future__ import annotations

import math

from pdserve.bench.metrics import SLO, Stats, Summary, summarize
from pdserve.bench.plots import plot_all
from pdserve.bench.report import final_summary, format_table, recommend

from .conftest import timeline


def _stats(median: float, p90: float | None = None, p99: float | None = None) -> Stats:
    p90 = median if p90 is None else p90
    p99 = p90 if p99 is None else p99
    return Stats(count=10, mean=median, median=median, p90=p90, p99=p99, std=0.0, max=p99)


def _point(rate: float, attainment: float, *, ttft=(100, 100, 100), tpot=(20, 20, 20), itl=(20, 20, 20),
           label: str = "pd", conc: int | None = None) -> Summary:
    s = summarize([timeline([0.1, 0.2])], 1.0, label=label, request_rate=rate, max_concurrency=conc)
    s.ttft_ms, s.tpot_ms, s.itl_ms = _stats(*ttft), _stats(*tpot), _stats(*itl)
    s.slo_attainment, s.goodput = attainment, attainment * min(rate, 10.0)
    return s


def test_ttft_bound_shifts_gpus_to_prefill():
    slo = SLO.parse("ttft=1000,tpot=50")
    sweep = [_point(1, 0.99), _point(2, 0.95), _point(4, 0.5, ttft=(1000, 3000, 2000), tpot=(30, 30, 30))]
    rec = recommend(sweep, slo, {"prefill": 2, "decode": 2}, chunk_size=512)
    assert rec.binding == "ttft"
    # pressures: ttft 3000/1000 = 3, tpot 30/50 = 0.6 -> P = round(4 * 6 / 7.2) = 3
    assert (rec.prefill, rec.decode) == (3, 1)
    assert rec.chunk_size == 512                   # TTFT tail 2x median: no head-of-line blocking
    assert any("rate 4" in r for r in rec.reasons)


def test_spiky_itl_shifts_to_decode_and_halves_the_chunk():
    slo = SLO.parse("ttft=1000,tpot=50,itl=100")
    sweep = [_point(1, 0.95), _point(2, 0.6, ttft=(400, 500), tpot=(30, 40), itl=(20, 30, 400))]
    rec = recommend(sweep, slo, {"prefill": 2, "decode": 2}, chunk_size=512)
    assert rec.binding == "itl"
    assert (rec.prefill, rec.decode) == (1, 3)
    assert rec.chunk_size == 256
    assert any("interference" in r for r in rec.reasons)


def test_headroom_and_missing_slo():
    slo = SLO.parse("ttft=1000,tpot=50")
    rec = recommend([_point(1, 1.0), _point(2, 0.97)], slo, {"colocated": 2})
    assert rec.binding == "none" and (rec.prefill, rec.decode) == (1, 1)
    assert recommend([_point(1, 1.0)], None) is None


def test_failures_block_tuning_advice():
    bad = summarize([timeline([], success=False, output_tokens=0, error="HTTP 503: no pair")] * 4, 1.0,
                    request_rate=2.0, slo=SLO.parse("ttft=1000"))
    rec = recommend([bad], SLO.parse("ttft=1000"), {"prefill": 1, "decode": 1})
    assert rec.binding == "failed" and "HTTP 503" in rec.reasons[0]


def test_table_and_final_summary_mention_every_run():
    pd = [_point(1, 0.99), _point(2, 0.92), _point(math.inf, 0.3)]
    co = [_point(1, 0.95, label="colocated"), _point(2, 0.5, label="colocated"),
          _point(math.inf, 0.1, label="colocated")]
    table = format_table(pd + co)
    assert len(table.splitlines()) == 2 + 6 and "inf" in table
    slo = SLO.parse("ttft=1000,tpot=50")
    text = final_summary({"pd": pd, "colocated": co}, {"pd": recommend(pd, slo), "colocated": None},
                         slo, ["x/summary.json"])
    assert "DistServe goodput: 2 req/s" in text
    assert "compare: goodput pd 2 vs colocated 1 req/s (2.00x)" in text
    assert "no recommendation" in text


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plots_written_for_rate_and_concurrency_sweeps(tmp_path):
    rates = [_point(r, a, ttft=(100 * r, 150 * r, 300 * r)) for r, a in ((1, 0.99), (2, 0.95), (4, 0.6))]
    rates += [_point(math.inf, 0.2)]
    rates += [_point(r, a, label="colocated") for r, a in ((1, 0.9), (2, 0.5), (4, 0.1), (math.inf, 0.0))]
    paths = plot_all(rates, tmp_path / "r", SLO.parse("ttft=1000,tpot=50"))
    assert [p.name for p in paths] == ["ttft_vs_load.png", "itl_vs_load.png", "tpot_vs_load.png",
                                       "goodput_vs_load.png"]
    assert all(_is_png(p) for p in paths)
    concs = [_point(math.inf, 1.0, conc=c) for c in (1, 4, 16)]
    assert all(_is_png(p) for p in plot_all(concs, tmp_path / "c"))
