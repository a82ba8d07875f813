"""The grammar mask, request checks and tool-call parsing, with the real xgrammar and the real
SmolLM2 tokenizer (no model: logits here are random, what matters is which tokens survive)."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.config import GrammarConfig
from pdserve.router.api_types import ChatRequest, parse_request, sampling_params
from pdserve.router.errors import APIError
from pdserve.router.tools import parse_tool_calls, tool_grammar
from pdserve.runtime.grammar import GrammarBackend, check_whitespace_pattern
from pdserve.runtime.request import Request
from pdserve.runtime.sampler import Sampler
from pdserve.sampling_params import GrammarSpec, SamplingParams
from tests.structured.cases import PERSON_SCHEMA, WEATHER_TOOL

VOCAB = 49152
INT_SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(lambda: tokenizer, VOCAB)


def allowed(backend: GrammarBackend, req: Request) -> torch.Tensor:
    logits = torch.zeros(1, VOCAB)
    backend.mask_logits(logits, [req])
    return logits[0] > float("-inf")        # [V] bool


def request_with(tokenizer, spec: GrammarSpec, text_so_far: str) -> Request:
    req = Request(rid="r", prompt_ids=[1, 2, 3], params=SamplingParams(grammar=spec))
    req.output_ids = tokenizer.encode(text_so_far) if text_so_far else []
    return req


def test_mask_follows_output_so_far(backend, tokenizer):
    """After '{"a": ' only an integer may follow: digits survive, a letter and a quote do not.
    The output arrives all at once (as on a decode node whose first token came from prefill)."""
    req = request_with(tokenizer, GrammarSpec(kind="json_schema", source=INT_SCHEMA), '{"a": ')
    ok = allowed(backend, req)
    assert ok[tokenizer.token_to_id("1")] and ok[tokenizer.token_to_id("7")]
    assert not ok[tokenizer.token_to_id("x")] and not ok[tokenizer.token_to_id('"')]
    req.output_ids += tokenizer.encode("12")      # catches up with later tokens too
    ok = allowed(backend, req)
    assert ok[tokenizer.token_to_id("}")] and not ok[tokenizer.token_to_id("x")]


def test_first_token_is_masked_and_rows_without_grammar_are_untouched(backend, tokenizer):
    req = request_with(tokenizer, GrammarSpec(kind="json_object"), "")
    free = Request(rid="free", prompt_ids=[1], params=SamplingParams())
    logits = torch.zeros(2, VOCAB)
    backend.mask_logits(logits, [free, req])
    assert bool((logits[0] == 0).all())
    ok = logits[1] > float("-inf")
    assert ok[tokenizer.token_to_id("{")] and not ok[tokenizer.token_to_id("[")]
    assert not ok[tokenizer.eos_token_ids[0]]     # an empty output is no JSON object


def test_eos_only_once_the_document_is_complete(backend, tokenizer):
    req = request_with(tokenizer, GrammarSpec(kind="json_schema", source=INT_SCHEMA), '{"a": 3}')
    ok = allowed(backend, req)
    assert ok[tokenizer.eos_token_ids[0]] and int(ok.sum()) == 1


def test_whitespace_pattern(tokenizer):
    """Default JSON is compact (no space after '{'); --constrained-json-whitespace-pattern allows it."""
    spec = GrammarSpec(kind="json_schema", source=INT_SCHEMA)
    space = tokenizer.token_to_id("Ġ")
    compact = GrammarBackend(lambda: tokenizer, VOCAB)
    spaced = GrammarBackend(lambda: tokenizer, VOCAB, ws_pattern=r"[ ]{0,2}")
    assert not allowed(compact, request_with(tokenizer, spec, "{"))[space]
    assert allowed(spaced, request_with(tokenizer, spec, "{"))[space]
    assert not allowed(spaced, request_with(tokenizer, spec, "{  "))[space]   # at most 2
    with pytest.raises(ValueError, match="--constrained-json-whitespace-pattern"):
        check_whitespace_pattern("(")


def test_grammar_backend_flag():
    with pytest.raises(ValueError, match="--grammar-backend"):
        GrammarConfig(grammar_backend="outlines")
    with pytest.raises(ValueError, match="--constrained-json-whitespace-pattern"):
        GrammarConfig(constrained_json_whitespace_pattern="[")
    params = SamplingParams(grammar=GrammarSpec(kind="json_object"))
    with pytest.raises(ValueError, match=r"^response_format: .*--grammar-backend none"):
        Sampler(VOCAB, grammar=None).check_grammar(params)


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not-a-schema"}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "tools"),
    ({"regex": "(", "max_tokens": 5}, "regex"),
])
def test_bad_requests_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as info:
        req = parse_request(chat_body(**fields), ChatRequest)
        sampling_params(req, 8)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_request_to_grammar():
    req = parse_request(chat_body(response_format={"type": "json_schema",
                                                   "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}), ChatRequest)
    spec = sampling_params(req, 8).grammar
    assert spec.kind == "json_schema" and json.loads(spec.source) == PERSON_SCHEMA
    req = parse_request(chat_body(tools=[WEATHER_TOOL], tool_choice="none"), ChatRequest)
    assert sampling_params(req, 8).grammar is None
    req = parse_request(chat_body(tools=[WEATHER_TOOL]), ChatRequest)
    assert sampling_params(req, 8).grammar.kind == "structural_tag"


def test_tool_grammar_forces_the_named_call(backend, tokenizer):
    spec = tool_grammar([WEATHER_TOOL], {"type": "function", "function": {"name": "get_weather"}})
    req = request_with(tokenizer, spec, "<tool_call>\n")
    ok = allowed(backend, req)
    assert ok[tokenizer.encode('{"')[0]] and not ok[tokenizer.token_to_id("Hello")]


def test_parse_tool_calls():
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro')
    content, calls = parse_tool_calls(text)
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert content.startswith("Sure.") and "Ro" in content       # the cut-off call stays text
    assert parse_tool_calls("plain answer") == ("plain answer", [])
