"""The colocated engine: token-level core (used by nodes) and the Python API on top.

``EngineCore.step()`` = schedule (plain data) -> forward -> sample -> commit, and returns what
each request gained this step. A failed step fails only the requests in it; the engine goes on.

Overlap scheduling (unless --disable-overlap-schedule): ``step()`` plans and launches step
N+1 while step N still runs on the GPU, then waits for N's tokens and commits them, so the host's
scheduling, batch building and output handling hide behind device work. Step N+1 reads N's
sampled ids on the device (``FUTURE_TOKEN``). The price: a request that hits a stop token in N
has one wasted row in N+1 (discarded), and its pages are released only once N+1 is done. Steps
that cannot be planned ahead (penalties need the previous token on the host; a retraction needs
N's results) run after N completes, as in the synchronous loop.

Speculative decoding (--speculative-algorithm NGRAM, ``spec_ngram.py``): while a request that can
speculate is running, steps are not planned ahead (drafts need the previous token on the host);
a step that carries drafts runs forward, sampling and verification at once (``SpecLaunched``)
and is committed in the same ``step()``. ``metrics()`` reports the acceptance rate and tokens per
verify step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pdserve.config import EngineConfig, engine_config
from pdserve.protocol import TokenLogprob
from pdserve.runtime.kv_manager import KVManager
from pdserve.runtime.model_runner import LaunchedStep, ModelRunner
from pdserve.runtime.request import Request
from pdserve.runtime.scheduler import ScheduledStep, Scheduler
from pdserve.runtime.spec_ngram import NgramDrafter, SpecLaunched, SpecStats, can_speculate
from pdserve.sampling_params import SamplingParams, sampling_params_from

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass
class RequestOutput:
    """What one request gained in one step (a streaming delta), with the final state if finished."""
    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    extra: dict = field(default_factory=dict)


def take_delta(req: Request) -> RequestOutput:
    """The tokens of ``req`` not yet handed out (and the finish state)."""
    start = req.num_sent
    req.num_sent = len(req.output_ids)
    lp = req.logprobs[start:] if req.params.logprobs else None
    top = req.top_logprobs[start:] if req.params.logprobs and req.params.top_logprobs else None
    return RequestOutput(rid=req.rid, token_ids=req.output_ids[start:], logprobs=lp, top_logprobs=top,
                         finished=req.is_finished, finish_reason=req.finish_reason,
                         matched_stop=req.matched_stop, error=req.error,
                         prompt_tokens=len(req.prompt_ids), cached_tokens=req.num_cached)


def validate_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, context_length: int) -> None:
    """Raise ValueError (one line, naming the field) for a request the engine cannot serve."""
    if not prompt_ids:
        raise ValueError("prompt: must contain at least one token")
    bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt: token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(prompt_ids) >= context_length:
        raise ValueError(f"prompt: {len(prompt_ids)} tokens do not fit the context length {context_length} "
                         f"(at least one output token is needed)")
    params.validate(vocab_size)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


@dataclass
class InFlight:
    step: ScheduledStep
    launched: LaunchedStep


class EngineCore:
    def __init__(self, cfg: EngineConfig, runner: ModelRunner | None = None, overlap: bool | None = None) -> None:
        """``overlap``: None = on unless --disable-overlap-schedule. On CPU it gains nothing (one
        device, synchronous), but CPU runs then take the path GPU runs take, and CI tests it."""
        self.cfg = cfg
        self.runner = runner or ModelRunner(cfg)
        self.kv = KVManager(self.runner.pool.num_pages, cfg.cache.page_size,
                            enable_prefix_cache=not cfg.cache.disable_radix_cache)
        max_running = cfg.scheduler.max_running_requests or min(256, self.kv.num_pages)
        self.drafter = NgramDrafter(cfg.speculative) if cfg.speculative.is_enabled else None
        self.spec_stats = SpecStats()
        self.scheduler = Scheduler(cfg.scheduler, self.kv, max_running, self.runner.context_length, self.drafter)
        self.eos_ids = frozenset(self.runner.loaded.eos_token_ids)
        if overlap is None:
            overlap = not cfg.kernel.disable_overlap_schedule
        self.overlap = overlap
        self._pending: list[RequestOutput] = []   # outputs produced outside step() (aborts)
        self._inflight: InFlight | None = None    # launched, not yet committed
        self._unreleased: list[Request] = []      # finished while a launched step may still write their pages
        self.num_overlapped = 0                   # steps launched before the previous one completed
        self.stream_interval = cfg.scheduler.stream_interval  # tokens per output delta (the last may be fewer)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        validate_request(prompt_ids, params, self.vocab_size, self.context_length)
        self.runner.sampler.check_grammar(params)
        req = Request(rid=rid, prompt_ids=list(prompt_ids), params=params, eos_token_ids=self.eos_ids,
                      generator=make_generator(params, self.runner.device))
        self.scheduler.add(req)
        return req

    def abort(self, rid: str, reason: str = "abort") -> bool:
        req = self.scheduler.abort(rid, reason, release=self._inflight is None)
        if req is None:
            return False
        if self._inflight is not None:
            self._unreleased.append(req)
        self._pending.append(take_delta(req))
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.num_requests > 0 or bool(self._pending) or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Launch the next step and commit the previous one (overlap), or run one step (sync)."""
        outputs, self._pending = self._pending, []
        prev, self._inflight = self._inflight, None
        step = self._plan(prev)
        if step is None:  # could not be planned ahead: finish the step in flight first
            outputs += self._complete(prev)
            prev, step = None, self.scheduler.schedule()
        if step:
            self._launch(step, prev, outputs)
            self.num_overlapped += prev is not None
        if prev is not None:
            outputs += self._complete(prev)
        if self._inflight is not None and (not self.overlap or isinstance(self._inflight.launched, SpecLaunched)):
            inflight, self._inflight = self._inflight, None
            outputs += self._complete(inflight)
        if self._inflight is None and self._unreleased:
            self.scheduler.release_finished(self._unreleased)
            self._unreleased = []
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Complete the step in flight (if any) and release what waited for it."""
        outputs, self._pending = self._pending, []
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            outputs += self._complete(inflight)
        self.scheduler.release_finished(self._unreleased)
        self._unreleased = []
        return outputs

    def _plan(self, prev: InFlight | None) -> ScheduledStep | None:
        if prev is None:
            return self.scheduler.schedule()
        if not self.overlap or any(r.params.has_penalties or r.params.grammar is not None  # need the last token
                                   or (self.drafter is not None and can_speculate(r))
                                   for r in self.scheduler.running):
            return None
        return self.scheduler.schedule(allow_retract=False)

    def _launch(self, step: ScheduledStep, prev: InFlight | None, outputs: list[RequestOutput]) -> None:
        try:
            if any(s.num_draft for s in step.seqs):
                if prev is not None:
                    raise RuntimeError("a verify step cannot be planned ahead of the step in flight")
                launched = SpecLaunched(self.runner, step.seqs, step.reqs, self.spec_stats,
                                        self.cfg.serving.enable_nan_detection)
            else:
                launched = self.runner.launch(step.seqs, step.reqs, prev.launched if prev else None)
        except Exception as exc:  # a bad step fails its requests, never the engine
            log.exception("forward step failed")
            outputs += self._fail(step, f"internal error: {exc}", in_flight=prev is not None)
            return
        self.scheduler.mark_launched(step)
        self._inflight = InFlight(step, launched)

    def _complete(self, inflight: InFlight) -> list[RequestOutput]:
        """Wait for a launched step's tokens and commit them."""
        unreleased, self._unreleased = self._unreleased, []
        try:
            sampled = inflight.launched.result()
        except Exception as exc:
            log.exception("forward step failed")
            self._unreleased = unreleased
            return self._fail(inflight.step, f"internal error: {exc}", in_flight=self._inflight is not None)
        self.scheduler.release_finished(unreleased)  # the step that could still write them is done
        outputs = self._fail_nonfinite(inflight)
        done_before = {id(r) for r in inflight.step.reqs if r.is_finished}
        finished = self.scheduler.commit(inflight.step, sampled, release=self._inflight is None)
        if self._inflight is not None:
            self._unreleased += finished
        seen = set(done_before)
        for req in inflight.step.reqs:
            is_due = len(req.output_ids) - req.num_sent >= self.stream_interval  # --stream-interval
            if id(req) not in seen and (is_due or req.is_finished):
                seen.add(id(req))
                outputs.append(take_delta(req))
        return outputs

    def _fail_nonfinite(self, inflight: InFlight) -> list[RequestOutput]:
        """--enable-nan-detection: the step's requests whose logits held NaN or inf fail (their
        sampled token is never committed)."""
        step = inflight.step
        bad = [i for i in inflight.launched.nonfinite if not step.reqs[i].is_finished]
        if not bad:   # (a step planned ahead may still carry a request that already failed)
            return []
        log.error("NaN/inf logits for request(s) %s", [step.reqs[i].rid for i in bad])
        return self._fail(ScheduledStep([step.reqs[i] for i in bad], [step.seqs[i] for i in bad]),
                          "internal error: the model produced NaN or inf logits (--enable-nan-detection)",
                          in_flight=self._inflight is not None)

    def _fail(self, step: ScheduledStep, error: str, in_flight: bool) -> list[RequestOutput]:
        outs = []
        for req in {id(r): r for r in step.reqs}.values():
            if req.is_finished:
                continue
            if self.scheduler.abort(req.rid, "error", release=not in_flight) is not None and in_flight:
                self._unreleased.append(req)
            req.error = error
            outs.append(take_delta(req))
        return outs

    def load(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "free_pages": self.kv.num_free, "total_pages": self.kv.num_pages}

    def metrics(self) -> dict:
        """Counters beyond ``load()``: speculative decoding's drafted / accepted tokens, acceptance
        rate and tokens gained per verify row (zeros without --speculative-algorithm)."""
        return self.spec_stats.as_dict()

    @property
    def groups(self) -> list["EngineCore"]:
        """The attention groups' engines (this one alone; several under DP attention: dp_engine.py)."""
        return [self]

    # -- for DPEngineCore, which runs one forward for the steps of several of these ---------------
    def take_pending(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        return outputs

    def commit_launched(self, step: ScheduledStep, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for ``launched`` (this engine's part of a step) and commit it (no overlap)."""
        self.scheduler.mark_launched(step)
        outputs = self._complete(InFlight(step, launched))
        self.scheduler.release_finished(self._unreleased)
        self._unreleased = []
        return outputs

    def fail_step(self, step: ScheduledStep, error: str) -> list[RequestOutput]:
        return self._fail(step, error, in_flight=False)


class Engine:
    """Python API: ``Engine(model_path="smollm2", **flags).generate(prompts, sampling_params)``."""

    def __init__(self, model_path: str = "smollm2", **flags) -> None:
        self.config = engine_config(model_path=model_path, **flags)
        from pdserve.runtime.dp_engine import make_engine_core
        self.core = make_engine_core(self.config, ModelRunner(self.config))
        self.tokenizer = self.core.runner.tokenizer

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel engine (they also stop when this process exits)."""
        self.core.runner.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prepare(self, prompts, sampling_params) -> list[tuple[list[int], SamplingParams]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts: expected a non-empty list of strings or of token-id lists")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
            params = [sampling_params_from(p) for p in sampling_params]
        else:
            params = [sampling_params_from(sampling_params)] * len(prompts)
        items = []
        for prompt, p in zip(prompts, params):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            validate_request(ids, p, self.core.vocab_size, self.core.context_length)
            items.append((ids, p))
        return items

    def generate(self, prompts, sampling_params=None) -> list[dict]:
        """Run prompts (strings or token-id lists) to completion; one result dict per prompt."""
        items = self._prepare(prompts, sampling_params)
        rids = [f"gen-{next(_ids)}" for _ in items]
        reqs = {rid: self.core.add_request(rid, ids, p) for rid, (ids, p) in zip(rids, items)}
        while any(not r.is_finished for r in reqs.values()):
            self.core.step()
        self.core.drain()  # a step launched ahead may still hold finished requests' pages
        return [self._result(reqs[rid]) for rid in rids]

    def stream(self, prompt, sampling_params=None) -> Iterator[dict]:
        """Yield ``{"text", "token_ids", "finished", "finish_reason", ...}`` deltas for one prompt."""
        if isinstance(sampling_params, list):
            raise ValueError("sampling_params: stream() takes one prompt and one sampling_params dict")
        ((ids, p),) = self._prepare([prompt], sampling_params)
        rid = f"gen-{next(_ids)}"
        req = self.core.add_request(rid, ids, p)
        text_so_far = ""
        try:
            while True:
                for out in self.core.step():
                    if out.rid != rid:
                        continue
                    text = self.tokenizer.decode(req.output_ids[:req.num_sent])
                    delta, text_so_far = text[len(text_so_far):], text
                    yield {"text": delta, "token_ids": out.token_ids, "logprobs": out.logprobs,
                           "finished": out.finished, "finish_reason": out.finish_reason}
                    if out.finished:
                        return
        finally:
            if not req.is_finished:
                self.core.abort(rid)

    def _result(self, req: Request) -> dict:
        res = {"text": self.tokenizer.decode(req.output_ids), "token_ids": list(req.output_ids),
               "finish_reason": req.finish_reason, "prompt_tokens": len(req.prompt_ids),
               "completion_tokens": len(req.output_ids), "cached_tokens": req.num_cached}
        if req.params.logprobs:
            res["logprobs"] = list(req.logprobs)
            if req.params.top_logprobs:
                res["top_logprobs"] = [[(t.token_id, t.logprob) for t in row] for row in req.top_logprobs]
        if req.error:
            res["error"] = req.error
        return res
