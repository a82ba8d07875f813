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

Paths (``pdserve_router_dispatch_total{path, reason}``): ``disagg`` (prefill node + KV transfer),
``direct`` (the decode node prefills the prompt itself: a short prompt or a busy prefill pool, see
``pairing.direct_reason``; or a choice that follows its prompt's first choice, below) and
``colocated``. With ``n > 1`` the choices of one prompt share one prefill: the first choice (the
leader) runs first; once its first token arrives, the decode node holds the prompt's pages in its
prefix cache (inserted when the transfer lands), and the other choices go straight to that decode
node, which reuses them and computes only the prompt's last partial page. A leader that runs
``direct`` or ``colocated`` (no transfer to share) releases the others at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from pdserve.protocol import AbortReq, GenerateReq, NodeInfo, PrefillReq, PrefillStatus, TokenOut
from pdserve.router.errors import APIError
from pdserve.router.node_client import NodeGone, NodeSendError
from pdserve.router.pairing import Target, direct_reason
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.router.core import Router

log = logging.getLogger(__name__)


class RetryableFailure(Exception):
    """An attempt failed before its first token; ``node_id`` is excluded from the next pick."""

    def __init__(self, node_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} on {node_id}" + (f": {detail}" if detail else ""))
        self.node_id, self.reason = node_id, reason


@dataclass
class SharedPrefill:
    """The choices of one prompt (n > 1): the leader publishes the decode node that holds its KV."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    decode: NodeInfo | None = None

    def publish(self, target: Target) -> None:
        if not self.ready.is_set():
            self.decode = target.decode if target.prefill is not None else None
            self.ready.set()

    def release(self) -> None:
        self.ready.set()


@dataclass
class Route:
    """One choice's routing context: its prompt's shared prefill (if n > 1) and where it decodes."""
    shared: SharedPrefill | None = None
    is_leader: bool = False
    decode_id: str | None = None      # the decode node of the current attempt (ITL is read per node)


async def generate(router: "Router", choice_rid: str, input_ids: list[int], sampling: SamplingParams,
                   deadline: float, route: Route | None = None) -> AsyncIterator[TokenOut]:
    """TokenOut messages of one choice (failover handled); raises APIError when it cannot finish."""
    route = route or Route()
    excluded: set[str] = set()
    last: RetryableFailure | None = None
    num_attempts = router.config.max_prefill_retries + 1
    try:
        follow = await _followed_decode(router, route, deadline)
        for attempt_no in range(num_attempts):
            target = _target(router, input_ids, excluded, route, follow if attempt_no == 0 else None)
            if target is None:
                break
            route.decode_id = target.decode.node_id
            attempt = Attempt(router, f"{choice_rid}-{attempt_no}", target, input_ids, sampling, deadline)
            try:
                async for out in attempt.run():
                    if route.is_leader and out.token_ids:
                        route.shared.publish(target)
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
    finally:
        if route.is_leader:
            route.shared.release()    # failed or done: the others must not wait on it
    if last is None:
        from pdserve.router.embeddings import generation_unavailable
        raise generation_unavailable(router)   # 400 when only embedding nodes are registered
    raise APIError(503, f"no node could serve the request ({last})", code="prefill_failed")


async def _followed_decode(router: "Router", route: Route, deadline: float) -> NodeInfo | None:
    """A follower waits for its leader's first token; then the decode node holding the prompt's KV."""
    if route.shared is None or route.is_leader:
        return None
    try:
        async with asyncio.timeout_at(deadline):
            await route.shared.ready.wait()
    except TimeoutError:
        raise APIError(504, f"request timed out after {router.config.request_timeout_s:g}s", code="timeout") from None
    decode = route.shared.decode
    return decode if decode is not None and decode.node_id in router.nodes() else None


def _target(router: "Router", input_ids: list[int], excluded: set[str], route: Route,
            follow: NodeInfo | None) -> Target | None:
    """Where the next attempt goes (counted by path), or None when no node is left."""
    if follow is not None and follow.node_id not in excluded:
        router.live.on_dispatch("direct", "shared_prefix")
        return Target(decode=follow)
    # Nodes that failed this choice are avoided while others exist, then tried again (a failure
    # may be transient); the attempt bound keeps this finite.
    target = router.pick(input_ids, excluded) or (router.pick(input_ids, set()) if excluded else None)
    if target is None:
        return None
    cfg = router.config.dispatch
    reason = direct_reason(len(input_ids), cfg.disagg_min_prefill_tokens, cfg.disagg_max_prefill_queue,
                           router.nodes(), router.loads(), router.inflight(), target)
    if reason is not None:
        target = Target(decode=target.decode)
        router.live.on_dispatch("direct", reason)
    elif target.prefill is not None:
        router.live.on_dispatch("disagg", "prefill_pool")
    else:
        router.live.on_dispatch("colocated", "no_pair")
    if route.is_leader and target.prefill is None:
        route.shared.release()     # nothing is transferred, so nothing to share: the others go now
    return target


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
        if status.ok and status.kv_bytes > 0:
            self.router.live.on_transfer(prefill.node_id, status.kv_bytes, status.transfer_ms)
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
