"""A scripted OpenAI-compatible streaming server (Starlette + uvicorn on a real socket).

It lets the benchmark client be tested on real HTTP/SSE with known timing while the pdserve
router is not available: each request waits ``ttft_s`` (+ ``prefill_s_per_token`` x prompt
tokens, serialised through one lock when ``serial_prefill`` so TTFT grows with load), then
streams ``max_tokens`` tokens, ``tokens_per_chunk`` a chunk, ``itl_s`` per token apart.
The model name picks a failure: ``fail-500``, ``stream-error``, ``no-tokens``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


@dataclass
class Script:
    ttft_s: float = 0.02
    itl_s: float = 0.004
    tokens_per_chunk: int = 1
    per_chunk_usage: bool = False
    prefill_s_per_token: float = 0.0
    serial_prefill: bool = False
    metrics_text: str | None = None     # served at /metrics when set
    nodes_json: object = None           # served at /nodes when set


class ScriptedServer:
    def __init__(self, script: Script | None = None):
        self.script = script or Script()
        self.inflight = 0
        self.max_inflight = 0
        self.bodies: list[dict] = []
        self._lock: asyncio.Lock | None = None
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[
            Route("/v1/models", self._models), Route("/metrics", self._metrics),
            Route("/nodes", self._nodes),
            Route("/v1/completions", self._complete, methods=["POST"]),
            Route("/v1/chat/completions", self._complete, methods=["POST"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})

    async def _metrics(self, request: Request):
        if self.script.metrics_text is None:
            return PlainTextResponse("not found", status_code=404)
        return PlainTextResponse(self.script.metrics_text)

    async def _nodes(self, request: Request):
        if self.script.nodes_json is None:
            return PlainTextResponse("not found", status_code=404)
        return JSONResponse(self.script.nodes_json)

    async def _complete(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        if body.get("model") == "fail-500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        return StreamingResponse(self._stream(body), media_type="text/event-stream")

    async def _prefill(self, prompt_tokens: int) -> None:
        delay = self.script.ttft_s + self.script.prefill_s_per_token * prompt_tokens
        if not self.script.serial_prefill:
            await asyncio.sleep(delay)
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await asyncio.sleep(delay)

    async def _stream(self, body: dict):
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            async for event in self._events(body):
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.inflight -= 1

    async def _events(self, body: dict):
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        n, k, s = int(body["max_tokens"]), max(1, self.script.tokens_per_chunk), self.script
        if chat:
            yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await self._prefill(prompt_tokens)
        if body.get("model") == "stream-error":
            yield {"error": {"message": "engine died", "code": 500}}
            return
        sent = 0
        while sent < n and body.get("model") != "no-tokens":
            if sent:
                await asyncio.sleep(s.itl_s * min(k, n - sent))
            step = min(k, n - sent)
            sent += step
            text = "tok " * step
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            event = {"choices": [choice]}
            if s.per_chunk_usage:
                event["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sent}
            yield event
        yield {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                                        "total_tokens": prompt_tokens + sent},
               "kv_transfer": {"kv_bytes": 1024 * prompt_tokens, "transfer_ms": 0.5}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
