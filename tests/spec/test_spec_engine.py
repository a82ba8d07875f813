"""Speculative decoding (--speculative-algorithm NGRAM) on the real SmolLM2: greedy output token-identical
to plain decoding in a mixed batch (sampled, penalised and logprob requests beside the drafting
ones), drafts accepted on a prompt built to repeat, stop tokens and max_new_tokens cut exactly, no
page leaked after many requests with aborts, and a real decode node (KV moved in by a real
prefill node) speculating with its metrics in NodeStats."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.config import SpeculativeConfig
from pdserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
COPY = f"<|im_start|>user\nCopy this code:\n{CODE}<|im_end|>\n<|im_start|>assistant\n"
ECHO = ("<|im_start|>user\nRepeat this text exactly: The quick brown fox jumps over the lazy dog. The quick "
        "brown fox jumps over the lazy dog.<|im_end|>\n<|im_start|>assistant\n")
PLAIN = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
NGRAM = SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_steps=4)


@pytest.fixture(scope="module")
def runner(smollm2_path):
    from pdserve.config import engine_config
    from pdserve.runtime.model_runner import ModelRunner
    return ModelRunner(engine_config(model_path=smollm2_path, max_total_tokens=4096, cpu_threads=1, page_size=16))


@pytest.fixture(scope="module")
def prompts(runner):
    return [runner.tokenizer.encode(t) for t in (COPY, ECHO, PLAIN)]


def core(runner, spec: SpeculativeConfig | None, *, radix: bool = True):
    from pdserve.runtime.engine import EngineCore
    cfg = runner.cfg
    cfg = dataclasses.replace(cfg, speculative=spec or SpeculativeConfig(),
                              cache=dataclasses.replace(cfg.cache, disable_radix_cache=not radix))
    return EngineCore(cfg, runner)


def run(c, items: list[tuple[list[int], SamplingParams]], abort_at: dict[int, int] | None = None):
    reqs = [c.add_request(f"r{i}", ids, p) for i, (ids, p) in enumerate(items)]
    n = 0
    while any(not r.is_finished for r in reqs):
        c.step()
        n += 1
        if abort_at and n in abort_at:
            c.abort(f"r{abort_at[n]}")
    c.drain()
    return reqs


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def test_greedy_output_is_token_identical_in_a_mixed_batch(runner, prompts):
    copy, echo, plain = prompts
    items = [(copy, greedy(56, logprobs=True, top_logprobs=2)), (echo, greedy(40)), (plain, greedy(24)),
             (copy, SamplingParams(temperature=0.8, max_new_tokens=24, seed=7)),      # sampled: never drafts
             (echo, greedy(24, repetition_penalty=1.3))]                               # penalties: never drafts
    base = run(core(runner, None), items)
    spec_core = core(runner, NGRAM)
    spec = run(spec_core, items)
    for b, s in zip(base, spec):
        assert s.output_ids == b.output_ids, s.rid
        assert s.finish_reason == b.finish_reason
    assert spec[0].logprobs == pytest.approx(base[0].logprobs, abs=1e-4)
    assert [[t.token_id for t in row] for row in spec[0].top_logprobs] == \
        [[t.token_id for t in row] for row in base[0].top_logprobs]
    m = spec_core.metrics()
    assert m["spec_accepted_tokens"] > 0 and m["spec_accept_rate"] > 0.3, m   # the copy and echo prompts repeat
    assert m["spec_tokens_per_step"] > 1.5, m
    assert m["spec_verified_rows"] < sum(len(r.output_ids) for r in spec[:3])  # fewer forwards than tokens


def test_stop_tokens_and_max_new_tokens_are_exact(runner, prompts):
    copy = prompts[0]
    ref = run(core(runner, None), [(copy, greedy(40, ignore_eos=True))])[0].output_ids
    stop_at = next(i for i in range(6, len(ref)) if ref[i] not in ref[:i])   # a token's first appearance
    items = [(copy, greedy(40, stop_token_ids=[ref[stop_at]])), (copy, greedy(13, ignore_eos=True)),
             (copy, greedy(1, ignore_eos=True))]
    spec_core = core(runner, NGRAM)
    stopped, capped, one = run(spec_core, items)
    assert stopped.output_ids == ref[:stop_at + 1] and stopped.finish_reason == "stop"
    assert stopped.matched_stop == ref[stop_at]
    assert capped.output_ids == ref[:13] and capped.finish_reason == "length"
    assert one.output_ids == ref[:1]
    assert spec_core.metrics()["spec_accepted_tokens"] > 0


def test_no_page_leaks_after_many_requests_with_aborts(runner, prompts):
    c = core(runner, NGRAM, radix=False)
    items = [(prompts[i % 3], greedy(6 + 3 * i)) for i in range(8)]
    reqs = run(c, items, abort_at={3: 1, 6: 6})
    assert reqs[1].finish_reason == "abort" and reqs[6].finish_reason == "abort"
    assert c.metrics()["spec_accepted_tokens"] > 0
    assert c.kv.num_free == c.kv.num_pages
    assert not c.scheduler.running and not c.scheduler.waiting
    cached = core(runner, NGRAM)                # with the prefix cache: free + cached = the whole pool
    run(cached, items)
    assert cached.kv.num_free + cached.kv.cache.num_pages == cached.kv.num_pages


def test_decode_node_speculates_on_kv_moved_in_by_a_prefill_node(runner, prompts, smollm2_path):
    """Real prefill and decode node processes (KV over NIXL/UCX); only the decode node drafts."""
    from tests.e2e.test_pd_nodes import Router, start_node, stop
    items = [(prompts[0], greedy(40, logprobs=True)), (prompts[1], greedy(32)),
             (prompts[2], SamplingParams(temperature=0.8, max_new_tokens=12, seed=3))]
    expected = run(core(runner, None), items)
    p, pinfo = start_node("prefill", smollm2_path)
    try:
        d, dinfo = start_node("decode", smollm2_path, "--speculative-algorithm", "NGRAM",
                              "--speculative-num-draft-tokens", "5")
        try:
            router = Router()
            rids = [router.submit(pinfo, dinfo, ids, params) for ids, params in items]
            results = router.collect(set(rids))
            for rid, want in zip(rids, expected):
                assert results[rid]["error"] is None, results[rid]
                assert len(results[rid]["tokens"]) == len(want.output_ids)
            for rid, want in zip(rids[:2], expected):     # (a seeded sample's stream restarts on the decode node)
                assert results[rid]["tokens"] == want.output_ids
            assert results[rids[0]]["logprobs"] == pytest.approx(expected[0].logprobs, abs=1e-4)
            stats = router.stats(dinfo)
            assert stats.metrics["spec_accepted_tokens"] > 0 and stats.metrics["spec_tokens_per_step"] > 1.5
            assert stats.free_pages + stats.cached_pages == stats.total_pages    # nothing leaked
        finally:
            stop(d)
    finally:
        stop(p)


def test_tensor_parallel_engine_verifies_drafts_on_every_rank(runner, prompts, smollm2_path):
    """tp=2 (a real rank process, gloo): the verify rows reach rank 1 in the broadcast step."""
    from pdserve.runtime.engine import Engine
    items = [(prompts[0], greedy(24)), (prompts[1], greedy(24))]
    expected = [r.output_ids for r in run(core(runner, None), items)]
    with Engine(model_path=smollm2_path, max_total_tokens=4096, tp=2, speculative_algorithm="NGRAM") as engine:
        out = engine.generate([ids for ids, _ in items], {"temperature": 0, "max_new_tokens": 24})
        assert [o["token_ids"] for o in out] == expected
        assert engine.core.metrics()["spec_accepted_tokens"] > 0
