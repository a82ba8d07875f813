"""``pdserve decode``: a decode node — pages reserved first, KV pushed in by prefill, then decoding.

A request's path through this process: ``GenerateReq`` (with a transfer id and the prefill node's
bootstrap endpoint) -> ``prealloc`` queue, held there while the pool cannot hold its prompt plus
the running batch's reserve -> pages reserved and their ids sent to the prefill node
(``KVReceiver.expect``) -> ``transferring`` until the completion notification brings the first
token -> the engine's running batch (continuous batching, retraction when pages run out; a
retracted request is recomputed here) -> tokens streamed to the router as ``TokenOut``.
A failed or cancelled transfer frees the pages and ends the request with an error.
A ``GenerateReq`` without a transfer id is served like a colocated node would.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from pdserve.colocated_node import ColocatedNode, token_out
from pdserve.node_base import run_node
from pdserve.protocol import AbortReq, FirstToken, GenerateReq, NodeMessage, TokenOut
from pdserve.runtime.engine import make_generator, take_delta, validate_request
from pdserve.runtime.kv_manager import pages_for
from pdserve.runtime.request import Request
from pdserve.transfer import KVReceiver, TransferDone, TransferFailed
from pdserve.transfer.pools import PoolSet

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DecodeJob:
    req: Request
    transfer_id: str
    prefill_bootstrap: str
    reply_to: str
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False      # aborted while KV was moving: pages stay until prefill confirms
    group: int = 0               # DP attention group whose pages (and engine) hold it


class DecodeNode(ColocatedNode):
    role = "decode"

    def __init__(self, cfg, runner=None) -> None:
        super().__init__(cfg, runner)
        self.receiver = KVReceiver(PoolSet.of_runner(self.runner), self.runner.fingerprint, cfg.transfer,
                                   cfg.node.host)
        self.prealloc: deque[DecodeJob] = deque()
        self.transferring: dict[str, DecodeJob] = {}   # transfer_id -> job

    def bootstrap_endpoint(self) -> str | None:
        return self.receiver.bootstrap_endpoint

    # -- messages -----------------------------------------------------------------------------
    def handle(self, msg: NodeMessage) -> None:
        if isinstance(msg, GenerateReq) and msg.transfer_id is not None:
            self._expect(msg)
        elif isinstance(msg, AbortReq):
            self._abort(msg.rid, msg.reason)
        else:
            super().handle(msg)

    def _expect(self, msg: GenerateReq) -> None:
        try:
            validate_request(msg.input_ids, msg.sampling, self.runner.vocab_size, self.runner.context_length)
            self.runner.sampler.check_grammar(msg.sampling)
            if msg.prefill_bootstrap is None:
                raise ValueError("prefill_bootstrap: needed with a transfer id")
            if msg.transfer_id in self.transferring or msg.rid in self.reply_to:
                raise ValueError(f"duplicate request {msg.rid}")
        except ValueError as exc:
            self.send(msg.reply_to, TokenOut(rid=msg.rid, token_ids=[], finish_reason="error", error=str(exc),
                                             error_code=400, prompt_tokens=len(msg.input_ids)))
            return
        req = Request(rid=msg.rid, prompt_ids=list(msg.input_ids), params=msg.sampling,
                      eos_token_ids=self.core.eos_ids, generator=make_generator(msg.sampling, self.runner.device))
        self.reply_to[msg.rid] = msg.reply_to
        self.prealloc.append(DecodeJob(req, msg.transfer_id, msg.prefill_bootstrap, msg.reply_to))
        self.node_metrics.begin(msg.rid, "queue")

    def _abort(self, rid: str, reason: str) -> None:
        for job in list(self.prealloc):
            if job.req.rid == rid:
                self.prealloc.remove(job)
                self._end(job, "abort", None)
                return
        for job in list(self.transferring.values()):
            if job.req.rid == rid and not job.cancelled:
                # A write may still be in flight into these pages: keep them until the receiver
                # reports the transfer over (TransferFailed after prefill confirms the cancel).
                self.receiver.cancel(job.transfer_id)
                job.cancelled = True
                job.req.finish("abort")
                self._reply(job, take_delta(job.req))
                return
        self.core.abort(rid, "abort")

    # -- work ---------------------------------------------------------------------------------
    def tick(self) -> bool:
        self._admit()
        self._poll_transfers()
        busy = super().tick()
        return busy or bool(self.prealloc) or bool(self.transferring)

    def _admit(self) -> None:
        while self.prealloc:
            job = self.prealloc[0]
            verdict = self._pick_group(job)
            if verdict is None:
                return  # held back until pages free up
            if isinstance(verdict, str):
                self.prealloc.popleft()
                self._end(job, "error", verdict)
                continue
            job.group = verdict
            grp = self.core.groups[verdict]
            prompt_len = len(job.req.prompt_ids)
            if not grp.kv.ensure_capacity(job.req, prompt_len + 1):
                return
            self.prealloc.popleft()
            self.transferring[job.transfer_id] = job
            self.node_metrics.lap(job.req.rid, "queue", then="kv_wait")
            self.receiver.expect(job.transfer_id, job.prefill_bootstrap,
                                 job.req.page_ids[:pages_for(prompt_len, grp.kv.page_size)], dp_group=verdict)

    def _pick_group(self, job: DecodeJob) -> int | str | None:
        """The attention group (one without DP attention) with room for the job's prompt and a first
        slice of output beside its running batch's reserve, the emptiest first; None to wait; an
        error text when no group could ever hold it."""
        fits, never = [], True
        for g, grp in enumerate(self.core.groups):
            sched, kv = grp.scheduler, grp.kv
            need = pages_for(len(job.req.prompt_ids) + 1, kv.page_size)   # the prompt and a first slice of output
            moving = [j.req for j in self.transferring.values() if j.group == g]
            busy = bool(sched.running) or bool(moving)
            never = never and not busy and need > kv.available_pages()
            if len(sched.running) + len(moving) >= sched.max_running:
                continue
            if need + sched.reserve_pages([*moving, job.req]) <= kv.available_pages():
                fits.append((len(sched.running) + len(moving), -kv.available_pages(), g))
        if fits:
            return min(fits)[2]
        if never:
            kv = self.core.groups[0].kv
            return f"prompt needs {pages_for(len(job.req.prompt_ids) + 1, kv.page_size)} pages, the pool has {kv.num_pages}"
        return None

    def _poll_transfers(self) -> None:
        for ev in self.receiver.poll():
            job = self.transferring.pop(ev.transfer_id, None)
            if job is None:
                continue
            if job.cancelled:
                self.core.groups[job.group].kv.release(job.req, cache=False)
                self.receiver.forget(ev.transfer_id)
                continue
            self.receiver.forget(ev.transfer_id)
            if isinstance(ev, TransferFailed):
                self._end(job, "error", f"KV transfer failed: {ev.reason}")
            elif isinstance(ev, TransferDone):
                self._start_decoding(job, msgspec.msgpack.decode(ev.payload, type=FirstToken))

    def _start_decoding(self, job: DecodeJob, first: FirstToken) -> None:
        req = job.req
        req.num_computed = len(req.prompt_ids)
        req.num_cached = first.cached_tokens
        req.append_token(first.token_id, first.logprob, first.top_logprobs)
        self.node_metrics.lap(req.rid, "kv_wait", then="first_decode")
        grp = self.core.groups[job.group]
        if grp.kv.cache is not None:   # the prompt's full pages serve later requests with its prefix (n > 1)
            grp.kv.cache.insert(req.prompt_ids, req.page_ids)
        if req.is_finished:
            grp.kv.release(req, cache=True)
            self._reply(job, take_delta(req))
            return
        grp.scheduler.add_running(req)
        self._reply(job, take_delta(req))

    def _end(self, job: DecodeJob, reason: str, error: str | None) -> None:
        self.core.groups[job.group].kv.release(job.req, cache=False)
        job.req.finish(reason, error=error)
        self._reply(job, take_delta(job.req))

    def _reply(self, job: DecodeJob, out) -> None:
        msg = token_out(out)
        if out.error:
            msg.error_code = 502
        self.send(job.reply_to, msg)
        if out.finished:
            self.reply_to.pop(job.req.rid, None)
            self.node_metrics.end(job.req.rid)

    def load(self) -> dict:
        load = self.core.load()
        load["waiting"] += len(self.prealloc) + len(self.transferring)
        return load

    def close(self) -> None:
        self.receiver.close()
        super().close()


def main(argv: list[str]) -> int:
    return run_node(DecodeNode, "decode", argv)
