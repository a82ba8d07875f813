"""The colocated engine against transformers on the real SmolLM2 GGUF (fp32, CPU):
greedy tokens identical, logprobs within 1e-4, with chunked prefill and staggered arrivals."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

from tests.parity_cases import PARITY_LENGTHS as LENGTHS, PARITY_NEW_TOKENS as NEW_TOKENS

CHUNK = 128


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from pdserve import Engine
    return Engine(model_path=smollm2_path, max_total_tokens=16384, chunked_prefill_size=CHUNK,
                  max_prefill_tokens=2 * CHUNK, page_size=16)


@pytest.fixture(scope="module")
def prompts(parity_prompts):
    return parity_prompts


@pytest.fixture(scope="module")
def expected(parity_expected):
    return parity_expected


def run_staggered(engine, prompts):
    """Add prompts in three waves while earlier ones are mid-prefill or decoding."""
    from pdserve.sampling_params import SamplingParams
    core = engine.core
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    reqs = []
    waves = [prompts[:3], prompts[3:6], prompts[6:]]
    for w, wave in enumerate(waves):
        for j, p in enumerate(wave):
            reqs.append(core.add_request(f"p{w}-{j}", p, params))
        for _ in range(3):
            core.step()
    while any(not r.is_finished for r in reqs):
        core.step()
    return reqs


def test_greedy_tokens_and_logprobs_match_transformers(engine, prompts, expected):
    reqs = run_staggered(engine, prompts)
    for req, (tokens, lps), n in zip(reqs, expected, LENGTHS):
        assert req.output_ids == tokens, f"prompt of {n} tokens"
        assert req.logprobs == pytest.approx(lps, abs=1e-4), f"prompt of {n} tokens"


def test_prefix_cache_reuse_gives_identical_output(engine, prompts, expected):
    from pdserve.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    req = engine.core.add_request("again", prompts[7], params)
    while not req.is_finished:
        engine.core.step()
    assert req.num_cached >= 1024            # most of the 1,200-token prompt came from the cache
    assert req.output_ids == expected[7][0]
    assert req.logprobs == pytest.approx(expected[7][1], abs=1e-4)


def test_chat_answer_and_python_api(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    (res,) = engine.generate([prompt], {"temperature": 0, "max_new_tokens": 24})
    assert "Paris" in res["text"] and res["finish_reason"] == "stop"
    streamed = "".join(d["text"] for d in engine.stream(prompt, {"temperature": 0, "max_new_tokens": 24}))
    assert streamed == res["text"]


def test_bad_requests_fail_cleanly_and_engine_keeps_serving(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.generate([[1] * 9000], {"max_new_tokens": 4})
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(["hi"], {"temperature": -2})
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(["hi"], {"top_p": 5})
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([[10**9]], {})
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([[]], {})
    (res,) = engine.generate(["Hello"], {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True})
    assert len(res["token_ids"]) == 3 and res["finish_reason"] == "length"
    assert engine.core.kv.allocator.num_used == engine.core.kv.cache.num_pages   # no leaked pages
