"""Conditional disaggregation, n > 1 sharing one prefill, the SLO planner's arithmetic and the 429
path of admission control.

Unit tests for the planner and ``direct_reason``; the rest through the real router (uvicorn, real
redis-server, real sockets) and loopback ``ScriptNode``s, which record every message they receive.
"""

from __future__ import annotations

import math
import threading
import time

import httpx
import openai
import pytest

from pdserve.config import DispatchConfig, RouterConfig
from pdserve.planner import DecodeFit, WindowStats, admit, decode_nodes_needed, fit_decode, parse_slo, plan
from pdserve.planner import prefill_nodes_needed
from pdserve.protocol import GenerateReq, PrefillReq
from pdserve.router.pairing import Target, direct_reason

from .test_flow import Cluster, cluster_factory  # noqa: F401  (the fixture)
from .util import make_info, make_load

SLO = parse_slo("ttft=1.0,tpot=0.05")


# -- planner arithmetic -----------------------------------------------------------------------------

def test_parse_slo_and_flag_errors_name_the_flag():
    assert (SLO.ttft_s, SLO.tpot_s) == (1.0, 0.05)
    for bad in ("ttft=1", "ttft=x,tpot=1", "ttft=0,tpot=1", "latency=1,tpot=1"):
        with pytest.raises(ValueError, match="^--slo: "):
            parse_slo(bad)
    with pytest.raises(ValueError, match="^--admission-control: needs --slo"):
        DispatchConfig(admission_control=True)
    with pytest.raises(ValueError, match="^--disagg-min-prefill-tokens"):
        RouterConfig(dispatch=DispatchConfig(disagg_min_prefill_tokens=-1))


def test_prefill_nodes_follow_mm1_within_ttft():
    # service 0.2 s -> mu = 5/s; within ttft 1 s a node takes 5 - 1 = 4 req/s.
    assert prefill_nodes_needed(4.0, 0.2, 1.0) == 1
    assert prefill_nodes_needed(4.01, 0.2, 1.0) == 2
    assert prefill_nodes_needed(12.0, 0.2, 1.0) == 3
    assert prefill_nodes_needed(0.0, 0.2, 1.0) == 1
    assert prefill_nodes_needed(1.0, 1.0, 1.0) is None      # an idle node already misses the SLO


def test_decode_fit_and_nodes_by_littles_law():
    fit = fit_decode([[1, 0.012], [2, 0.014], [4, 0.018], [8, 0.026]])   # itl = 10 ms + 2 ms x b
    assert math.isclose(fit.t0, 0.010) and math.isclose(fit.t1, 0.002)
    # tpot 50 ms -> (50 - 10) / 2 = 20 per node; 10 req/s x 100 tokens x 0.05 s = 50 decoding at once.
    assert decode_nodes_needed(10.0, 100, fit, 0.05) == (3, 20)
    assert decode_nodes_needed(10.0, 100, DecodeFit(0.06, 0.001), 0.05) == (None, 0)
    proportional = fit_decode([[2, 0.02], [2, 0.03]])        # one batch size: itl proportional to it
    assert proportional.t0 == 0 and math.isclose(proportional.t1, 0.0125)


def test_plan_and_admission_verdicts():
    stats = WindowStats(window_s=60, request_rate=12.0, mean_prompt_tokens=500, mean_output_tokens=100,
                        ttft_samples=[0.2] * 10 + [0.9] * 30, itl_samples=[[1, 0.012], [8, 0.026]],
                        prefill_nodes=2, decode_nodes=1)
    p = plan(stats, SLO)
    assert (p.prefill_nodes, p.decode_nodes, p.max_batch_per_decode) == (3, 3, 20)
    assert "cannot" not in " ".join(p.notes)
    assert admit(stats, SLO, prefill_queue=3, decode_batch=4).admit            # 4 x 0.2 s <= 1 s
    shed = admit(stats, SLO, prefill_queue=5, decode_batch=4)                  # 6 x 0.2 s > 1 s
    assert not shed.admit and shed.retry_after_s >= 1 and "TTFT" in shed.reason
    itl_shed = admit(stats, SLO, prefill_queue=0, decode_batch=20)             # itl(21) = 52 ms > 50 ms
    assert not itl_shed.admit and "per output token" in itl_shed.reason
    assert admit(stats, SLO, prefill_queue=0, decode_batch=0).admit            # idle nodes: never shed
    empty = WindowStats(window_s=60, request_rate=0.0, prefill_nodes=1, decode_nodes=1)
    assert admit(empty, SLO, prefill_queue=50, decode_batch=50).admit          # no samples: no model


def test_live_window_forgets_old_samples():
    from pdserve.router.dashboard import LiveStats
    live = LiveStats(window_s=0.2)
    live.on_arrival(100)
    live.on_ttft(0.5)
    live.on_itl(0.02, batch=3)
    live.on_transfer("p0", 4_000_000, 2.0)
    w = live.window(prefill_nodes=1, decode_nodes=2)
    assert (w.ttft_samples, w.itl_samples, w.mean_prompt_tokens) == ([0.5], [[3.0, 0.02]], 100)
    assert live.transfer_summary()["gbps_mean"] == pytest.approx(2.0)
    time.sleep(0.3)
    live.on_ttft(0.1)
    w = live.window(prefill_nodes=1, decode_nodes=2)
    assert (w.ttft_samples, w.itl_samples, w.request_rate) == ([0.1], [], 0.0)
    assert live.transfer_summary()["count"] == 0


