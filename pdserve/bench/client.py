"""Async streaming client for /v1/completions and /v1/chat/completions (httpx, SSE).

Per request it records the raw timeline: the client clock just before the POST, the arrival time
of every chunk that carries text and how many tokens that chunk carried. TTFT, ITL, TPOT and E2E
are derived from that timeline in ``metrics.py`` (so the JSON on disk can be re-analysed).
Failures (HTTP errors, refused connections, errors inside the stream, streams without a token)
become ``success=False`` with the error text; they never raise out of ``send_request``.

Token counts: the final usage chunk (``stream_options.include_usage``) gives the output total;
when the server also sends usage on every chunk (``continuous_usage_stats``, vLLM's extension)
the per-chunk deltas say how many tokens each chunk carried, otherwise one per chunk is assumed.
"""

from __future__ import annotations

import json
import time

import httpx
import msgspec

from pdserve.bench.datasets import BenchRequest


class RequestResult(msgspec.Struct, kw_only=True):
    """One request's outcome; times in seconds on the client clock."""
    index: int
    prompt_len: int                      # what we sent (server's count replaces it when reported)
    max_tokens: int
    success: bool = False
    error: str = ""
    start_s: float = 0.0                 # request start, relative to the run's start
    chunk_times_s: list[float] = msgspec.field(default_factory=list)  # token chunks, from start_s
    chunk_tokens: list[int] = msgspec.field(default_factory=list)     # tokens in each token chunk
    output_tokens: int = 0               # usage.completion_tokens, else sum(chunk_tokens)
    kv_bytes: int | None = None          # when the server reports its KV transfer for the request
    transfer_ms: float | None = None

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] if self.chunk_times_s else 0.0

    @property
    def e2e_s(self) -> float:
        """Arrival of the last token chunk (the trailing usage chunk carries no token)."""
        return self.chunk_times_s[-1] if self.chunk_times_s else 0.0


def build_payload(req: BenchRequest, model: str, endpoint: str) -> dict:
    """OpenAI request body: greedy, exactly ``output_len`` tokens (ignore_eos), streamed."""
    body: dict = {
        "model": model, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if endpoint == "chat":
        if not isinstance(req.prompt, str):
            raise ValueError("--endpoint chat needs text prompts (token-id prompts go to completions)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def endpoint_url(base_url: str, endpoint: str) -> str:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    return base_url.rstrip("/") + path


def _chunk_text(data: dict, endpoint: str) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _kv_fields(data: dict) -> tuple[int | None, float | None]:
    """Per-request KV transfer figures, if the server adds them to a chunk (top level or usage)."""
    for holder in (data.get("kv_transfer"), (data.get("pdserve") or {}).get("kv_transfer"),
                   data.get("usage")):
        if isinstance(holder, dict) and "kv_bytes" in holder:
            ms = holder.get("transfer_ms", holder.get("kv_transfer_ms"))
            return int(holder["kv_bytes"]), (float(ms) if ms is not None else None)
    return None, None


class _StreamState:
    """Folds SSE events into a RequestResult."""

    def __init__(self, result: RequestResult, endpoint: str, t0: float):
        self.result, self.endpoint, self.t0 = result, endpoint, t0
        self.usage_tokens = 0          # running completion_tokens seen in usage
        self.pending_tokens = 0        # tokens reported before a text chunk arrived (rare)
        self.has_per_chunk_usage = False

    def on_event(self, data: dict, now: float) -> None:
        res = self.result
        if "error" in data and not data.get("choices"):
            err = data["error"]
            res.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        kv_bytes, transfer_ms = _kv_fields(data)
        if kv_bytes is not None:
            res.kv_bytes, res.transfer_ms = kv_bytes, transfer_ms
        new_tokens = self._usage_delta(data)
        text = _chunk_text(data, self.endpoint)
        if text:
            n = new_tokens + self.pending_tokens if self.has_per_chunk_usage else 1
            if n == 0 and res.chunk_times_s:
                return          # text with no new token (held-back bytes flushed): no gap (sglang)
            res.chunk_times_s.append(now - self.t0)
            res.chunk_tokens.append(max(1, n))
            self.pending_tokens = 0
        elif new_tokens > 0 and data.get("choices"):
            self.pending_tokens += new_tokens   # tokens with no text yet (held-back bytes)

    def _usage_delta(self, data: dict) -> int:
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return 0
        if (pt := usage.get("prompt_tokens")) is not None:
            self.result.prompt_len = int(pt)
        total = int(usage.get("completion_tokens") or 0)
        if data.get("choices"):
            self.has_per_chunk_usage = True
        delta, self.usage_tokens = total - self.usage_tokens, max(total, self.usage_tokens)
        return max(0, delta)

    def finish(self) -> None:
        res = self.result
        res.output_tokens = self.usage_tokens or sum(res.chunk_tokens)
        if res.error:
            return
        if not res.chunk_times_s:
            res.error = "stream ended without a token chunk"
            return
        res.success = True


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, result: RequestResult,
                       run_t0: float, headers: dict | None = None) -> RequestResult:
    """POST one streaming request and fill ``result``; never raises for request failures."""
    t0 = time.perf_counter()
    result.start_s = t0 - run_t0
    state = _StreamState(result, "chat" if "messages" in payload else "completions", t0)
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return result
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue              # blank separators, ': ping' comments, event: lines
                chunk = line[5:].strip()
                if chunk == "[DONE]":
                    break
                state.on_event(json.loads(chunk), now)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
    state.finish()
    return result


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def first_model(client: httpx.AsyncClient, base_url: str, headers: dict) -> str:
    """The id of the first model in ``GET /v1/models``."""
    resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]
