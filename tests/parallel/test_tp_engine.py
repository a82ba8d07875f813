"""A tensor-parallel engine is the tp=1 engine, to the token: SmolLM2 (fp32, CPU) split over two
real rank processes joined by gloo (9 query / 3 KV heads: 2 + 1 KV heads per rank), with chunked
prefill, overlap scheduling and requests arriving mid-flight; and DP attention (tp=2, dp=2: two
attention groups, MLP split over both ranks). Compared with transformers' own greedy output."""

from __future__ import annotations

import pytest

from pdserve.sampling_params import SamplingParams
from tests.parity_cases import PARITY_NEW_TOKENS

pytestmark = pytest.mark.slow

PICKS = [0, 2, 5]            # 5, 64 and 513 prompt tokens (5 chunks of 128)
FLAGS = dict(max_total_tokens=8192, chunked_prefill_size=128, max_prefill_tokens=256, page_size=16, cpu_threads=1)


def run(engine, prompts):
    core = engine.core
    params = SamplingParams(temperature=0, max_new_tokens=PARITY_NEW_TOKENS, ignore_eos=True, logprobs=True)
    reqs = [core.add_request(f"r{i}", prompts[i], params) for i in PICKS[:2]]
    core.step()
    core.step()                                   # the last one arrives while the first two run
    reqs.append(core.add_request("late", prompts[PICKS[2]], params))
    while not all(r.is_finished for r in reqs):
        core.step()
    core.drain()
    return reqs


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(tp=2, dp=2, enable_dp_attention=True)],
                         ids=["tp2", "tp2-dp2-attention"])
def test_parallel_engine_matches_transformers(smollm2_path, parity_prompts, parity_expected, parallel):
    from pdserve import Engine

    with Engine(model_path=smollm2_path, **FLAGS, **parallel) as engine:
        runner = engine.core.runner
        assert runner.rank_layout.world_size == 2 and runner.ranks is not None
        assert [p.layout.num_kv_heads for p in runner.rank_pools] == ([2, 1] if "dp" not in parallel else [3, 3])
        reqs = run(engine, parity_prompts)
        if "dp" in parallel:          # the requests were spread over both attention groups
            assert {len(g.scheduler.running) + len(g.scheduler.waiting) for g in engine.core.groups} == {0}
            assert all(g.kv.num_free + (g.kv.cache.num_pages if g.kv.cache else 0) == g.kv.num_pages
                       for g in engine.core.groups)
        for req, i in zip(reqs, PICKS):
            assert req.error is None
            assert req.output_ids == parity_expected[i][0], f"prompt {i}"
            assert req.logprobs == pytest.approx(parity_expected[i][1], abs=1e-4)
    assert all(p.poll() is not None for p in runner.ranks.procs)   # close() stopped the other rank


def test_dp_groups_both_serve(smollm2_path, parity_prompts):
    """Two requests at once land in different attention groups (least load first); a later request
    goes where its prompt's pages are cached."""
    from pdserve import Engine

    with Engine(model_path=smollm2_path, tp=2, dp=2, enable_dp_attention=True, **FLAGS) as engine:
        core = engine.core
        params = SamplingParams(temperature=0, max_new_tokens=2)
        core.add_request("a", parity_prompts[0], params)
        core.add_request("b", parity_prompts[1], params)
        assert [g.scheduler.num_requests for g in core.groups] == [1, 1]
        while core.has_work:
            core.step()
        again = core.add_request("c", parity_prompts[1], params)     # b's prompt: b ran in group 1
        assert again in core.groups[1].scheduler.waiting and again.num_cached == 0
        while core.has_work:
            core.step()
        assert again.num_cached == 16 and again.error is None        # one whole page from group 1's cache
