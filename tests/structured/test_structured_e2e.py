"""End to end: `pdserve up` (real Redis, real node processes, the router) in P/D mode (1 prefill +
1 decode: the prefill node samples the first token under the grammar, the decode node the rest)
and colocated, driven with the official openai client and the real SmolLM2. Every output parses
and validates against its schema; tool calls come back in OpenAI's shape."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.structured.cases import PERSON_PROMPT, PERSON_SCHEMA, WEATHER_PROMPT, WEATHER_TOOL
from tests.up_procs import start_up, stop_up

pytestmark = pytest.mark.slow

MODES = {"pd": ["--prefill", "1", "--decode", "1"], "colocated": ["--colocated", "1"]}
PERSON = [{"role": "user", "content": PERSON_PROMPT}]
WEATHER = [{"role": "user", "content": WEATHER_PROMPT}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
ARGS_SCHEMA = WEATHER_TOOL["function"]["parameters"]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# The colocated engine path is also covered by test_structured_engine.py: through `pdserve up` the
# colocated node runs the core cases, the P/D pair (two samplers, one grammar) all of them.
pd_only = pytest.mark.parametrize("client", ["pd"], indirect=True)


@pytest.fixture(scope="module", params=list(MODES))
def client(request, tmp_path_factory):
    up = start_up(tmp_path_factory.mktemp(f"up-{request.param}"), *MODES[request.param],
                  "--max-total-tokens", "4096", "--cpu-threads", "1")
    try:
        yield up.client
    finally:
        stop_up(up)


def test_json_schema_greedy_and_sampled(client):
    greedy = client.chat.completions.create(model="smollm2", messages=PERSON, max_tokens=40, temperature=0,
                                            response_format=PERSON_FORMAT)
    sampled = client.chat.completions.create(model="smollm2", messages=PERSON, max_tokens=40, temperature=1.0,
                                             seed=7, n=2, response_format=PERSON_FORMAT)
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)


@pd_only
def test_json_object_streamed(client):
    stream = client.chat.completions.create(model="smollm2", messages=PERSON, max_tokens=40, temperature=0.8,
                                            seed=1, stream=True, response_format={"type": "json_object"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


def test_tool_call_named(client):
    check_one_call(client.chat.completions.create(model="smollm2", messages=WEATHER, max_tokens=60, temperature=0,
                                                  tools=[WEATHER_TOOL], tool_choice=NAMED))


@pd_only
def test_tool_call_required(client):
    check_one_call(client.chat.completions.create(model="smollm2", messages=WEATHER, max_tokens=60, temperature=0,
                                                  tools=[WEATHER_TOOL], tool_choice="required",
                                                  parallel_tool_calls=False))


def check_one_call(res) -> None:
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), ARGS_SCHEMA)


@pd_only
def test_tool_call_streamed_then_answered(client):
    stream = client.chat.completions.create(model="smollm2", messages=WEATHER, max_tokens=60, temperature=0.7,
                                            seed=1, tools=[WEATHER_TOOL], tool_choice="required",
                                            parallel_tool_calls=False, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].function.arguments), ARGS_SCHEMA)
    history = [*WEATHER, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": calls[0].id, "type": "function",
                    "function": {"name": calls[0].function.name, "arguments": calls[0].function.arguments}}]},
               {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}]
    res = client.chat.completions.create(model="smollm2", messages=history, max_tokens=12, temperature=0,
                                         tools=[WEATHER_TOOL], tool_choice="none")
    assert res.choices[0].message.content and not res.choices[0].message.tool_calls


@pd_only
def test_auto_is_text_or_valid_calls(client):
    res = client.chat.completions.create(model="smollm2", messages=WEATHER, max_tokens=30, temperature=0,
                                         tools=[WEATHER_TOOL])
    msg = res.choices[0].message
    assert msg.content or msg.tool_calls
    for call in msg.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), ARGS_SCHEMA)


@pytest.mark.parametrize("kwargs, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
])
def test_invalid_structured_requests_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=PERSON, max_tokens=5, **kwargs)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert info.value.body["message"].startswith(param + ":")
