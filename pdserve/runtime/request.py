"""One request's state inside an engine (colocated, prefill or decode)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pdserve.protocol import TokenLogprob
from pdserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"        # queued; no pages yet (or retracted)
    RUNNING = "running"        # in the running batch (prefilling or decoding)
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    page_ids: list[int] = field(default_factory=list)   # page table; owns one ref per page
    num_cached: int = 0          # prompt tokens served by the prefix cache at admission
    num_computed: int = 0        # tokens whose K/V is in the pool (or being written by a launched step)
    num_future: int = 0          # tokens sampled by a launched step, not yet known here (overlap: 0 or 1)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    matched_stop: int | None = None
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_sent: int = 0            # output tokens already handed to the caller
    num_retractions: int = 0
    draft_budget: int | None = None   # speculative: most tokens to draft next step (None: --speculative-num-steps)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        """Tokens in the sequence, counting ``num_future`` tokens a launched step is sampling."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_future

    @property
    def num_outputs(self) -> int:
        """Output tokens, known or being sampled."""
        return len(self.output_ids) + self.num_future

    @property
    def num_pending(self) -> int:
        """Tokens without K/V yet: the whole prompt when new, the last sampled token when decoding
        (after a retraction: prompt + output so far, recomputed like a prompt)."""
        return self.seq_len - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending > 1

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int, logprob: float | None, top: list[TokenLogprob] | None) -> None:
        self.output_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if self.params.logprobs and logprob is not None:
            self.logprobs.append(logprob)
            if self.params.top_logprobs:
                self.top_logprobs.append(top or [])
        self._check_finished(token_id)

    def _check_finished(self, token_id: int) -> None:
        p = self.params
        n = len(self.output_ids)
        if n >= p.min_new_tokens:
            if token_id in p.stop_token_ids:
                self.finish("stop", matched_stop=token_id)
                return
            if not p.ignore_eos and token_id in self.eos_token_ids:
                self.finish("stop", matched_stop=token_id)
                return
        if n >= p.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str, *, matched_stop: int | None = None, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.matched_stop = matched_stop
        self.error = error
