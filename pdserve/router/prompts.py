"""From a parsed request to the token ids and sampling parameters of each choice.

The router owns tokenization (nodes are token-in/token-out): chat messages go through the chat
template, completion prompts are encoded (or taken as token ids, range-checked against the
nodes' vocabulary). Then the context check: prompt + requested output must fit the smallest
context length among the nodes; beyond it the request is refused (400,
``context_length_exceeded``) unless ``--allow-auto-truncate``, which drops the prompt's oldest
tokens (the end of a chat prompt holds the question and the assistant header, which matter more
than the start).
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from pdserve.router.api_types import (ChatRequest, CompletionRequest, chat_messages, prompt_inputs,
                                      requested_max_tokens, sampling_params)
from pdserve.router.errors import APIError, bad_request
from pdserve.router.tools import uses_tools
from pdserve.sampling_params import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions


@dataclass
class Prompt:
    input_ids: list[int]
    text: str | None = None          # known text (for echo); decoded from the ids on demand


@dataclass
class ChoiceJob:
    index: int                       # choice index in the response: prompt_index * n + j
    prompt_index: int
    prompt: Prompt
    sampling: SamplingParams


def build_prompts(router, req: ChatRequest | CompletionRequest) -> list[Prompt]:
    tok = router.tokenizer
    if isinstance(req, ChatRequest):
        try:
            tools = req.tools if uses_tools(req.tools, req.tool_choice) else None
            text = tok.apply_chat_template(chat_messages(req), add_generation_prompt=req.add_generation_prompt,
                                           tools=tools)
        except jinja2.TemplateError as exc:
            raise bad_request(f"messages: the chat template refused them: {exc}", param="messages") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return [Prompt(tok.encode(text, add_special_tokens=False), text)]
    prompts = []
    vocab = router.vocab_size()
    for item in prompt_inputs(req):
        if isinstance(item, str):
            prompts.append(Prompt(tok.encode(item, add_special_tokens=True), item))
            continue
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt: token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        prompts.append(Prompt(item))
    return prompts


def fit_context(router, prompt: Prompt, requested: int | None, is_chat: bool) -> tuple[Prompt, int]:
    """(prompt, possibly truncated; max_new_tokens), or a 400 when it cannot fit."""
    ctx = router.context_length()
    num_prompt = len(prompt.input_ids)
    if ctx is None:
        return prompt, requested or (DEFAULT_COMPLETION_MAX_TOKENS if not is_chat else 1024)
    need = requested if requested is not None else (1 if is_chat else DEFAULT_COMPLETION_MAX_TOKENS)
    if num_prompt + need > ctx:
        if not router.config.allow_auto_truncate or need >= ctx:
            where = "messages" if is_chat else "prompt"
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{num_prompt + need} tokens ({num_prompt} in the {where}, {need} in the completion). "
                           f"Please reduce the length of the {where} or completion.",
                           param=where, code="context_length_exceeded")
        prompt = Prompt(prompt.input_ids[num_prompt + need - ctx:])
    room = ctx - len(prompt.input_ids)
    if requested is not None:
        return prompt, requested
    return prompt, room if is_chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room)


def build_jobs(router, req: ChatRequest | CompletionRequest, prompts: list[Prompt]) -> list[ChoiceJob]:
    is_chat = isinstance(req, ChatRequest)
    requested = requested_max_tokens(req)
    jobs = []
    for p_idx, prompt in enumerate(prompts):
        fitted, max_new = fit_context(router, prompt, requested, is_chat)
        for j in range(req.n):
            # n choices differ even with a seed (seed + j), yet stay reproducible.
            sampling = sampling_params(req, max_new, seed_offset=j)
            jobs.append(ChoiceJob(p_idx * req.n + j, p_idx, fitted, sampling))
    return jobs


def prompt_text(router, prompt: Prompt) -> str:
    if prompt.text is None:
        prompt.text = router.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)
    return prompt.text
