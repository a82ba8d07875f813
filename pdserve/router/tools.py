"""Structured output at the router: ``response_format`` / ``tools`` / ``regex`` / ``ebnf`` -> a
``GrammarSpec`` for the nodes, and tool calls parsed back out of the generated text.

Tool calls use the Hermes format (Qwen, SmolLM2's larger siblings and many fine-tunes)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The grammar is an xgrammar structural tag: ``tool_choice="auto"`` lets the model write text and
constrains what follows each ``<tool_call>`` trigger to one of the tools, with arguments matching
its ``parameters`` schema; ``"required"`` makes the output one or more tool calls; a named function
makes it exactly one call of that function; ``"none"`` (or no tools) leaves the output free. The
chat template gets the tools (``tokenizer.apply_chat_template(..., tools=...)``), which describes
them in a system message when the template itself does not take ``tools``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from pdserve.router.errors import bad_request
from pdserve.router.responses import sse
from pdserve.sampling_params import GrammarSpec

TOOL_CALL_BEGIN, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
ANY_OBJECT = {"type": "object"}


def check_tools(tools: list[Any] | None, tool_choice: Any) -> None:
    """400 naming ``tools`` / ``tool_choice`` for anything not in OpenAI's function-tool shape."""
    names = [function_of(t, i)["name"] for i, t in enumerate(tools or [])]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", param="tools")
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise bad_request("tool_choice: 'required' needs at least one tool", param="tool_choice")
        return
    if isinstance(tool_choice, str):
        raise bad_request(f"tool_choice: must be 'none', 'auto', 'required' or a named function, "
                          f"got {tool_choice!r}", param="tool_choice")
    name = named_choice(tool_choice)
    if name not in names:
        raise bad_request(f"tool_choice: function {name!r} is not among the tools", param="tool_choice")


def function_of(tool: Any, index: int) -> dict:
    """The ``function`` object of ``tools[index]`` (checked: a name, an object schema)."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"tools[{index}]: expected {{'type': 'function', 'function': {{...}}}}", param="tools")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
        raise bad_request(f"tools[{index}]: function name must be 1-64 letters, digits, '_', '.' or '-'",
                          param="tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad_request(f"tools[{index}]: parameters must be a JSON schema object", param="tools")
    return fn


def named_choice(tool_choice: Any) -> str:
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
            or not isinstance(tool_choice.get("function"), dict)
            or not isinstance(tool_choice["function"].get("name"), str)):
        raise bad_request("tool_choice: a named choice is {'type': 'function', 'function': {'name': ...}}",
                          param="tool_choice")
    return tool_choice["function"]["name"]


def uses_tools(tools: list[Any] | None, tool_choice: Any) -> bool:
    return bool(tools) and tool_choice != "none"


def tool_grammar(tools: list[Any], tool_choice: Any, parallel: bool = True) -> GrammarSpec:
    """An xgrammar structural tag for ``tools`` under ``tool_choice`` (auto, required or named);
    ``parallel`` (OpenAI's ``parallel_tool_calls``) allows more than one call."""
    fns = [function_of(t, i) for i, t in enumerate(tools)]
    tags = [_tag(fn) for fn in fns]
    if isinstance(tool_choice, dict):
        name = named_choice(tool_choice)
        fmt: dict = _tag(next(fn for fn in fns if fn["name"] == name))
    elif tool_choice == "required" and not parallel:
        fmt = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    elif tool_choice == "required":
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
    else:
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_BEGIN], "tags": tags,
               "at_least_one": False, "stop_after_first": not parallel}
    return GrammarSpec(kind="structural_tag", source=json.dumps({"type": "structural_tag", "format": fmt}))


def _tag(fn: dict) -> dict:
    begin = f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(fn["name"])}, "arguments": '
    schema = fn.get("parameters") or ANY_OBJECT
    # One whitespace character at most between JSON tokens: small models given free whitespace
    # tend to emit newlines until max_tokens.
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    return {"type": "tag", "begin": begin, "content": content, "end": f"}}\n{TOOL_CALL_END}"}


def response_format_grammar(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """``response_format`` -> a grammar (None for text); 400 naming it for a malformed one."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GrammarSpec(kind="json_object")
    if kind != "json_schema":
        raise bad_request(f"response_format: type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          param="response_format")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise bad_request("response_format: json_schema must be {'name': ..., 'schema': {...}}",
                          param="response_format")
    schema = spec.get("schema", {})
    return GrammarSpec(kind="json_schema", source=json.dumps(schema if schema is not True else {}))


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(remaining content or None, tool calls in OpenAI's shape) from generated text. Blocks that
    are not complete JSON with a name (cut by max_tokens) stay in the content."""
    calls, kept, pos = [], [], 0
    for m in _TOOL_CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def apply_tool_calls(choice: dict, text: str) -> dict:
    """Rewrite a chat choice (whole response) with the tool calls found in ``text``."""
    content, calls = parse_tool_calls(text)
    if calls:
        choice["message"]["content"] = content
        choice["message"]["tool_calls"] = calls
        if choice.get("finish_reason") == "stop":
            choice["finish_reason"] = "tool_calls"
    return choice


def tool_call_delta(text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """(delta, finish_reason) of the one chunk that carries a streamed choice's buffered output."""
    content, calls = parse_tool_calls(text)
    delta: dict = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return delta, finish_reason


def tool_call_chunk(shape, index: int, text: str, finish_reason: str | None, with_usage_key: bool) -> bytes:
    """The SSE chunk that ends a streamed tool-using choice: its content and tool calls at once
    (the output is buffered: a half-written call cannot be told from text until it closes)."""
    delta, finish_reason = tool_call_delta(text, finish_reason)
    body = {"id": shape.rid, "object": "chat.completion.chunk", "created": shape.created, "model": shape.model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_key:
        body["usage"] = None
    return sse(body)
