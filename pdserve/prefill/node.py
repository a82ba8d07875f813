"""``pdserve prefill``: a prefill node — chunked prefill, KV pushed into decode nodes' pages.

A request's path through this process: ``PrefillReq`` from the router -> ``PrefillScheduler``
(waiting -> prefilling) -> after each forward step, newly complete pages are written into the
decode node's pages (``KVSender.write``; the decode node named them in a ``KVDest`` that arrived
on the bootstrap channel) -> the last chunk samples the first token, sent with the completion
notification (``KVSender.finish``) -> when the transfer is done, the pages go to the prefix cache
and the router gets a ``PrefillStatus``.
"""

from __future__ import annotations

import logging
import time

import msgspec

from pdserve.node_base import NodeBase, run_node
from pdserve.prefill.scheduler import PrefillJob, PrefillScheduler
from pdserve.protocol import AbortReq, FirstToken, NodeMessage, PrefillReq, PrefillStatus
from pdserve.runtime.engine import make_generator, validate_request
from pdserve.runtime.kv_manager import KVManager, pages_for
from pdserve.runtime.request import Request
from pdserve.transfer import DestReady, KVSender, TransferCancelled, TransferSent
from pdserve.transfer.pools import PoolSet

log = logging.getLogger(__name__)


class PrefillNode(NodeBase):
    role = "prefill"

    def __init__(self, cfg, runner=None) -> None:
        super().__init__(cfg, runner)
        eng = cfg.engine
        self.kv = KVManager(self.runner.pool.num_pages, eng.cache.page_size,
                            enable_prefix_cache=not eng.cache.disable_radix_cache)
        max_running = eng.scheduler.max_running_requests or min(256, self.kv.num_pages)
        self.sched = PrefillScheduler(eng.scheduler, self.kv, max_running)
        # every rank's pool (TP); staging for decode nodes that split heads differently: two steps' worth
        staging = 2 * pages_for(eng.scheduler.max_prefill_tokens, eng.cache.page_size) * sum(
            p.layout.page_nbytes for p in self.runner.rank_pools)
        self.sender = KVSender(PoolSet.of_runner(self.runner), self.runner.fingerprint, cfg.transfer, cfg.node.host,
                               staging_nbytes=staging)
        self.eos_ids = frozenset(self.runner.loaded.eos_token_ids)
        self.jobs: dict[str, PrefillJob] = {}           # transfer_id -> job
        self.early_dests: dict[str, tuple[float, list[int]]] = {}  # KVDest before the PrefillReq

    def bootstrap_endpoint(self) -> str | None:
        return self.sender.bootstrap_endpoint

    # -- messages -----------------------------------------------------------------------------
    def handle(self, msg: NodeMessage) -> None:
        if isinstance(msg, PrefillReq):
            self._prefill(msg)
        elif isinstance(msg, AbortReq):
            job = self.sched.find(msg.rid)
            if job is not None:
                self._drop(job, ok=False, error=f"aborted: {msg.reason}", notify_router=False)
        else:
            log.warning("prefill node ignores %s", type(msg).__name__)

    def _prefill(self, msg: PrefillReq) -> None:
        try:
            validate_request(msg.input_ids, msg.sampling, self.runner.vocab_size, self.runner.context_length)
            self.runner.sampler.check_grammar(msg.sampling)
            if pages_for(len(msg.input_ids), self.kv.page_size) > self.kv.num_pages:
                raise ValueError(f"prompt: {len(msg.input_ids)} tokens exceed this node's KV pool "
                                 f"({self.runner.pool.capacity_tokens} tokens)")
            if msg.transfer_id in self.jobs:
                raise ValueError(f"duplicate transfer id {msg.transfer_id}")
        except ValueError as exc:
            self.sender.abort(msg.transfer_id, reason=str(exc))  # the decode node frees its pages now
            self.send(msg.reply_to, PrefillStatus(rid=msg.rid, transfer_id=msg.transfer_id, ok=False, error=str(exc)))
            return
        req = Request(rid=msg.rid, prompt_ids=list(msg.input_ids), params=msg.sampling, eos_token_ids=self.eos_ids,
                      generator=make_generator(msg.sampling, self.runner.device))
        job = PrefillJob(req=req, transfer_id=msg.transfer_id, reply_to=msg.reply_to)
        early = self.early_dests.pop(msg.transfer_id, None)
        if early is not None:
            job.dst_pages = early[1]
        self.jobs[msg.transfer_id] = job
        self.sched.add(job)
        self.node_metrics.begin(msg.rid, "queue")
        log.debug("prefill %s: %d tokens queued (dest %s)", msg.rid, len(msg.input_ids),
                  "known" if job.dst_pages is not None else "pending")

    # -- work ---------------------------------------------------------------------------------
    def tick(self) -> bool:
        self._poll_transfers()
        step, jobs = self.sched.schedule()
        if step:
            for job in jobs:
                self.node_metrics.lap(job.rid, "queue", then="prefill")
            try:
                sampled = self.runner.step(step.seqs, step.reqs)
            except Exception as exc:
                log.exception("prefill step failed")
                for job in jobs:
                    self._drop(job, ok=False, error=f"prefill failed: {exc}")
                return True
            self.sched.commit(step, jobs, sampled)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step: %s", [(j.rid, s.num_new_tokens) for j, s in zip(jobs, step.seqs)])
            for job in jobs:
                if job.finished_prefill:
                    self.node_metrics.lap(job.rid, "prefill", then="transfer")
                self._push_ready_pages(job)
        for job in self.sched.expired(self.cfg.transfer.transfer_timeout_s):
            self._drop(job, ok=False, error="decode node never sent its page locations")
        return self.sched.num_jobs > 0

    def _poll_transfers(self) -> None:
        now = time.monotonic()
        for ev in self.sender.poll():
            job = self.jobs.get(ev.transfer_id)
            log.debug("transfer event %s", ev)
            if isinstance(ev, DestReady):
                if job is None:
                    self.early_dests[ev.transfer_id] = (now, list(ev.dst_page_ids))
                    continue
                job.dst_pages = list(ev.dst_page_ids)
                self._push_ready_pages(job)
            elif isinstance(ev, TransferSent) and job is not None:
                self._drop(job, ok=True, cache=True)   # KV and first token are on decode
            elif isinstance(ev, TransferCancelled) and job is not None:
                self._drop(job, ok=False, error=f"transfer cancelled: {ev.reason}")
        stale = [t for t, (ts, _) in self.early_dests.items() if now - ts > self.cfg.transfer.transfer_timeout_s]
        for tid in stale:
            del self.early_dests[tid]

    def _push_ready_pages(self, job: PrefillJob) -> None:
        if job.dst_pages is None or job.finish_called:
            return
        needed = pages_for(len(job.req.prompt_ids), self.kv.page_size)
        if len(job.dst_pages) != needed:
            self._drop(job, ok=False, error=f"decode node offered {len(job.dst_pages)} pages, prompt needs {needed}")
            return
        if not job.req.page_ids:
            return  # still queued here: pages are written once it is admitted and computed
        ready = job.pages_ready(self.kv.page_size)
        if ready > job.pages_sent:
            self.sender.write(job.transfer_id, job.req.page_ids[job.pages_sent:ready], job.pages_sent)
            job.pages_sent = ready
        if job.finished_prefill and job.pages_sent == job.num_prompt_pages:
            req = job.req
            first = FirstToken(token_id=req.output_ids[0], logprob=req.logprobs[0] if req.logprobs else None,
                               top_logprobs=req.top_logprobs[0] if req.top_logprobs else None,
                               cached_tokens=req.num_cached)
            self.sender.finish(job.transfer_id, msgspec.msgpack.encode(first))
            job.finish_called = True

    def _drop(self, job: PrefillJob, *, ok: bool, error: str | None = None, cache: bool = False,
              notify_router: bool = True) -> None:
        """Finish a job either way: release pages, forget the transfer, tell the router."""
        m = self.sender.metrics(job.transfer_id)
        if not ok:
            self.sender.abort(job.transfer_id)
        self.sched.remove(job, cache=cache)
        self.jobs.pop(job.transfer_id, None)
        self.sender.forget(job.transfer_id)
        if ok:
            self.node_metrics.lap(job.rid, "transfer")
            self.node_metrics.count_prompt(len(job.req.prompt_ids), job.req.num_cached)
            self.node_metrics.on_transfer(m.kv_bytes if m else 0, m.busy_ms if m else 0.0)
        self.node_metrics.end(job.rid)
        if notify_router:
            self.send(job.reply_to, PrefillStatus(
                rid=job.rid, transfer_id=job.transfer_id, ok=ok, error=error,
                kv_bytes=m.kv_bytes if m else 0, num_descriptors=m.num_descriptors if m else 0,
                transfer_ms=m.busy_ms if m else 0.0))

    def load(self) -> dict:
        return {"waiting": len(self.sched.waiting), "running": len(self.sched.prefilling) + len(self.sched.sending),
                "free_pages": self.kv.num_free, "total_pages": self.kv.num_pages}

    def close(self) -> None:
        self.sender.close()
        super().close()


def main(argv: list[str]) -> int:
    return run_node(PrefillNode, "prefill", argv)
