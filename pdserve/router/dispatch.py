"""One choice's journey through the nodes, with failover before the first token.

An attempt (rid ``f"{choice_rid}-{attempt}"``) picks a target. In PD mode it sends ``GenerateReq``
to the decode node first (it reserves KV pages and tells the prefill node where they are, via the
prefill node's bootstrap endpoint) and then ``PrefillReq`` with the same transfer id to the prefill
node; the decode node streams ``TokenOut``. Colocated mode sends one ``GenerateReq``.

Before the first token nothing has reached the client, so failures are retried on another node,
invisibly, up to ``--max-prefill-retries`` times: a ``PrefillStatus(ok=False)``, the prefill node
leaving the registry before its KV arrived, the decode node leaving, a node refusing the send, or
a server-side error (5xx) reported by the decode node. The failed node is excluded from the next
pick (unless no other node is left) and the abandoned attempt is aborted on every node it touched. After the first token, the
decode node leaving or reporting an error ends the choice with an ``APIError`` (the stream carries
it as an error event). Whenever an attempt ends unfinished (error, client gone, stop string hit,
timeout) ``AbortReq`` goes to its nodes so their KV pages are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator

from pdserve.protocol import AbortReq, GenerateReq, PrefillReq, PrefillStatus, TokenOut
from pdserve.router.errors import APIError
from pdserve.router.node_client import NodeGone, NodeSendError
from pdserve.router.pairing import Target
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.router.core import Router

log = logging.getLogger(__name__)


class RetryableFailure(Exception):
    """An attempt failed before its first token; ``node_id`` is excluded from the next pick."""

    def __init__(self, node_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} on {node_id}" + (f": {detail}" if detail else ""))
        self.node_id, self.reason = node_id, reason


async def generate(router: "Router", choice_rid: str, input_ids: list[int], sampling: SamplingParams,
                   deadline: float) -> AsyncIterator[TokenOut]:
    """TokenOut messages of one choice (failover handled); raises APIError when it cannot finish."""
    excluded: set[str] = set()
    last: RetryableFailure | None = None
    num_attempts = router.config.max_prefill_retries + 1
    for attempt_no in range(num_attempts):
        # Nodes that failed this choice are avoided while others exist, then tried again (a failure
        # may be transient); the attempt bound keeps this finite.
        target = router.pick(input_ids, excluded) or (router.pick(input_ids, set()) if excluded else None)
        if target is None:
            break
        attempt = Attempt(router, f"{choice_rid}-{attempt_no}", target, input_ids, sampling, deadline)
        try:
            async for out in attempt.run():
                yield out
            return
        except RetryableFailure as failure:
            last = failure
            excluded.add(failure.node_id)
            router.metrics.retries.labels(failure.reason).inc()
            log.warning("attempt %s failed (%s); %s", attempt.rid, failure,
                        "retrying" if attempt_no + 1 < num_attempts else "giving up")
        finally:
            attempt.close()
    if last is None:
        from pdserve.router.embeddings import generation_unavailable
        raise generation_unavailable(router)   # 400 when only embedding nodes are registered
    raise APIError(503, f"no node could serve the request ({last})", code="prefill_failed")


class Attempt:
    def __init__(self, router: "Router", rid: str, target: Target, input_ids: list[int],
                 sampling: SamplingParams, deadline: float) -> None:
        self.router, self.rid, self.target = router, rid, target
        self.input_ids, self.sampling, self.deadline = input_ids, sampling, deadline
        self.queue = router.client.open(rid)
        self.is_finished = False
        self.is_prefill_done = False
        self.has_tokens = False

    async def run(self) -> AsyncIterator[TokenOut]:
        self._send_requests()
        while True:
            msg = await self._next()
            if isinstance(msg, PrefillStatus):
                self._on_prefill_status(msg)
            elif isinstance(msg, NodeGone):
                self._on_node_gone(msg)
            else:
                if msg.finish_reason in ("error", "abort"):
                    self._raise_node_error(msg)
                if msg.token_ids and not self.has_tokens:
                    self.has_tokens = True
                    self._release_prefill()
                self.is_finished = msg.finish_reason is not None
                yield msg
                if self.is_finished:
                    return

    def close(self) -> None:
        """Abort on every node still holding this attempt (unless it finished), forget it."""
        for node in (self.target.decode, self.target.prefill):
            if node is None:
                continue
            if not self.is_finished:
                try:
                    self.router.client.send(node, AbortReq(rid=self.rid, reason="router"))
                except NodeSendError as exc:
                    log.debug("abort not sent: %s", exc)
            self.router.unbind(self.rid, node.node_id)
        self.router.client.close(self.rid)

    def _send_requests(self) -> None:
        t, reply_to = self.target, self.router.client.reply_to
        for node_id in t.node_ids:
            self.router.bind(self.rid, node_id)
        gone = [n for n in t.node_ids if n not in self.router.nodes()]
        if gone:   # left between the pick and the bind: its NodeGone was already posted to nobody
            raise RetryableFailure(gone[0], "node_lost")
        if t.prefill is None:
            req = GenerateReq(rid=self.rid, input_ids=self.input_ids, sampling=self.sampling, reply_to=reply_to)
            self._send(t.decode, req)
            return
        self._send(t.decode, GenerateReq(rid=self.rid, input_ids=self.input_ids, sampling=self.sampling,
                                         reply_to=reply_to, transfer_id=self.rid,
                                         prefill_bootstrap=t.prefill.bootstrap))
        self._send(t.prefill, PrefillReq(rid=self.rid, transfer_id=self.rid, input_ids=self.input_ids,
                                         sampling=self.sampling, reply_to=reply_to))

    def _send(self, node, msg) -> None:
        try:
            self.router.client.send(node, msg)
        except NodeSendError as exc:
            raise RetryableFailure(node.node_id, "send_failed", str(exc)) from None

    async def _next(self):
        if not self.queue.empty():          # the common case mid-stream: no timer, no await
            return self.queue.get_nowait()
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self.queue.get()
        except TimeoutError:
            raise APIError(504, f"request timed out after {self.router.config.request_timeout_s:g}s",
                           code="timeout") from None

    def _release_prefill(self) -> None:
        """The prefill node's part is over: its load and its liveness no longer concern us."""
        if self.target.prefill is not None and not self.is_prefill_done:
            self.is_prefill_done = True
            self.router.unbind(self.rid, self.target.prefill.node_id)

    def _on_prefill_status(self, status: PrefillStatus) -> None:
        prefill = self.target.prefill
        if prefill is None:
            return
        self.router.metrics.observe_prefill(prefill.node_id, status)
        if status.ok:
            self._release_prefill()
        elif not self.has_tokens:
            raise RetryableFailure(prefill.node_id, "prefill_failed", status.error or "")

    def _on_node_gone(self, gone: NodeGone) -> None:
        prefill = self.target.prefill
        if prefill is not None and gone.node_id == prefill.node_id:
            if not (self.is_prefill_done or self.has_tokens):
                raise RetryableFailure(gone.node_id, "prefill_node_lost")
            return
        if gone.node_id == self.target.decode.node_id:
            if not self.has_tokens:
                raise RetryableFailure(gone.node_id, "decode_node_lost")
            raise APIError(503, f"{gone.role} node {gone.node_id} left the registry mid-request",
                           code="node_lost")

    def _raise_node_error(self, out: TokenOut) -> None:
        status = out.error_code or 500
        detail = out.error or f"finished with {out.finish_reason}"
        if status < 500:
            raise APIError(status, detail)
        if self.has_tokens:
            raise APIError(status, f"node {self.target.decode.node_id} failed mid-request: {detail}")
        # Before the first token: an overloaded decode node is skipped next time; other failures in
        # PD mode are most often the KV transfer, so the prefill node is the one to avoid.
        blame = self.target.decode if status == 503 or self.target.prefill is None else self.target.prefill
        raise RetryableFailure(blame.node_id, "node_error", detail)
