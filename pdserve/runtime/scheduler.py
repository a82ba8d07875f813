"""Continuous-batching scheduler with chunked prefill mixed into decode steps.

One request's path: ``add`` puts it in ``waiting``. A step first gives every decoding request in
``running`` room for one more token (retracting the newest requests back to ``waiting`` when pages
run out), then spends ``max_prefill_tokens`` on prompts: the request already mid-prefill first,
then waiting requests in policy order (fcfs, or lpm: longest cached prefix first), each admitted
only if its chunk and a reserve for the running batch's future output fit in the pool. A prompt
longer than ``chunked_prefill_size`` takes several steps. ``schedule`` returns plain data (no model
involved); ``commit`` applies the sampled tokens and retires finished requests, whose pages go to
the prefix cache.

Overlap (the engine plans step N+1 while step N runs on the GPU): ``mark_launched`` advances a
step's counts before its tokens are known (``req.num_future``); a decode request whose next input
is still being sampled gets ``FUTURE_TOKEN`` as its input id, resolved on the device by the runner.
Planned ahead, ``schedule(allow_retract=False)`` returns None instead of retracting: retraction
must see the previous step's results.

Speculative decoding (--speculative-algorithm NGRAM, ``spec_ngram.py``): a greedy decoding request
whose n-gram drafter finds a match gets a row of 1 + k tokens (its last token and k drafts) with
room for them in its pages; ``commit`` takes the tokens that survived verification, rewinds
``num_computed`` past the rejected drafts and hands back pages beyond the sequence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.config import SchedulerConfig
from pdserve.runtime.forward import FUTURE_TOKEN, SeqChunk
from pdserve.runtime.kv_manager import KVManager, pages_for
from pdserve.runtime.request import Request, Status
from pdserve.runtime.spec_ngram import NgramDrafter, can_speculate

RESERVE_CLIP_TOKENS = 4096     # a request's future output counted in the reserve at most this much


@dataclass
class ScheduledStep:
    reqs: list[Request]
    seqs: list[SeqChunk]        # seqs[i] belongs to reqs[i]
    launched: bool = False      # mark_launched ran: counts already advanced

    @property
    def sampling_reqs(self) -> list[Request]:
        return [r for r, s in zip(self.reqs, self.seqs) if s.need_logits]

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVManager, max_running: int, max_seq_len: int,
                 drafter: NgramDrafter | None = None) -> None:
        self.cfg = cfg
        self.drafter = drafter
        self.max_seq_len = max_seq_len
        self.kv = kv
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.init_token_ratio = min(1.0, 0.7 * cfg.schedule_conservativeness)
        self.min_token_ratio = min(self.init_token_ratio, 0.1 * cfg.schedule_conservativeness)
        self.new_token_ratio = self.init_token_ratio
        self.num_retractions = 0

    # -- queue management ---------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, rid: str, reason: str = "abort", release: bool = True) -> Request | None:
        """Finish and drop a request; its pages go back unless ``release`` is False (a step in
        flight may still write them: the caller releases them later with ``release_finished``)."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    req.finish(reason)
                    if release:
                        self.release_finished([req])
                    return req
        return None

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step -----------------------------------------------------------------------------
    def schedule(self, allow_retract: bool = True) -> ScheduledStep | None:
        """The next step; None when it needs a retraction and ``allow_retract`` is False."""
        step = ScheduledStep([], [])
        if self.cfg.disable_mixed_chunk:   # prefill-only steps first, decode-only otherwise
            self._schedule_prefill(step)
            if step:
                return step
            return step if self._schedule_decode(step, allow_retract) else None
        if not self._schedule_decode(step, allow_retract):
            return None
        self._schedule_prefill(step)
        if not any(r.is_prefilling for r in self.running):
            self.new_token_ratio = max(self.min_token_ratio, self.new_token_ratio - 0.001)
        return step

    def _will_finish(self, req: Request) -> bool:
        """A token being sampled ends the request by length: no step for it after that one."""
        return req.num_future > 0 and (req.num_outputs >= req.params.max_new_tokens
                                       or req.seq_len >= self.max_seq_len)

    def _schedule_decode(self, step: ScheduledStep, allow_retract: bool) -> bool:
        for req in sorted((r for r in self.running if not r.is_prefilling), key=lambda r: r.arrival_time):
            if req.status is not Status.RUNNING or self._will_finish(req):
                continue  # retracted by an earlier iteration, or ends with the step in flight
            while not self.kv.ensure_capacity(req, req.seq_len):
                if not allow_retract:
                    return False
                # Decode requests are visited oldest first, so the newest is never one already
                # placed in this step; retract it (possibly ``req`` itself) until ``req`` fits.
                victim = max(self.running, key=lambda r: r.arrival_time)
                self._retract(victim)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                step.reqs.append(req)
                step.seqs.append(self._decode_chunk(req))
        return True

    def _decode_chunk(self, req: Request) -> SeqChunk:
        """The request's decode row: its last token, then the drafts that fit its pages (if any)."""
        chunk = _chunk(req, 1)
        draft = self.draft(req)
        extra = pages_for(req.seq_len + len(draft), self.kv.page_size) - len(req.page_ids)
        if extra > 0 and extra + len(self.running) > self.kv.available_pages():
            draft = []   # drafts never take the pages the running batch's next tokens need
        if draft and self.kv.ensure_capacity(req, req.seq_len + len(draft)):
            chunk.input_ids += draft
            chunk.page_ids = list(req.page_ids)
            chunk.num_draft = len(draft)
        return chunk

    def draft(self, req: Request) -> list[int]:
        """Speculative drafts for ``req``'s next step: none past max_new_tokens (the target adds one
        token after the accepted drafts) or past the context."""
        if self.drafter is None or req.num_future or not can_speculate(req):   # (drafts need the last token)
            return []
        room = min(req.params.max_new_tokens - len(req.output_ids) - 1, self.max_seq_len - req.seq_len)
        if req.draft_budget is not None:
            room = min(room, req.draft_budget)
        return self.drafter.propose(req.all_ids, room)

    def _schedule_prefill(self, step: ScheduledStep) -> None:
        budget = self.cfg.max_prefill_tokens
        for req in [r for r in self.running if r.is_prefilling]:
            budget = self._add_prefill_chunk(step, req, budget)
            if budget <= 0:
                return
        if self.cfg.schedule_policy == "lpm" and len(self.waiting) > 1:
            self.waiting = deque(sorted(self.waiting, key=lambda r: -self.kv.prefix_len(r.all_ids)))
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            self.kv.match_prefix(req)
            n = min(req.num_pending, self.cfg.chunked_prefill_size, budget)
            need = pages_for(req.num_computed + n, self.kv.page_size) - len(req.page_ids)
            if need + self.reserve_pages([req], req.num_pending - n) > self.kv.available_pages():
                self.kv.release(req, cache=False)  # give back the matched prefix references
                req.num_cached = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            budget = self._add_prefill_chunk(step, req, budget)

    def _add_prefill_chunk(self, step: ScheduledStep, req: Request, budget: int) -> int:
        n = min(req.num_pending, self.cfg.chunked_prefill_size, budget)
        if n <= 0 or not self.kv.ensure_capacity(req, req.num_computed + n):
            return budget
        step.reqs.append(req)
        step.seqs.append(_chunk(req, n))
        return budget - n

    def reserve_pages(self, extras: list[Request], pending_tokens: int = 0) -> int:
        """Pages to keep free for ``pending_tokens`` not yet allocated and for the future output
        of the running batch and ``extras``, scaled by the new-token ratio (the admission reserve)."""
        tokens = float(pending_tokens)
        for r in [*self.running, *extras]:
            remaining = r.params.max_new_tokens - len(r.output_ids)
            tokens += min(remaining, RESERVE_CLIP_TOKENS) * self.new_token_ratio
        return pages_for(int(tokens), self.kv.page_size)

    def add_running(self, req: Request) -> None:
        """Put a request whose prompt K/V is already in the pool (moved in by a transfer)
        straight into the running batch."""
        req.status = Status.RUNNING
        self.running.append(req)

    # -- retraction ---------------------------------------------------------------------------
    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.release(req, cache=True)  # its computed pages stay reusable through the cache
        req.status = Status.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)
        self.new_token_ratio = self.init_token_ratio

    # -- after the forward --------------------------------------------------------------------
    def mark_launched(self, step: ScheduledStep) -> None:
        """The step is on the device: its K/V counts as computed, its samples as pending."""
        for req, seq in zip(step.reqs, step.seqs):
            req.num_computed += seq.num_new_tokens
            req.num_future += seq.need_logits
        step.launched = True

    def commit(self, step: ScheduledStep, sampled: dict[int, tuple], release: bool = True) -> list[Request]:
        """Apply ``sampled[i] = (token, logprob, top)`` for step index i (advancing the counts
        first unless ``mark_launched`` did).

        Returns the requests that finished in this step, already out of ``running``; their pages
        are released here unless ``release`` is False (a later step in flight may still write
        them: the caller releases them with ``release_finished`` once it is done). Requests
        finished before this step (an abort, a stop token seen one step earlier) are skipped.
        """
        finished = []
        for i, (req, seq) in enumerate(zip(step.reqs, step.seqs)):
            if step.launched:
                req.num_future -= seq.need_logits
            else:
                req.num_computed += seq.num_new_tokens
            if req.is_finished:
                continue
            if i in sampled and seq.num_draft:
                self._commit_verified(req, seq, sampled[i])
            elif i in sampled:
                req.append_token(*sampled[i])
                if not req.is_finished and req.seq_len >= self.max_seq_len:
                    req.finish("length")
            if req.is_finished:
                self.running.remove(req)
                finished.append(req)
        if release:
            self.release_finished(finished)
        return finished

    def _commit_verified(self, req: Request, seq: SeqChunk, tokens: list[tuple]) -> None:
        """A verify row's result: ``tokens`` = the accepted drafts, then the target's own next token.
        The KV of rejected drafts is dropped (``num_computed`` rewound); appending stops at a stop
        token, max_new_tokens or the context, so no accepted draft overshoots them."""
        accepted = len(tokens) - 1
        req.num_computed -= seq.num_draft - accepted
        # Next time: one more than the drafts accepted now, or twice as many if all were (at most k).
        req.draft_budget = accepted + 1 if accepted < seq.num_draft else 2 * accepted
        for token in tokens:
            req.append_token(*token)
            if not req.is_finished and req.seq_len >= self.max_seq_len:
                req.finish("length")
            if req.is_finished:
                break
        req.num_computed = min(req.num_computed, req.seq_len - 1)
        if not req.is_finished:   # pages taken for rejected drafts go back
            keep = pages_for(req.seq_len, self.kv.page_size)
            self.kv.allocator.decref(req.page_ids[keep:])
            del req.page_ids[keep:]

    def release_finished(self, reqs: list[Request]) -> None:
        """Give finished requests' pages back; those that ran to a natural end (stop, length)
        offer their computed pages to the prefix cache first."""
        for req in reqs:
            self.kv.release(req, cache=req.error is None and req.finish_reason in ("stop", "length"))


def _chunk(req: Request, n: int) -> SeqChunk:
    start = req.num_computed
    ids = req.all_ids[start:start + n]
    ids += [FUTURE_TOKEN] * (n - len(ids))  # the tail an in-flight step is sampling
    return SeqChunk(rid=req.rid, input_ids=ids, start_pos=start,
                    page_ids=list(req.page_ids), need_logits=start + n == req.seq_len)
