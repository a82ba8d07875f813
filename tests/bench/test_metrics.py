"""Metric definitions on synthetic timelines with hand-computed answers."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.metrics import (SLO, Stats, Summary, distserve_goodput, request_itls, request_tpot,
                                   summarize, violations)

from .conftest import timeline


def test_ttft_e2e_and_itl_of_one_request():
    r = timeline([0.100, 0.150, 0.250, 0.300], tokens=[1, 1, 2, 1])
    assert r.ttft_s == pytest.approx(0.100)
    assert r.e2e_s == pytest.approx(0.300)
    # gaps 50, 100 (a 2-token chunk -> two gaps of 50), 50 ms
    assert request_itls(r) == pytest.approx([0.05, 0.05, 0.05, 0.05])
    # 5 tokens: (300 - 100) / 4 = 50 ms
    assert request_tpot(r) == pytest.approx(0.05)


def test_tpot_undefined_for_one_token():
    assert request_tpot(timeline([0.2])) is None


def test_tpot_is_per_request_then_averaged_and_itl_is_pooled():
    a = timeline([0.1 + 0.1 * i for i in range(11)])   # 11 tokens, gaps 100 ms: TPOT 100
    b = timeline([0.2, 0.4, 0.6, 0.8])                  # 4 tokens, gaps 200 ms: TPOT 200
    s = summarize([a, b], duration_s=2.0)
    assert s.tpot_ms.mean == pytest.approx(150.0)       # (100 + 200) / 2, not token-weighted (123)
    assert s.tpot_ms.count == 2
    # ITL pooled over all 13 gaps: (10 x 100 + 3 x 200) / 13, not the mean of per-request means
    assert s.itl_ms.count == 13
    assert s.itl_ms.mean == pytest.approx(1600 / 13)
    assert s.itl_ms.median == pytest.approx(100.0)
    assert s.ttft_ms.mean == pytest.approx(150.0)
    assert s.e2e_ms.median == pytest.approx(0.5 * (1100 + 800))
    assert s.total_output_tokens == 15
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(7.5)
    assert s.total_token_throughput == pytest.approx((20 + 15) / 2.0)


def test_percentiles_interpolate_linearly():
    st = Stats.of([float(x) for x in range(1, 101)])
    assert st.median == pytest.approx(50.5)
    assert st.p90 == pytest.approx(90.1)     # index 0.9 * 99 = 89.1 -> 90 + 0.1
    assert st.p99 == pytest.approx(99.01)
    assert st.max == 100.0
    assert Stats.of([]).count == 0 and Stats.of([]).p99 == 0.0
    assert Stats.of([0.002], scale=1e3).mean == pytest.approx(2.0)


def test_failures_are_counted_not_measured():
    ok = timeline([0.1, 0.2])
    bad = timeline([], success=False, output_tokens=0, error="HTTP 500: boom")
    s = summarize([ok, bad, bad], duration_s=1.0)
    assert (s.completed, s.failed, s.num_prompts) == (1, 2, 3)
    assert s.ttft_ms.count == 1
    assert s.errors == ["HTTP 500: boom"]
    assert s.request_throughput == pytest.approx(1.0)


def test_goodput_counts_requests_meeting_every_slo():
    slo = SLO.parse("ttft=150,tpot=120")
    good = timeline([0.1, 0.2, 0.3])                          # TTFT 100, TPOT 100
    slow_first = timeline([0.2, 0.3])                         # TTFT 200 > 150
    slow_decode = timeline([0.05, 0.2, 0.35])                 # TPOT 150 > 120
    one_token = timeline([0.05])                              # TPOT counts as 0 (vLLM)
    failed = timeline([], success=False, output_tokens=0)
    results = [good, slow_first, slow_decode, one_token, failed]
    assert violations(good, slo) == []
    assert violations(slow_first, slo) == ["ttft"]
    assert violations(slow_decode, slo) == ["tpot"]
    assert violations(one_token, slo) == []
    assert violations(failed, slo) == ["failed"]
    s = summarize(results, duration_s=2.0, slo=slo)
    assert s.goodput == pytest.approx(1.0)                    # 2 good / 2 s
    assert s.slo_attainment == pytest.approx(0.4)             # 2 of 5 sent
    assert s.slo_misses == {"ttft": 1, "tpot": 1, "failed": 1}


def test_itl_slo_uses_the_worst_gap_of_the_request():
    r = timeline([0.1, 0.11, 0.12, 0.32, 0.33])    # one 200 ms stall, TPOT 57.5 ms
    assert violations(r, SLO.parse("tpot=100")) == []
    assert violations(r, SLO.parse("tpot=100,itl=150")) == ["itl"]
    assert violations(r, SLO.parse("e2e=300")) == ["e2e"]


def test_slo_parse():
    assert SLO.parse(None) is None
    assert SLO.parse("ttft=1000, tpot=50,itl=200") == SLO(ttft_ms=1000, tpot_ms=50, itl_ms=200)
    for bad in ("ttft", "ttft=abc", "foo=1", "tpot=-1"):
        with pytest.raises(ValueError, match="--slo"):
            SLO.parse(bad)


def _point(rate: float, attainment: float | None) -> Summary:
    s = summarize([timeline([0.1, 0.2])], 1.0, request_rate=rate)
    s.slo_attainment = attainment
    return s


def test_distserve_knee_is_the_highest_rate_with_90_percent_in_slo():
    sweep = [_point(1, 0.99), _point(2, 0.95), _point(4, 0.90), _point(8, 0.5), _point(math.inf, 0.95)]
    assert distserve_goodput(sweep).rate == 4          # inf is not a rate; 0.90 counts (>=)
    assert distserve_goodput([_point(1, 0.95), _point(2, 0.85), _point(4, 0.92)]).rate == 4
    assert distserve_goodput([_point(1, 0.5), _point(2, 0.1)]) is None
    assert distserve_goodput([_point(1, None)]) is None


def test_summary_json_round_trip_keeps_inf_rate():
    import msgspec
    s = summarize([timeline([0.1, 0.2])], 1.0, request_rate=math.inf)
    back = msgspec.json.decode(msgspec.json.encode(s), type=Summary)
    assert back.request_rate is None and math.isinf(back.rate)
    assert back.ttft_ms == s.ttft_ms
