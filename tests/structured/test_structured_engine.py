"""Structured output in the colocated engine (Python API) with the real SmolLM2: every output,
greedy or sampled, in one batch with an unconstrained request, parses and matches its schema."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdserve.router.tools import parse_tool_calls, tool_grammar
from tests.structured.cases import PERSON_PROMPT, PERSON_SCHEMA, WEATHER_PROMPT, WEATHER_TOOL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    from pdserve.runtime.engine import Engine

    eng = Engine("smollm2", cpu_threads=1, max_total_tokens=4096)
    yield eng
    close = getattr(eng, "close", None)
    if close is not None:
        close()


def test_json_schema_greedy_and_sampled_in_one_batch(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": PERSON_PROMPT}])
    grammar = {"kind": "json_schema", "source": json.dumps(PERSON_SCHEMA)}
    params = [{"temperature": 0.0, "max_new_tokens": 40, "grammar": grammar},
              {"temperature": 1.0, "seed": 1, "max_new_tokens": 40, "grammar": grammar},
              {"temperature": 1.0, "seed": 2, "max_new_tokens": 40, "grammar": {"kind": "json_object"}},
              {"temperature": 0.0, "max_new_tokens": 8}]                      # unconstrained neighbour
    out = engine.generate([prompt] * 4, params)
    for res in out[:2]:
        assert res["finish_reason"] == "stop", res
        jsonschema.validate(json.loads(res["text"]), PERSON_SCHEMA)
    assert out[2]["finish_reason"] == "stop" and isinstance(json.loads(out[2]["text"]), dict)
    assert not out[3]["text"].startswith("{")         # the mask stayed on its own rows
    again = engine.generate(prompt, params[0])
    assert again[0]["text"] == out[0]["text"]         # greedy under a grammar is deterministic


def test_tool_call_arguments_match_the_parameters(engine):
    tools = [WEATHER_TOOL]
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": WEATHER_PROMPT}], tools=tools)
    assert "get_weather" in prompt and "<tool_call>" in prompt       # the tools reached the prompt
    spec = tool_grammar(tools, "required", parallel=False)
    res = engine.generate(prompt, {"temperature": 0.7, "seed": 5, "max_new_tokens": 60,
                                   "grammar": {"kind": spec.kind, "source": spec.source}})[0]
    assert res["finish_reason"] == "stop", res
    content, calls = parse_tool_calls(res["text"])
    assert content is None and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])


def test_regex_and_ebnf(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Give me a phone number."}])
    out = engine.generate([prompt, prompt], [
        {"temperature": 1.0, "seed": 3, "max_new_tokens": 12, "grammar": {"kind": "regex", "source": r"\d{3}-\d{4}"}},
        {"temperature": 0.0, "max_new_tokens": 6, "grammar": {"kind": "ebnf", "source": 'root ::= "yes" | "no"'}}])
    assert re.fullmatch(r"\d{3}-\d{4}", out[0]["text"]) and out[0]["finish_reason"] == "stop"
    assert out[1]["text"] in ("yes", "no") and out[1]["finish_reason"] == "stop"


def test_bad_grammar_is_refused_before_it_runs(engine):
    with pytest.raises(ValueError, match="^response_format: invalid JSON schema"):
        engine.generate("hi", {"grammar": {"kind": "json_schema", "source": '{"type": "nope"}'}})
    with pytest.raises(ValueError, match="^grammar: kind must be one of"):
        engine.generate("hi", {"grammar": {"kind": "yaml"}})
