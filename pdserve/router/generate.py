"""Serving one generation request: all its choices run concurrently, then stream or collect.

Flow: read the body (413 beyond ``--max-request-bytes``) -> parse and validate (400) -> model name
(404) -> tokenize -> nodes? (503) -> context check (400) -> one task per choice (``n`` x prompts),
each driving ``dispatch.generate`` and an ``output.ChoiceOutput`` and putting ``ChoiceDelta``s on
one queue. The handler waits for the first event before answering, so anything that fails before
the first token (no node left after retries, a node refusing the prompt) is a proper HTTP error;
after that a stream carries errors as one ``data: {"error": ...}`` event followed by ``[DONE]``.
A client that disconnects cancels the choice tasks, whose cleanup aborts their attempts on the
nodes (KV pages freed at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.router import dispatch
from pdserve.router.api_types import (ChatRequest, CompletionRequest, parse_request, requested_max_tokens,
                                      sampling_params, stop_strings, wants_logprobs)
from pdserve.router.core import Router
from pdserve.router.dashboard import admission
from pdserve.router.errors import APIError, unavailable
from pdserve.router.output import ChoiceDelta, ChoiceOutput
from pdserve.router.prompts import ChoiceJob, build_jobs, build_prompts, prompt_text
from pdserve.router.responses import (SSE_DONE, CompletionLogprobs, ResponseShape, chat_logprobs, usage)
from pdserve.router.stop import StopStrings
from pdserve.router.tools import apply_tool_calls, tool_call_chunk, uses_tools

log = logging.getLogger(__name__)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class GenerationRun:
    """The choices of one request, running concurrently; ``next_event`` merges their deltas."""

    def __init__(self, router: Router, rid: str, jobs: list[ChoiceJob], req: ChatRequest | CompletionRequest,
                 arrival: float) -> None:
        self.router, self.rid, self.jobs, self.arrival = router, rid, jobs, arrival
        want_logprobs, _ = wants_logprobs(req)
        stops = StopStrings(stop_strings(req))
        self.routes = _routes(jobs)
        self.outputs = [ChoiceOutput(job.index, router.tokenizer, stops, router.token_text,
                                     want_logprobs=want_logprobs, skip_special_tokens=req.skip_special_tokens)
                        for job in jobs]
        self.queue: asyncio.Queue[ChoiceDelta | APIError] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.num_finished = 0
        self.first_token_at: float | None = None

    def start(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.router.config.request_timeout_s
        self.tasks = [asyncio.create_task(self._run_choice(job, out, route, deadline), name=f"{self.rid}-{job.index}")
                      for job, out, route in zip(self.jobs, self.outputs, self.routes)]

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    @property
    def is_done(self) -> bool:
        return self.num_finished == len(self.jobs)

    async def next_event(self) -> ChoiceDelta | None:
        """The next delta of any choice; None once all finished; raises the first error."""
        if self.is_done:
            return None
        event = await self.queue.get()
        if isinstance(event, APIError):
            self.cancel()
            raise event
        if event.finish_reason is not None:
            self.num_finished += 1
        return event

    async def _run_choice(self, job: ChoiceJob, output: ChoiceOutput, route: dispatch.Route, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        metrics, live, last_at = self.router.metrics, self.router.live, None
        try:
            gen = dispatch.generate(self.router, f"{self.rid}-{job.index}", job.prompt.input_ids, job.sampling,
                                    deadline, route)
            try:
                async for out in gen:
                    now = loop.time()
                    if last_at is None:
                        if self.first_token_at is None:
                            self.first_token_at = now
                            metrics.ttft.observe(now - self.arrival)
                            live.on_ttft(now - self.arrival)
                    else:
                        metrics.itl.observe(now - last_at)
                        per_token = (now - last_at) / max(1, len(out.token_ids))   # --stream-interval batches tokens
                        live.on_itl(per_token, self.router.inflight().get(route.decode_id, 1))
                    last_at = now
                    delta = output.add(out)
                    if delta.text or delta.logprobs or delta.finish_reason:
                        self.queue.put_nowait(delta)
                    if output.is_finished:
                        break
            finally:
                await gen.aclose()    # a stop string ended it early: abort the attempt on its nodes now
            if not output.is_finished:
                raise APIError(500, "the node ended the stream without a finish reason")
            metrics.completion_tokens.inc(output.num_tokens)
            live.on_output(output.num_tokens)
        except APIError as exc:
            self.queue.put_nowait(exc)
        except Exception as exc:  # a bug must reach the client as a 500, never as a hang
            log.exception("choice %s-%d failed", self.rid, job.index)
            self.queue.put_nowait(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def usage(self) -> dict:
        prompts = {job.prompt_index: (job.prompt, out) for job, out in zip(self.jobs, self.outputs)}
        prompt_tokens = sum(len(p.input_ids) for p, _ in prompts.values())
        cached = sum(out.cached_tokens for _, out in prompts.values())
        return usage(prompt_tokens, sum(o.num_tokens for o in self.outputs), cached)


def _routes(jobs: list[ChoiceJob]) -> list[dispatch.Route]:
    """n > 1: the choices of one prompt share its prefill (dispatch.SharedPrefill); the first leads."""
    shared: dict[int, dispatch.SharedPrefill] = {}
    counts: dict[int, int] = {}
    for job in jobs:
        counts[job.prompt_index] = counts.get(job.prompt_index, 0) + 1
    routes = []
    for job in jobs:
        if counts[job.prompt_index] == 1:
            routes.append(dispatch.Route())
            continue
        is_leader = job.prompt_index not in shared
        group = shared.setdefault(job.prompt_index, dispatch.SharedPrefill())
        routes.append(dispatch.Route(shared=group, is_leader=is_leader))
    return routes


def _shed(router: Router) -> Response | None:
    """--admission-control: a 429 with Retry-After (OpenAI's error shape) when the --slo cannot be met."""
    if not router.config.dispatch.admission_control:
        return None
    verdict = admission(router)
    if verdict.admit:
        return None
    router.live.on_shed()
    err = APIError(429, f"The server is over its latency targets (--slo): {verdict.reason}. "
                        f"Retry after {verdict.retry_after_s}s.", code="slo_overload")
    return JSONResponse(err.body(), status_code=429, headers={"Retry-After": str(verdict.retry_after_s)})


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, coro) -> tuple[bool, object]:
    """(client gone?, coro's result). The coroutine is cancelled if the client goes first."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return False, task.result()
    task.cancel()
    return True, None


async def handle_generate(router: Router, request: Request, is_chat: bool) -> Response:
    arrival = asyncio.get_running_loop().time()
    body = await read_body(request, router.config.max_request_bytes)
    req = parse_request(body, ChatRequest if is_chat else CompletionRequest)
    if req.model and req.model != router.served_model_name:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
    requested = requested_max_tokens(req)
    # 400s for bad values before anything else (the real max_new_tokens needs the context length).
    sampling_params(req, requested if requested is not None else max(1, req.min_tokens))
    prompts = build_prompts(router, req)
    if not router.is_healthy():
        raise unavailable()
    jobs = build_jobs(router, req, prompts)
    shed = _shed(router)
    if shed is not None:
        return shed
    router.metrics.prompt_tokens.inc(sum(len(p.input_ids) for p in prompts))
    for job in jobs:
        router.live.on_arrival(len(job.prompt.input_ids))
    rid = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex
    shape = ResponseShape(rid, router.served_model_name, int(time.time()), is_chat)
    run = GenerationRun(router, rid, jobs, req, arrival)
    run.start()
    try:
        is_gone, first = await race_disconnect(request, run.next_event())
    except BaseException:
        run.cancel()
        raise
    if is_gone:
        run.cancel()
        return Response(status_code=499)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_stream(router, run, first, shape, req, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    is_gone, body = await race_disconnect(request, _collect(router, run, first, shape, req))
    run.cancel()
    if is_gone:
        return Response(status_code=499)
    return JSONResponse(body)


def _echo_prefix(router: Router, run: GenerationRun, req, index: int) -> str:
    if isinstance(req, CompletionRequest) and req.echo:
        return prompt_text(router, run.jobs[index].prompt)
    return ""


def _echo_tokens(router: Router, run: GenerationRun, req, index: int) -> list[str] | None:
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        return [router.token_text(t) for t in run.jobs[index].prompt.input_ids]
    return None


async def _stream(router: Router, run: GenerationRun, first: ChoiceDelta, shape: ResponseShape, req,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """SSE body. Starlette cancels this generator when the client goes; ``finally`` stops the run."""
    started: set[int] = set()
    lp_state: dict[int, CompletionLogprobs] = {}
    want_logprobs, _ = wants_logprobs(req)
    tool_text: dict[int, list[str]] | None = {} if _tool_mode(req) else None
    try:
        event: ChoiceDelta | None = first
        while event is not None:
            idx, text, logprobs = event.index, event.text, None
            if idx not in started:
                started.add(idx)
                if shape.is_chat:
                    yield shape.chunk(idx, text="", logprobs=None, finish_reason=None, role=True,
                                      with_usage_key=include_usage)
                text = _echo_prefix(router, run, req, idx) + text
            if tool_text is not None:   # tools: the choice's output goes out in one chunk at its end
                tool_text.setdefault(idx, []).append(text)
                if event.finish_reason is not None:
                    yield tool_call_chunk(shape, idx, "".join(tool_text[idx]), event.finish_reason, include_usage)
                event = await run.next_event()
                continue
            if want_logprobs and shape.is_chat:
                logprobs = chat_logprobs(event.logprobs)
            elif want_logprobs:
                if idx not in lp_state:   # the first chunk of a choice carries the echoed prompt tokens
                    lp_state[idx] = CompletionLogprobs()
                    logprobs = lp_state[idx].block(event.logprobs, _echo_tokens(router, run, req, idx))
                else:
                    logprobs = lp_state[idx].block(event.logprobs)
            yield shape.chunk(idx, text=text, logprobs=logprobs, finish_reason=event.finish_reason,
                              with_usage_key=include_usage)
            event = await run.next_event()
        if include_usage:
            yield shape.usage_chunk(run.usage())
        _observe_done(router, run)
        yield SSE_DONE
    except APIError as exc:
        log.warning("request %s failed mid-stream: %s", run.rid, exc.message)
        yield exc.sse()
        yield SSE_DONE
    finally:
        run.cancel()


async def _collect(router: Router, run: GenerationRun, first: ChoiceDelta, shape: ResponseShape, req) -> dict:
    texts: dict[int, list[str]] = {job.index: [] for job in run.jobs}
    entries: dict[int, list] = {job.index: [] for job in run.jobs}
    finish: dict[int, str | None] = {}
    event: ChoiceDelta | None = first
    while event is not None:
        texts[event.index].append(event.text)
        entries[event.index].extend(event.logprobs)
        if event.finish_reason is not None:
            finish[event.index] = event.finish_reason
        event = await run.next_event()
    want_logprobs, _ = wants_logprobs(req)
    choices = []
    for job in run.jobs:
        i = job.index
        prefix = _echo_prefix(router, run, req, i)
        logprobs = None
        if want_logprobs:
            logprobs = (chat_logprobs(entries[i]) if shape.is_chat
                        else CompletionLogprobs().block(entries[i], _echo_tokens(router, run, req, i)))
        choice = shape.choice(i, prefix + "".join(texts[i]), logprobs, finish.get(i))
        choices.append(apply_tool_calls(choice, "".join(texts[i])) if _tool_mode(req) else choice)
    _observe_done(router, run)
    return shape.response(choices, run.usage())


def _tool_mode(req) -> bool:
    return isinstance(req, ChatRequest) and uses_tools(req.tools, req.tool_choice)


def _observe_done(router: Router, run: GenerationRun) -> None:
    router.metrics.e2e.observe(asyncio.get_running_loop().time() - run.arrival)
