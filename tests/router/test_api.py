"""OpenAI request validation over real HTTP: every refusal has the right status and OpenAI's shape."""

from __future__ import annotations

import httpx
import pytest

from pdserve.protocol import GenerateReq
from pdserve.router.loopback import ScriptNode, TransferBoard

from .util import RouterHarness, make_router

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def no_nodes(tokenizer, redis_module):
    """A router whose registry is empty."""
    harness = RouterHarness(make_router(tokenizer, redis_module.url, api_key="sekret",
                                        max_request_bytes=4096)).start()
    client = httpx.Client(base_url=harness.url, headers={"Authorization": "Bearer sekret"}, timeout=10)
    yield client
    client.close()
    harness.stop()


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "max_tokens": "four"}, "max_tokens"),
    ({**CHAT, "temperature": -1}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({**CHAT, "frequency_penalty": 3.0}, "frequency_penalty"),
    ({**CHAT, "stop": ["ok", ""]}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({"model": "smollm2", "max_tokens": 3}, "messages"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({**CHAT, "logit_bias": {"1": 5}}, "logit_bias"),
])
def test_invalid_chat_values_are_400_naming_the_field(no_nodes, body, param):
    assert_error(no_nodes.post("/v1/chat/completions", json=body), 400, param=param)


@pytest.mark.parametrize("body, param", [
    ({"model": "smollm2", "prompt": []}, "prompt"),
    ({"model": "smollm2", "prompt": [1, "a"]}, "prompt"),
    ({"model": "smollm2", "prompt": [[1, 2], []]}, "prompt"),
    ({"model": "smollm2", "prompt": [5, 10**9]}, "prompt"),
    ({"model": "smollm2", "prompt": "x", "logprobs": 9}, "logprobs"),
    ({"model": "smollm2", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "smollm2", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "smollm2", "prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
])
def test_invalid_completion_values_are_400(no_nodes, body, param):
    assert_error(no_nodes.post("/v1/completions", json=body), 400, param=param)


def test_malformed_json_and_non_object(no_nodes):
    for raw in (b"{not json", b"[1, 2]", b""):
        resp = no_nodes.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        assert_error(resp, 400)


def test_unknown_model_is_404(no_nodes):
    assert_error(no_nodes.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404,
                 param="model", code="model_not_found")


def test_api_key(no_nodes):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        resp = httpx.post(str(no_nodes.base_url) + "/v1/chat/completions", json=CHAT, headers=headers)
        assert_error(resp, 401, code="invalid_api_key")
    assert_error(httpx.get(str(no_nodes.base_url) + "/v1/models"), 401)
    assert httpx.get(str(no_nodes.base_url) + "/health").status_code == 503   # probes stay open


def test_request_too_large_is_413(no_nodes):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(no_nodes.post("/v1/chat/completions", json=body), 413)


def test_no_nodes_is_503_and_unhealthy(no_nodes):
    assert_error(no_nodes.post("/v1/chat/completions", json=CHAT), 503)
    assert_error(no_nodes.post("/v1/completions", json={"prompt": "hi", "stream": True}), 503)
    health = no_nodes.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"


def test_unknown_route_and_method_have_openai_shape(no_nodes):
    assert_error(no_nodes.post("/v1/moderations", json={}), 404)
    assert_error(no_nodes.post("/v1/embeddings", json={}), 400)             # a route now: missing `input`
    assert_error(no_nodes.post("/v1/embeddings", json={"input": "x"}), 503)  # no node at all
    assert_error(no_nodes.get("/v1/chat/completions"), 405)


def test_models_lists_the_served_name(no_nodes):
    data = no_nodes.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == ["smollm2"]


def test_context_length_refused_or_truncated(tokenizer, redis_server):
    board = TransferBoard()
    reply = tokenizer.encode("ok")
    nodes = [ScriptNode(redis_server.url, "p0", "prefill", reply, board=board, context_length=64).start(),
             ScriptNode(redis_server.url, "d0", "decode", reply, board=board, context_length=64).start()]
    strict = RouterHarness(make_router(tokenizer, redis_server.url)).start()
    lenient = RouterHarness(make_router(tokenizer, redis_server.url, allow_auto_truncate=True)).start()
    try:
        long_prompt = {"model": "smollm2", "prompt": "word " * 100, "max_tokens": 8}
        assert_error(httpx.post(strict.url + "/v1/completions", json=long_prompt), 400, param="prompt",
                     code="context_length_exceeded")
        resp = httpx.post(lenient.url + "/v1/completions", json=long_prompt, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["prompt_tokens"] == 64 - 8
        sent = nodes[1].messages(GenerateReq)
        assert len(sent[-1].input_ids) == 56
        # max_tokens alone beyond the context cannot be truncated away.
        assert_error(httpx.post(lenient.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 64}), 400,
                     code="context_length_exceeded")
        # And the server keeps serving after refusals.
        ok = httpx.post(strict.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert ok.status_code == 200
    finally:
        strict.stop()
        lenient.stop()
        for node in nodes:
            node.stop()
