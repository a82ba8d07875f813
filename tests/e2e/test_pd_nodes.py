"""Prefill node -> decode node as real processes, KV pushed over real NIXL/UCX (DRAM on CPU).

The test plays the router: it binds a PULL socket, sends PrefillReq / GenerateReq with one
transfer id, and reads the decode node's TokenOut stream and the prefill node's PrefillStatus.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import msgspec
import pytest
import zmq

from pdserve.protocol import (AbortReq, GenerateReq, NodeStats, PrefillReq, PrefillStatus, StatsReq, TokenOut,
                              decode_router_message, encode)
from pdserve.sampling_params import SamplingParams
from tests.parity_cases import PARITY_NEW_TOKENS

pytestmark = pytest.mark.slow

NODE_FLAGS = ["--max-total-tokens", "8192", "--chunked-prefill-size", "128", "--max-prefill-tokens", "256",
              "--page-size", "16", "--peer-timeout-s", "2.0", "--heartbeat-interval-s", "0.3", "--cpu-threads", "1"]


def start_node(role: str, model: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", role, "--model-path", model, *NODE_FLAGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return proc, json.loads(line[len("READY "):])
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{role} node exited: {proc.stderr.read()[-3000:]}")
    proc.kill()
    raise RuntimeError(f"{role} node did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Router:
    """The test's stand-in for the router's socket side (the real router has its own tests)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self.push: dict[str, zmq.Socket] = {}

    def send(self, node: dict, msg) -> None:
        if node["addr"] not in self.push:
            s = self.ctx.socket(zmq.PUSH)
            s.connect(node["addr"])
            self.push[node["addr"]] = s
        self.push[node["addr"]].send(encode(msg))

    def submit(self, p: dict, d: dict, ids: list[int], params: SamplingParams) -> str:
        rid = uuid.uuid4().hex[:8]
        self.send(d, GenerateReq(rid=rid, input_ids=ids, sampling=params, reply_to=self.addr, transfer_id=rid,
                                 prefill_bootstrap=p["bootstrap"]))
        self.send(p, PrefillReq(rid=rid, transfer_id=rid, input_ids=ids, sampling=params, reply_to=self.addr))
        return rid

    def recv(self, timeout_s: float):
        if not self.pull.poll(int(timeout_s * 1000)):
            return None
        return decode_router_message(self.pull.recv())

    def collect(self, rids: set[str], timeout_s: float = 120) -> dict[str, dict]:
        out = {r: {"tokens": [], "logprobs": [], "finish": None, "error": None, "prefill": None} for r in rids}
        deadline = time.time() + timeout_s
        while any(v["finish"] is None for v in out.values()) and time.time() < deadline:
            msg = self.recv(1.0)
            if isinstance(msg, TokenOut) and msg.rid in out:
                o = out[msg.rid]
                o["tokens"] += msg.token_ids
                o["logprobs"] += msg.logprobs or []
                if msg.finish_reason:
                    o["finish"], o["error"] = msg.finish_reason, msg.error
            elif isinstance(msg, PrefillStatus) and msg.rid in out:
                out[msg.rid]["prefill"] = msg
        return out

    def stats(self, node: dict) -> NodeStats:
        self.send(node, StatsReq(reply_to=self.addr))
        deadline = time.time() + 10
        while time.time() < deadline:
            msg = self.recv(1.0)
            if isinstance(msg, NodeStats) and msg.node_id == node["node_id"]:
                return msg
        raise TimeoutError("no stats")


@pytest.fixture(scope="module")
def cluster(smollm2_path):
    p, pinfo = start_node("prefill", smollm2_path)
    d, dinfo = start_node("decode", smollm2_path)
    yield {"p": p, "pinfo": pinfo, "d": d, "dinfo": dinfo, "router": Router()}
    stop(p)
    stop(d)


def assert_parity(results: dict[str, dict], rids: dict[str, int], expected) -> None:
    """Every request ran to its length with transformers' tokens and logprobs (1e-4)."""
    for rid, i in rids.items():
        res = results[rid]
        assert res["error"] is None and res["finish"] == "length", res
        assert res["tokens"] == expected[i][0], f"prompt {i}"
        assert res["logprobs"] == pytest.approx(expected[i][1], abs=1e-4)


