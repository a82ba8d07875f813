"""DP attention: one engine per attention group, one forward for all of them.

With ``--enable-dp-attention --dp M`` a node's ranks form M attention groups (runtime/parallel.py),
each with its own KV pages. Rank 0 keeps one ``EngineCore`` per group (its own scheduler, page
table and prefix cache over that group's pool) and runs their steps together: each group plans
its step, ``ModelRunner.launch_groups`` runs one forward (every group's attention over its own
pages, the MLP over all groups' tokens), and each group commits its own rows. A request lives in
one group for its whole life; new requests go to the group whose prefix cache holds most of the
prompt, else to the one with the least load.

One request's path: ``add_request`` -> the waiting queue of the group caching most of its
prompt (else the least loaded) -> that group's running batch -> its rows of each joint step -> finished, pages freed in that group.
Steps are not overlapped (each waits for the previous one's tokens) and run without CUDA graphs:
the groups' batch sizes differ from step to step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pdserve.config import EngineConfig
from pdserve.runtime.engine import EngineCore, RequestOutput
from pdserve.runtime.model_runner import ModelRunner
from pdserve.runtime.request import Request
from pdserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def make_engine_core(cfg: EngineConfig, runner: ModelRunner):
    """An ``EngineCore``, or a ``DPEngineCore`` when the runner has DP attention groups."""
    if runner.rank_layout.dp_size > 1:
        return DPEngineCore(cfg, runner)
    return EngineCore(cfg, runner)


class DPEngineCore:
    def __init__(self, cfg: EngineConfig, runner: ModelRunner) -> None:
        self.cfg, self.runner = cfg, runner
        self.groups = [EngineCore(cfg, runner, overlap=False) for _ in range(runner.rank_layout.dp_size)]
        self.eos_ids = self.groups[0].eos_ids
        self.scheduler = _SchedulerSummary(self.groups)
        self.kv = _KVSummary(self.groups)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    def pick_group(self, prompt_ids: list[int] | None = None) -> int:
        """The group whose prefix cache holds the longest part of the prompt (page-granular: the
        other choices of an n > 1 request find the first one's pages), then the fewest requests,
        then the most free pages."""
        def key(g: int):
            grp = self.groups[g]
            cached = grp.kv.prefix_len(prompt_ids) if prompt_ids else 0
            return -cached, grp.scheduler.num_requests, -grp.kv.available_pages()
        return min(range(len(self.groups)), key=key)

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        return self.groups[self.pick_group(prompt_ids)].add_request(rid, prompt_ids, params)

    def abort(self, rid: str, reason: str = "abort") -> bool:
        return any(g.abort(rid, reason) for g in self.groups)

    @property
    def has_work(self) -> bool:
        return any(g.has_work for g in self.groups)

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        steps = []
        for g in self.groups:
            outputs += g.take_pending()
            steps.append(g.scheduler.schedule())
        if not any(steps):
            return outputs
        try:
            launched = self.runner.launch_groups([(s.seqs, s.reqs) if s else ([], []) for s in steps])
        except Exception as exc:  # a bad step fails its requests, never the engine (RankLost is fatal)
            log.exception("DP attention step failed")
            for g, s in zip(self.groups, steps):
                if s:
                    outputs += g.fail_step(s, f"internal error: {exc}")
            return outputs
        for g, s, launch in zip(self.groups, steps, launched):
            if s:
                outputs += g.commit_launched(s, launch)
        return outputs

    def drain(self) -> list[RequestOutput]:
        return [out for g in self.groups for out in g.drain()]

    def load(self) -> dict:
        loads = [g.load() for g in self.groups]
        return {k: sum(load[k] for load in loads) for k in loads[0]}

    def metrics(self) -> dict:
        """The groups' counters summed (rates are not summable: left out)."""
        merged: dict = {}
        for m in (g.metrics() for g in self.groups):
            for k, v in m.items():
                if isinstance(v, int):
                    merged[k] = merged.get(k, 0) + v
        return merged


@dataclass
class _SchedulerSummary:
    """What node code reads of ``core.scheduler``, summed over the groups (read-only)."""
    groups: list[EngineCore]

    @property
    def num_requests(self) -> int:
        return sum(g.scheduler.num_requests for g in self.groups)

    @property
    def running(self) -> list[Request]:
        return [r for g in self.groups for r in g.scheduler.running]

    @property
    def waiting(self) -> list[Request]:
        return [r for g in self.groups for r in g.scheduler.waiting]

    @property
    def max_running(self) -> int:
        return sum(g.scheduler.max_running for g in self.groups)


@dataclass
class _KVSummary:
    """What node code reads of ``core.kv``, summed over the groups (read-only)."""
    groups: list[EngineCore]

    @property
    def num_pages(self) -> int:
        return sum(g.kv.num_pages for g in self.groups)

    @property
    def num_free(self) -> int:
        return sum(g.kv.num_free for g in self.groups)

    @property
    def page_size(self) -> int:
        return self.groups[0].kv.page_size

    def available_pages(self) -> int:
        return sum(g.kv.available_pages() for g in self.groups)

    @property
    def cache(self):
        caches = [g.kv.cache for g in self.groups if g.kv.cache is not None]
        return _CacheSummary(sum(c.num_pages for c in caches)) if caches else None


@dataclass
class _CacheSummary:
    num_pages: int
