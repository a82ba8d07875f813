"""OpenAI request bodies as typed structs, and their translation into ``SamplingParams``.

Bodies are decoded straight into these structs with msgspec: a wrong type is a 400 naming the field
(``Expected `int`, got `str` - at `$.max_tokens```), unknown fields are ignored (clients send
vendor extensions), and nothing untyped travels further than this module.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.router.errors import APIError, bad_request, from_value_error
from pdserve.router.tools import check_tools, response_format_grammar, tool_grammar, uses_tools
from pdserve.sampling_params import GrammarSpec, SamplingParams

MAX_N = 64


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None   # an assistant turn that called tools
    tool_call_id: str | None = None                  # a tool turn: which call it answers


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints share (OpenAI's plus the vLLM/SGLang extensions clients rely on)."""
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    regex: str | None = None         # structured output (SGLang's extensions): the output matches it
    ebnf: str | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]          # text, token ids, or a list of either (checked in prompt_inputs)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


def parse_request(body: bytes, cls: type[msgspec.Struct]) -> Any:
    """Decode and check one request body; every problem is an ``APIError(400)``."""
    try:
        req = msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    _check_common(req)
    if isinstance(req, ChatRequest):
        _check_chat(req)
    else:
        _check_completion(req)
    return req


def _validation_error(exc: msgspec.ValidationError) -> APIError:
    text = str(exc)
    param = None
    if " - at `$." in text:
        path = text.rsplit(" - at `$.", 1)[1].rstrip("`")
        param = path.split("[", 1)[0].split(".", 1)[0]
    elif "missing required field" in text:
        param = text.rsplit("`", 2)[-2] if text.count("`") >= 2 else None
    return bad_request(f"invalid request: {text}", param=param)


def _check_common(req: _Common) -> None:
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n: must be in [1, {MAX_N}], got {req.n}", param="n")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request(f"max_tokens: must be >= 1, got {req.max_tokens}", param="max_tokens")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options: only allowed with stream=true", param="stream_options")
    for s in stop_strings(req):
        if not s:
            raise bad_request("stop: stop strings must not be empty", param="stop")
    if req.regex is not None and req.ebnf is not None:
        raise bad_request("regex: give one of regex and ebnf", param="regex")


def _check_chat(req: ChatRequest) -> None:
    if not req.messages:
        raise bad_request("messages: must not be empty", param="messages")
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise bad_request(f"max_completion_tokens: must be >= 1, got {req.max_completion_tokens}",
                          param="max_completion_tokens")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise bad_request("top_logprobs: needs logprobs=true", param="top_logprobs")
    check_tools(req.tools, req.tool_choice)
    constraints = [name for name, on in (("response_format", response_format_grammar(req.response_format)),
                                         ("tools", uses_tools(req.tools, req.tool_choice)),
                                         ("regex", req.regex is not None), ("ebnf", req.ebnf is not None)) if on]
    if len(constraints) > 1:
        raise bad_request(f"{constraints[1]}: cannot be combined with {constraints[0]} (both constrain the output)",
                          param=constraints[1])
    for msg in req.messages:
        if msg.role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"messages: unknown role {msg.role!r}", param="messages")
        if isinstance(msg.content, list) and any(p.type != "text" or p.text is None for p in msg.content):
            raise bad_request("messages: only text content parts are supported", param="messages")


def _check_completion(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of: only best_of == n is supported", param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise bad_request(f"logprobs: must be in [0, 5], got {req.logprobs}", param="logprobs")


def stop_strings(req: _Common) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: role + plain-text content."""
    out = []
    for msg in req.messages:
        content = msg.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        item: dict[str, Any] = {"role": msg.role, "content": content or ""}
        if msg.name:
            item["name"] = msg.name
        if msg.tool_calls:
            item["tool_calls"] = msg.tool_calls
        if msg.tool_call_id:
            item["tool_call_id"] = msg.tool_call_id
        out.append(item)
    return out


def prompt_inputs(req: CompletionRequest) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each text or token ids."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif p and all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                   for x in p):
        prompts = [list(x) for x in p]
    else:
        raise bad_request("prompt: must be a string, a list of strings, a list of token ids, or a list "
                          "of non-empty token-id lists", param="prompt")
    if any(len(x) == 0 for x in prompts):
        raise bad_request("prompt: must not be empty", param="prompt")
    return prompts


def wants_logprobs(req: _Common) -> tuple[bool, int]:
    """(logprobs on, how many alternatives) in either endpoint's convention."""
    if isinstance(req, ChatRequest):
        return req.logprobs, (req.top_logprobs or 0) if req.logprobs else 0
    lp = req.logprobs
    return lp is not None, lp or 0


def requested_max_tokens(req: _Common) -> int | None:
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def grammar_of(req: _Common) -> GrammarSpec | None:
    """The constraint on the output, if any (``_check_chat`` allows at most one)."""
    if isinstance(req, ChatRequest):
        if uses_tools(req.tools, req.tool_choice):
            return tool_grammar(req.tools, req.tool_choice, req.parallel_tool_calls)
        spec = response_format_grammar(req.response_format)
        if spec is not None:
            return spec
    if req.regex is not None:
        return GrammarSpec(kind="regex", source=req.regex)
    if req.ebnf is not None:
        return GrammarSpec(kind="ebnf", source=req.ebnf)
    return None


def sampling_params(req: _Common, max_new_tokens: int, seed_offset: int = 0) -> SamplingParams:
    """One choice's SamplingParams; invalid values are a 400 naming the OpenAI field."""
    logprobs, top_logprobs = wants_logprobs(req)
    top_k = req.top_k
    values = dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if top_k is None or top_k == 0 else top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        max_new_tokens=max_new_tokens,
        min_new_tokens=req.min_tokens,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        seed=None if req.seed is None else req.seed + seed_offset,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar_of(req),
    )
    try:
        return SamplingParams(**values).validate()
    except ValueError as exc:
        raise from_value_error(exc, {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}) from None
