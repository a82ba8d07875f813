"""Prefill scheduler: waiting -> prefilling (chunked) -> sending -> done.

One request's path: a ``PrefillReq`` becomes a ``PrefillJob`` in ``waiting``. Admission (fcfs, or
lpm: longest cached prefix first) matches the prompt against the prefix cache and reserves pages
for the whole prompt at once, so the pages form few contiguous runs and the KV never has to be
re-homed. Each step spends ``max_prefill_tokens`` on chunks of at most ``chunked_prefill_size``
tokens. After every step the node pushes the pages that became complete to the decode node
(overlap: chunk k's KV moves while chunk k+1 computes). The last chunk samples the first token;
the job then waits in ``sending`` until the transfer reports done, when its pages go to the
prefix cache. Everything here is plain data: no model, no transfer.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.runtime.kv_manager import KVManager, pages_for
from pdserve.runtime.request import Request, Status
from pdserve.runtime.scheduler import ScheduledStep, _chunk


@dataclass(eq=False)
class PrefillJob:
    req: Request
    transfer_id: str
    reply_to: str
    dst_pages: list[int] | None = None   # decode node's pages, once its KVDest arrived
    pages_sent: int = 0                  # leading pages of req.page_ids already written
    finished_prefill: bool = False       # first token sampled
    finish_called: bool = False          # sender.finish issued; now only waiting for completion
    created: float = field(default_factory=time.monotonic)

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def num_prompt_pages(self) -> int:
        return len(self.req.page_ids)

    def pages_ready(self, page_size: int) -> int:
        """Leading pages whose K/V is complete (all of them once the prompt is done)."""
        if self.finished_prefill or self.req.num_computed >= len(self.req.prompt_ids):
            return self.num_prompt_pages
        return self.req.num_computed // page_size


class PrefillScheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVManager, max_running: int) -> None:
        self.cfg = cfg
        self.kv = kv
        self.max_running = max_running
        self.waiting: deque[PrefillJob] = deque()
        self.prefilling: list[PrefillJob] = []
        self.sending: list[PrefillJob] = []    # prefill done; KV still moving or dest unknown

    def add(self, job: PrefillJob) -> None:
        self.waiting.append(job)

    def find(self, rid: str) -> PrefillJob | None:
        for job in (*self.waiting, *self.prefilling, *self.sending):
            if job.rid == rid:
                return job
        return None

    def remove(self, job: PrefillJob, *, cache: bool) -> None:
        """Drop a job from whatever queue holds it and release its pages."""
        for queue in (self.waiting, self.prefilling, self.sending):
            if job in queue:
                queue.remove(job)
        if job.req.page_ids:
            self.kv.release(job.req, cache=cache)
        job.req.status = Status.FINISHED

    @property
    def num_jobs(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.sending)

    def schedule(self) -> tuple[ScheduledStep, list[PrefillJob]]:
        step, jobs = ScheduledStep([], []), []
        budget = self.cfg.max_prefill_tokens
        for job in self.prefilling:
            budget = self._add(step, jobs, job, budget)
            if budget <= 0:
                return step, jobs
        if self.cfg.schedule_policy == "lpm" and len(self.waiting) > 1:
            self.waiting = deque(sorted(self.waiting, key=lambda j: -self.kv.prefix_len(j.req.prompt_ids)))
        while self.waiting and budget > 0 and len(self.prefilling) + len(self.sending) < self.max_running:
            job = self.waiting[0]
            if not self._admit(job):
                break
            self.waiting.popleft()
            self.prefilling.append(job)
            budget = self._add(step, jobs, job, budget)
        return step, jobs

    def _admit(self, job: PrefillJob) -> bool:
        req = job.req
        self.kv.match_prefix(req)
        if not self.kv.ensure_capacity(req, len(req.prompt_ids)):
            self.kv.release(req, cache=False)
            req.num_cached = 0
            return False
        req.status = Status.RUNNING
        return True

    def _add(self, step: ScheduledStep, jobs: list[PrefillJob], job: PrefillJob, budget: int) -> int:
        n = min(job.req.num_pending, self.cfg.chunked_prefill_size, budget)
        if n <= 0:
            return budget
        step.reqs.append(job.req)
        step.seqs.append(_chunk(job.req, n))
        jobs.append(job)
        return budget - n

    def commit(self, step: ScheduledStep, jobs: list[PrefillJob], sampled: dict[int, tuple]) -> list[PrefillJob]:
        """Advance computed counts; jobs whose prompt completed move to ``sending`` and are returned."""
        done = []
        for i, (job, seq) in enumerate(zip(jobs, step.seqs)):
            job.req.num_computed += seq.num_new_tokens
            if i in sampled:
                token, logprob, top = sampled[i]
                job.req.output_ids.append(token)
                if job.req.params.logprobs:
                    job.req.logprobs.append(logprob)
                    job.req.top_logprobs.append(top or [])
                job.finished_prefill = True
                self.prefilling.remove(job)
                self.sending.append(job)
                done.append(job)
        return done

    def expired(self, timeout_s: float) -> list[PrefillJob]:
        """Jobs whose decode node never told us where to write (it died or never got the request)."""
        now = time.monotonic()
        return [j for j in (*self.waiting, *self.prefilling, *self.sending)
                if j.dst_pages is None and now - j.created > timeout_s]


def dest_pages_needed(prompt_len: int, page_size: int) -> int:
    return pages_for(prompt_len, page_size)
