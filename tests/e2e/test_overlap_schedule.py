"""Overlap scheduling (step N+1 planned and launched before step N's tokens are on the host),
on here as everywhere by default, against the synchronous loop (--disable-overlap-schedule): the same tokens as the synchronous loop and as transformers, no page leaked,
aborts and stop tokens handled one step late without losing or duplicating output."""

from __future__ import annotations

import pytest

from pdserve.sampling_params import SamplingParams
from tests.parity_cases import PARITY_LENGTHS as LENGTHS, PARITY_NEW_TOKENS as NEW_TOKENS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(smollm2_path):
    from pdserve.config import engine_config
    from pdserve.runtime.model_runner import ModelRunner
    cfg = engine_config(model_path=smollm2_path, max_total_tokens=16384, chunked_prefill_size=128,
                        max_prefill_tokens=256, page_size=16, disable_radix_cache=True)
    return ModelRunner(cfg)


def core(runner, overlap: bool):
    from pdserve.runtime.engine import EngineCore
    return EngineCore(runner.cfg, runner, overlap=overlap)


def run(c, prompts, params, *, waves: int = 3, abort: dict[int, str] | None = None) -> tuple[list, list]:
    """Add prompts in waves (3 steps apart); ``abort``: step number -> rid to abort then.
    Returns the requests and every output delta seen."""
    reqs, outs, n = [], [], 0
    per = -(-len(prompts) // waves)
    for w in range(waves):
        for j, p in enumerate(prompts[w * per:(w + 1) * per]):
            reqs.append(c.add_request(f"r{w}-{j}", p, params[len(reqs)] if isinstance(params, list) else params))
        for _ in range(3):
            outs += c.step()
            n += 1
            if abort and n in abort:
                c.abort(abort[n])
    while any(not r.is_finished for r in reqs):
        outs += c.step()
        n += 1
        if abort and n in abort:
            c.abort(abort[n])
    outs += c.drain()
    return reqs, outs


def assert_no_leak(c):
    assert c.kv.num_free == c.kv.num_pages
    assert not c.scheduler.running and not c.scheduler.waiting


def test_overlap_matches_transformers(runner, parity_prompts, parity_expected):
    c = core(runner, overlap=True)
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    reqs, outs = run(c, parity_prompts, params)
    for req, (tokens, lps), n in zip(reqs, parity_expected, LENGTHS):
        assert req.output_ids == tokens, f"prompt of {n} tokens"
        assert req.logprobs == pytest.approx(lps, abs=1e-4), f"prompt of {n} tokens"
    assert c.num_overlapped > NEW_TOKENS  # most steps were launched ahead
    for req in reqs:  # each token handed out exactly once, the final delta last
        mine = [o for o in outs if o.rid == req.rid]
        assert [t for o in mine for t in o.token_ids] == req.output_ids
        assert [o.finished for o in mine].count(True) == 1 and mine[-1].finished
    assert_no_leak(c)


def _mixed_params(prompts, stop_after: list[int]) -> list[SamplingParams]:
    """Greedy requests that stop on a token they are known to produce, seeded samplers, min_tokens."""
    out = []
    for i, tok in enumerate(stop_after):
        if i % 3 == 0:
            out.append(SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[tok]))
        elif i % 3 == 1:
            out.append(SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_new_tokens=20, logprobs=True,
                                      top_logprobs=2))
        else:
            out.append(SamplingParams(temperature=0, max_new_tokens=16, min_new_tokens=10, stop_token_ids=[tok]))
    return out


def test_stops_seeds_and_min_tokens_equal_sync(runner, parity_prompts, parity_expected):
    prompts = parity_prompts[:5]
    stop_after = [tokens[5] for tokens, _ in parity_expected[:5]]  # each stops after ~6 tokens
    params = _mixed_params(prompts, stop_after)
    sync_reqs, _ = run(core(runner, overlap=False), prompts, params)
    c = core(runner, overlap=True)
    ov_reqs, outs = run(c, prompts, params)
    for s, o in zip(sync_reqs, ov_reqs):
        assert (o.output_ids, o.finish_reason, o.matched_stop) == (s.output_ids, s.finish_reason, s.matched_stop)
        assert [[t.token_id for t in row] for row in o.top_logprobs] == \
            [[t.token_id for t in row] for row in s.top_logprobs]
        assert [t.logprob for row in o.top_logprobs for t in row] == \
            pytest.approx([t.logprob for row in s.top_logprobs for t in row], abs=1e-4)  # batch mates differ
    assert any(r.finish_reason == "stop" and len(r.output_ids) < r.params.max_new_tokens for r in ov_reqs)
    assert all(len(r.output_ids) >= 10 for r, p in zip(ov_reqs, params) if p.min_new_tokens)
    assert_no_leak(c)


def test_penalties_fall_back_to_sync_steps(runner, parity_prompts):
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.4)
    sync_reqs, _ = run(core(runner, overlap=False), parity_prompts[:3], params, waves=1)
    c = core(runner, overlap=True)
    ov_reqs, _ = run(c, parity_prompts[:3], params, waves=1)
    assert [r.output_ids for r in ov_reqs] == [r.output_ids for r in sync_reqs]
    assert c.num_overlapped == 0
    assert_no_leak(c)


def test_abort_while_a_step_is_in_flight(runner, parity_prompts, parity_expected):
    c = core(runner, overlap=True)
    params = SamplingParams(temperature=0, max_new_tokens=2 * NEW_TOKENS, ignore_eos=True)
    prompts = parity_prompts[:4]
    reqs, outs = run(c, prompts, params, waves=1, abort={3: "r0-1", 6: "r0-3"})
    for i in (0, 2):
        assert reqs[i].output_ids[:NEW_TOKENS] == parity_expected[i][0]
        assert len(reqs[i].output_ids) == 2 * NEW_TOKENS
    for i in (1, 3):
        assert reqs[i].finish_reason == "abort" and len(reqs[i].output_ids) < NEW_TOKENS
        finals = [o for o in outs if o.rid == reqs[i].rid and o.finished]
        assert len(finals) == 1 and finals[0].finish_reason == "abort"
    assert_no_leak(c)
