"""OpenAI response bodies and stream chunks for chat and (text) completions."""

from __future__ import annotations

import msgspec

from pdserve.router.output import LogprobEntry


class ResponseShape:
    """The fixed parts of one response (id, model, created) and its endpoint's conventions."""

    def __init__(self, rid: str, model: str, created: int, is_chat: bool) -> None:
        self.rid, self.model, self.created, self.is_chat = rid, model, created, is_chat

    def _envelope(self, object_name: str, choices: list, usage: dict | None, with_usage_key: bool) -> dict:
        out = {"id": self.rid, "object": object_name, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or with_usage_key:
            out["usage"] = usage
        return out

    # -- streaming -----------------------------------------------------------------------------
    def chunk(self, index: int, *, text: str | None, logprobs: dict | None, finish_reason: str | None,
              role: bool = False, with_usage_key: bool = False) -> bytes:
        if self.is_chat:
            delta: dict = {"role": "assistant", "content": text or ""} if role else {}
            if text and not role:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice], None, with_usage_key)
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice], None, with_usage_key)
        return sse(body)

    def usage_chunk(self, usage: dict) -> bytes:
        name = "chat.completion.chunk" if self.is_chat else "text_completion"
        return sse(self._envelope(name, [], usage, True))

    # -- whole responses -----------------------------------------------------------------------
    def response(self, choices: list[dict], usage: dict) -> dict:
        return self._envelope("chat.completion" if self.is_chat else "text_completion", choices, usage, True)

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        if self.is_chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(body: dict) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[LogprobEntry]) -> dict:
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in e.top]}
        for e in entries]}


class CompletionLogprobs:
    """Completions' logprobs shape (tokens / token_logprobs / top_logprobs / text_offset), built
    incrementally so stream chunks carry the right text offsets."""

    def __init__(self, start_offset: int = 0) -> None:
        self.offset = start_offset

    def block(self, entries: list[LogprobEntry], prompt_tokens: list[str] | None = None) -> dict:
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token in prompt_tokens or []:      # echoed prompt: nodes do not score prompt tokens
            self._add(out, token, None, None)
        for e in entries:
            self._add(out, e.token, e.logprob, {t: lp for t, lp in e.top} or None)
        return out

    def _add(self, out: dict, token: str, logprob: float | None, top: dict | None) -> None:
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(token)