def test_direct_reason_thresholds():
    p0, d0 = make_info("p0", "prefill"), make_info("d0", "decode")
    nodes, target = {"p0": p0, "d0": d0}, Target(decode=d0, prefill=p0)
    busy = {"p0": make_load("p0", waiting=3, running=2)}
    assert direct_reason(10, 32, 0, nodes, {}, {}, target) == "short_prompt"
    assert direct_reason(32, 32, 0, nodes, busy, {}, target) is None
    assert direct_reason(100, 0, 4, nodes, busy, {}, target) == "prefill_busy"
    assert direct_reason(100, 0, 5, nodes, busy, {}, target) is None
    assert direct_reason(100, 0, 4, nodes, {}, {"p0": 6}, target) == "prefill_busy"   # the router's own count
    assert direct_reason(10, 32, 0, nodes, {}, {}, Target(decode=make_info("c0", "colocated"))) is None


# -- through the real router ------------------------------------------------------------------------

def dispatch_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """{(path, reason): count} from the router's /metrics text."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("pdserve_router_dispatch_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["path"].strip('"'), labels["reason"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def _paths(c: Cluster) -> dict[tuple[str, str], float]:
    return dispatch_counts(c.http.get("/metrics").text)


def test_short_prompts_go_direct_and_long_ones_disaggregate(cluster_factory):
    c = cluster_factory(dispatch=DispatchConfig(disagg_min_prefill_tokens=12))
    short = c.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    long = c.http.post("/v1/completions", json={"prompt": "word " * 40, "max_tokens": 4, "temperature": 0})
    assert short.status_code == long.status_code == 200
    assert short.json()["choices"][0]["text"] == long.json()["choices"][0]["text"] != ""
    gens = c.nodes["d0"].messages(GenerateReq)
    assert [g.transfer_id is None for g in gens] == [True, False]      # short: no transfer; long: P -> D
    assert len(c.nodes["p0"].messages(PrefillReq)) == 1
    assert _paths(c) == {("direct", "short_prompt"): 1.0, ("disagg", "prefill_pool"): 1.0}


def test_n_choices_share_one_prefill_on_the_leaders_decode_node(cluster_factory):
    c = cluster_factory(decode=("d0", "d1"), token_delay_s=0.01)
    client = openai.OpenAI(base_url=c.harness.url + "/v1", api_key="none", max_retries=0, timeout=30)
    resp = client.completions.create(model="smollm2", prompt="word " * 40, n=3, max_tokens=5, temperature=0)
    assert sorted(ch.index for ch in resp.choices) == [0, 1, 2]
    assert len({ch.text for ch in resp.choices}) == 1 and resp.choices[0].text
    prefills = c.nodes["p0"].messages(PrefillReq)
    assert len(prefills) == 1                                          # the prompt went P -> D once
    by_node = {n: c.nodes[n].messages(GenerateReq) for n in ("d0", "d1")}
    holder = next(n for n, gens in by_node.items() if any(g.transfer_id for g in gens))
    assert len(by_node[holder]) == 3                                   # the other two followed it
    assert [g.transfer_id is None for g in by_node[holder]].count(True) == 2
    assert _paths(c) == {("disagg", "prefill_pool"): 1.0, ("direct", "shared_prefix"): 2.0}


def test_admission_control_sheds_with_429_and_retry_after(cluster_factory):
    c = cluster_factory(token_delay_s=0.15, dispatch=DispatchConfig(slo="ttft=5,tpot=0.02", admission_control=True))
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 16, "ignore_eos": True, "temperature": 0,
            "stream": True}   # 16 x 150 ms: still running when the next request comes
    first_done = threading.Event()

    def long_stream():
        with c.http.stream("POST", "/v1/completions", json=body) as resp:
            for _ in resp.iter_lines():
                pass
        first_done.set()
    t = threading.Thread(target=long_stream)
    t.start()
    deadline = time.monotonic() + 10
    while not c.router.live.itl and time.monotonic() < deadline:   # a measured ITL (~150 ms) at batch 1
        time.sleep(0.02)
    client = openai.OpenAI(base_url=c.harness.url + "/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
    err = info.value
    assert err.status_code == 429 and int(err.response.headers["retry-after"]) >= 1
    assert err.body["type"] == "rate_limit_error" and "per output token" in err.body["message"]
    t.join(timeout=20)
    assert first_done.is_set()
    data = c.http.get("/dashboard/data").json()
    assert data["shed"] == 1 and data["plan"]["decode_nodes"] is None   # 150 ms > 20 ms at any size
    assert "pdserve_router_shed_total 1.0" in c.http.get("/metrics").text
    assert len(c.nodes["d0"].messages(GenerateReq)) == 1               # the shed request reached no node
