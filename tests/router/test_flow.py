"""The request path through scripted nodes: output shapes, stop handling, failover, aborts.

The nodes here are loopback ``ScriptNode``s (real sockets, real registry, scripted tokens), so faults can
be injected precisely; the same behaviours against real model nodes are in test_e2e_up.py.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from pdserve.protocol import AbortReq, GenerateReq, PrefillReq
from pdserve.router.loopback import ScriptNode, TransferBoard

from .util import RouterHarness, make_router, sse_events

ANSWER = "The capital of France is Paris."
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32, "temperature": 0}


class Cluster:
    """Loopback nodes + a router in this process. ttl_s=2: the nodes' heartbeat threads share the GIL
    with the router, uvicorn and the client here, and a 1 s TTL lapsed now and then on a loaded box
    (a live node dropped from the registry fails its in-flight requests, as it should)."""

    def __init__(self, tokenizer, redis_url: str, prefill=("p0",), decode=("d0",), colocated=(), *,
                 token_delay_s: float = 0.0, prefill_modes: dict | None = None, ttl_s: float = 2.0, **router_kw):
        self.board = TransferBoard()
        reply = tokenizer.encode(ANSWER)
        modes = prefill_modes or {}
        kw = dict(board=self.board, token_delay_s=token_delay_s, ttl_s=ttl_s, eos_id=tokenizer.eos_token_ids[0])
        self.nodes = {n: ScriptNode(redis_url, n, "prefill", reply, prefill_mode=modes.get(n, "ok"), **kw)
                      for n in prefill}
        self.nodes.update({n: ScriptNode(redis_url, n, "decode", reply, **kw) for n in decode})
        self.nodes.update({n: ScriptNode(redis_url, n, "colocated", reply, **kw) for n in colocated})
        for node in self.nodes.values():
            node.start()
        self.router = make_router(tokenizer, redis_url, **router_kw)
        self.harness = RouterHarness(self.router).start()
        self.router.view.wait_for(lambda n: len(n) == len(self.nodes), 3.0)
        self.http = httpx.Client(base_url=self.harness.url, timeout=20)

    def close(self) -> None:
        self.http.close()
        self.harness.stop()
        for node in self.nodes.values():
            if node._thread.is_alive():
                node.stop()


@pytest.fixture
def cluster_factory(tokenizer, redis_server):
    made = []

    def make(**kw) -> Cluster:
        made.append(Cluster(tokenizer, redis_server.url, **kw))
        return made[-1]
    yield make
    for c in made:
        c.close()


def stream_text(events: list, index: int = 0) -> str:
    parts = []
    for ev in events:
        if ev == "[DONE]" or not ev["choices"]:
            continue
        ch = ev["choices"][0]
        if ch["index"] == index:
            parts.append(ch["delta"].get("content") or "" if "delta" in ch else ch["text"])
    return "".join(parts)


def wait_for_content(lines) -> None:
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return
    raise AssertionError("the stream ended without content")


def test_chat_pd_nonstream_and_stream_agree(cluster_factory, tokenizer):
    c = cluster_factory()
    resp = c.http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "smollm2"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER}
    assert choice["finish_reason"] == "stop"
    prompt = tokenizer.apply_chat_template([CHAT["messages"][0]], add_generation_prompt=True)
    n_prompt, n_out = len(tokenizer.encode(prompt)), len(tokenizer.encode(ANSWER)) + 1   # + EOS
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    # The prefill node got the same token ids, with the decode node's transfer id.
    gen, pre = c.nodes["d0"].messages(GenerateReq)[-1], c.nodes["p0"].messages(PrefillReq)[-1]
    assert gen.transfer_id == pre.transfer_id == gen.rid and gen.rid.endswith("-0-0")
    assert gen.input_ids == pre.input_ids and gen.prefill_bootstrap == "script://p0"

    resp = c.http.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream_text(events) == ANSWER
    finals = [ev for ev in events[:-1] if ev["choices"] and ev["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["stop"]
    assert events[-2]["choices"] == [] and events[-2]["usage"] == body["usage"]
    assert all(ev["usage"] is None for ev in events[:-2])


def test_completions_n_and_prompt_lists_and_echo(cluster_factory, tokenizer):
    c = cluster_factory()
    ids, ids2 = tokenizer.encode("Hello there"), tokenizer.encode("Bonjour")
    resp = c.http.post("/v1/completions", json={"prompt": [ids, ids2], "n": 2, "max_tokens": 3, "echo": True})
    body = resp.json()
    assert resp.status_code == 200, body
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    three = tokenizer.decode(tokenizer.encode(ANSWER)[:3])
    assert body["choices"][0]["text"] == "Hello there" + three
    assert body["choices"][3]["text"] == "Bonjour" + three
    assert all(ch["finish_reason"] == "length" for ch in body["choices"])
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] == len(ids) + len(ids2)
    body = c.http.post("/v1/completions", json={"prompt": ["a", "b c"], "max_tokens": 1}).json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    # Streamed: every choice index appears, each ends once.
    events = sse_events(c.http.post("/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 3,
                                                            "stream": True}).text)
    ends = [ev["choices"][0]["index"] for ev in events[:-1] if ev["choices"][0]["finish_reason"]]
    assert sorted(ends) == [0, 1, 2]
    assert all(stream_text(events, i) == three for i in range(3))


def test_stop_string_split_over_tokens_never_leaks(cluster_factory):
    c = cluster_factory(token_delay_s=0.02)
    for stop in (["Paris"], ["s Par", "nothing"], "France is"):
        body = c.http.post("/v1/chat/completions", json={**CHAT, "stop": stop}).json()
        first = stop if isinstance(stop, str) else stop[0]
        assert body["choices"][0]["message"]["content"] == ANSWER[:ANSWER.index(first)]
        assert body["choices"][0]["finish_reason"] == "stop"
        events = sse_events(c.http.post("/v1/chat/completions", json={**CHAT, "stop": stop, "stream": True}).text)
        assert stream_text(events) == ANSWER[:ANSWER.index(first)]
    # The router aborted the rest of the generation on the decode node.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and c.nodes["d0"].active:
        time.sleep(0.02)
    assert not c.nodes["d0"].active
    assert len(c.nodes["d0"].messages(AbortReq)) >= 6


def test_stop_token_ids_and_max_tokens(cluster_factory, tokenizer):
    c = cluster_factory()
    ids = tokenizer.encode(ANSWER)
    body = c.http.post("/v1/chat/completions", json={**CHAT, "stop_token_ids": [ids[3]]}).json()
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(ids[:3])
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 4
    body = c.http.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 2, "max_tokens": 9}).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
    body = c.http.post("/v1/chat/completions", json={**CHAT, "ignore_eos": True, "max_tokens": 20}).json()
    assert body["usage"]["completion_tokens"] == 20 and body["choices"][0]["finish_reason"] == "length"


def test_logprobs_shapes(cluster_factory):
    c = cluster_factory()
    body = c.http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2,
                                                     "max_tokens": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert content[0]["token"] == "The" and content[0]["bytes"] == list(b"The") and content[0]["logprob"] == -0.25
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.25, -2.0]
    body = c.http.post("/v1/completions", json={"prompt": "Hi", "logprobs": 1, "max_tokens": 3}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    events = sse_events(c.http.post("/v1/completions", json={"prompt": "Hi", "logprobs": 1, "max_tokens": 3,
                                                            "stream": True}).text)
    streamed = [t for ev in events[:-1] for t in ev["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


def test_failed_prefill_is_retried_invisibly(cluster_factory):
    c = cluster_factory(prefill=("p0", "p1"), prefill_modes={"p0": "fail"}, policy="round_robin")
    for _ in range(2):
        body = c.http.post("/v1/chat/completions", json=CHAT).json()
        assert body["choices"][0]["message"]["content"] == ANSWER
    assert len(c.nodes["p0"].messages(PrefillReq)) == 1      # tried once, excluded on the retry
    aborted = {m.rid for m in c.nodes["d0"].messages(AbortReq)}
    first_attempt = c.nodes["p0"].messages(PrefillReq)[0].rid
    assert first_attempt in aborted and first_attempt.endswith("-0")
    assert b'pdserve_router_prefill_retries_total{reason="prefill_failed"} 1.0' in c.http.get("/metrics").content


def test_all_prefills_failing_is_503_after_bounded_retries(cluster_factory):
    c = cluster_factory(prefill=("p0", "p1", "p2"), prefill_modes={n: "fail" for n in ("p0", "p1", "p2")},
                        max_prefill_retries=1)
    resp = c.http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "prefill_failed"
    assert sum(len(c.nodes[n].messages(PrefillReq)) for n in ("p0", "p1", "p2")) == 2


def test_a_lone_prefill_node_is_retried_after_a_transient_failure(cluster_factory):
    c = cluster_factory(prefill_modes={"p0": "fail"}, max_prefill_retries=2)
    resp = c.http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 503
    assert len(c.nodes["p0"].messages(PrefillReq)) == 3      # every attempt, as no other node exists
    c.nodes["p0"].prefill_mode = "ok"
    assert c.http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_prefill_node_dying_before_first_token_fails_over(cluster_factory):
    c = cluster_factory(prefill=("p0", "p1"), prefill_modes={"p0": "hang"}, policy="round_robin")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", c.http.post("/v1/chat/completions", json=CHAT)))
    t.start()
    deadline = time.monotonic() + 2
    while not c.nodes["p0"].messages(PrefillReq) and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    c.nodes["p0"].kill()
    t.join(timeout=10)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"] == ANSWER
    assert time.monotonic() - t0 < 5.0
    assert c.nodes["p1"].messages(PrefillReq)


def test_decode_node_dying_mid_stream_ends_with_error_event(cluster_factory):
    c = cluster_factory(token_delay_s=0.2)
    with c.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        wait_for_content(lines)            # real content has arrived; now kill the decode node
        t0 = time.monotonic()
        c.nodes["d0"].kill()
        rest = [line for line in lines if line]
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "node_lost" and error["type"] == "server_error"


def test_client_disconnect_aborts_on_both_nodes(cluster_factory):
    c = cluster_factory(token_delay_s=0.05)
    long = {**CHAT, "ignore_eos": True, "max_tokens": 200}      # 10 s of tokens unless aborted
    with c.http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as resp:
        wait_for_content(resp.iter_lines())
        assert not c.nodes["d0"].messages(AbortReq)
    # Stream closed by the client mid-generation.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and c.nodes["d0"].active:
        time.sleep(0.02)
    assert not c.nodes["d0"].active
    rid = c.nodes["d0"].messages(GenerateReq)[-1].rid
    assert rid in {m.rid for m in c.nodes["d0"].messages(AbortReq)}
    assert rid in {m.rid for m in c.nodes["p0"].messages(AbortReq)}
    # Non-streaming too: the client gives up waiting.
    with pytest.raises(httpx.ReadTimeout):
        c.http.post("/v1/chat/completions", json=long, timeout=0.5)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and c.nodes["d0"].active:
        time.sleep(0.02)
    assert not c.nodes["d0"].active
    assert c.router.inflight() == {}


def test_colocated_nodes_serve_when_there_is_no_pair(cluster_factory):
    c = cluster_factory(prefill=(), decode=(), colocated=("c0",))
    assert c.http.get("/health").json()["colocated"] == 1
    body = c.http.post("/v1/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    gen = c.nodes["c0"].messages(GenerateReq)[-1]
    assert gen.transfer_id is None and gen.prefill_bootstrap is None


def test_nodes_and_metrics_endpoints(cluster_factory):
    c = cluster_factory()
    c.http.post("/v1/chat/completions", json=CHAT)
    time.sleep(0.3)
    nodes = c.http.get("/nodes").json()
    assert {n["node_id"]: n["role"] for n in nodes["nodes"]} == {"p0": "prefill", "d0": "decode"}
    assert nodes["registry_connected"] and all(n["load"]["total_pages"] == 128 for n in nodes["nodes"])
    deadline = time.time() + 10            # the prefill node's status may trail the response
    while 'pdserve_transfer_gbps{prefill_node="p0"}' not in (text := c.http.get("/metrics").text) \
            and time.time() < deadline:
        time.sleep(0.1)
    for name in ("pdserve_router_ttft_seconds_count 1.0", "pdserve_router_e2e_seconds_count 1.0",
                 'pdserve_router_requests_total{endpoint="chat",status="200"} 1.0',
                 'pdserve_node_free_pages{node_id="d0",role="decode"} 128.0', "pdserve_transfer_kv_bytes_total",
                 'pdserve_transfer_gbps{prefill_node="p0"}'):
        assert name in text, name
    health = c.http.get("/health").json()
    assert 0 <= health.pop("registry_age_s") < 5        # seconds since the registry was last read
    assert health == {"status": "ok", "registry_connected": True, "prefill": 1, "decode": 1, "colocated": 0}