GREEDY = SamplingParams(temperature=0, max_new_tokens=PARITY_NEW_TOKENS, ignore_eos=True, logprobs=True)


def test_pd_output_is_token_identical_to_transformers(cluster, parity_prompts, parity_expected):
    r, p, d = cluster["router"], cluster["pinfo"], cluster["dinfo"]
    picks = [0, 3, 5, 7]                       # 5, 100, 513 (5 chunks) and 1,200 tokens (10 chunks)
    rids = {r.submit(p, d, parity_prompts[i], GREEDY): i for i in picks}   # all in flight together
    results = r.collect(set(rids))
    assert_parity(results, rids, parity_expected)
    statuses = [results[rid]["prefill"] for rid in rids]
    assert all(s is not None and s.ok for s in statuses)
    big = results[next(rid for rid, i in rids.items() if i == 7)]["prefill"]
    assert big.kv_bytes == -(-1200 // 16) * 16 * 30 * 2 * 3 * 64 * 4    # 75 pages of all 30 layers' K and V
    # one contiguous run per chunk write (<= 10 chunks of 128 plus page-boundary splits), never one
    # per page and layer (75 x 30 x 2 = 4,500)
    assert 1 <= big.num_descriptors <= 16


def test_nodes_return_to_baseline_pages(cluster):
    r = cluster["router"]
    for info in (cluster["pinfo"], cluster["dinfo"]):
        s = r.stats(info)
        assert s.waiting == 0 and s.running == 0
        assert s.free_pages + s.cached_pages == s.total_pages, s


def test_cancel_from_decode_stops_prefill_and_frees_pages(cluster, parity_prompts):
    r, p, d = cluster["router"], cluster["pinfo"], cluster["dinfo"]
    long_prompt = (parity_prompts[7] * 5)[:6000]
    rid = r.submit(p, d, long_prompt, SamplingParams(temperature=0, max_new_tokens=4))
    time.sleep(1.0)                              # prefill is a few chunks in
    r.send(d, AbortReq(rid=rid))
    res = r.collect({rid}, timeout_s=30)[rid]
    assert res["finish"] == "abort"
    deadline = time.time() + 10
    while time.time() < deadline:
        ps, ds = r.stats(p), r.stats(d)
        if ps.running == 0 and ps.waiting == 0 and ds.free_pages + ds.cached_pages == ds.total_pages \
                and ps.free_pages + ps.cached_pages == ps.total_pages:
            break
        time.sleep(0.3)
    assert ps.running == 0 and ps.free_pages + ps.cached_pages == ps.total_pages, ps
    assert ds.free_pages + ds.cached_pages == ds.total_pages, ds


def test_killing_prefill_mid_transfer_fails_the_request_within_5s(cluster, parity_prompts, smollm2_path):
    r, d = cluster["router"], cluster["dinfo"]
    p2, p2info = start_node("prefill", smollm2_path)
    try:
        rid = r.submit(p2info, d, (parity_prompts[7] * 5)[:6000], SamplingParams(temperature=0, max_new_tokens=4))
        time.sleep(1.0)
        os.killpg(p2.pid, signal.SIGKILL)
        killed = time.time()
        res = r.collect({rid}, timeout_s=15)[rid]
        assert res["finish"] == "error" and res["error"], res
        assert time.time() - killed < 5.0
    finally:
        stop(p2)
    ds = r.stats(d)
    assert ds.free_pages + ds.cached_pages == ds.total_pages, ds


def test_page_size_mismatch_fails_at_handshake_naming_both(cluster, smollm2_path):
    r, p = cluster["router"], cluster["pinfo"]
    d2, d2info = start_node("decode", smollm2_path, "--page-size", "32")
    try:
        rid = r.submit(p, d2info, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=2))
        res = r.collect({rid}, timeout_s=20)[rid]
        assert res["finish"] == "error"
        assert "16" in res["error"] and "32" in res["error"] and "page size" in res["error"], res["error"]
    finally:
        stop(d2)
