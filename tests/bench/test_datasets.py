"""Prompt generation: seeded determinism, lengths, safe token ids, JSONL parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.bench.datasets import (SAFE_ID_LOW, jsonl_requests, random_requests,
                                    sharegpt_synthetic_requests)


def test_random_is_deterministic_per_seed():
    a = random_requests(20, 64, 16, range_ratio=0.5, vocab_size=49152, seed=3)
    b = random_requests(20, 64, 16, range_ratio=0.5, vocab_size=49152, seed=3)
    c = random_requests(20, 64, 16, range_ratio=0.5, vocab_size=49152, seed=4)
    assert a == b
    assert a != c


def test_random_fixed_lengths_and_safe_ids():
    reqs = random_requests(50, 128, 32, vocab_size=128256, seed=0)
    assert all(len(r.prompt) == r.prompt_len == 128 and r.output_len == 32 for r in reqs)
    ids = np.array([t for r in reqs for t in r.prompt])
    assert ids.min() >= SAFE_ID_LOW
    assert ids.max() < 0.9 * 128256 < 128000        # Llama-3's special ids start at 128000
    assert len(np.unique(ids)) > 1000               # actually random, not a constant


def test_random_range_ratio_bounds():
    reqs = random_requests(400, 100, 20, range_ratio=0.5, seed=1)
    ins = [r.prompt_len for r in reqs]
    outs = [r.output_len for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and max(ins) - min(ins) > 80
    assert min(outs) >= 10 and max(outs) <= 30
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    with pytest.raises(ValueError, match="--random-range-ratio"):
        random_requests(1, 10, 10, range_ratio=1.0)


def test_text_prompts_for_chat():
    reqs = random_requests(5, 40, 8, seed=0, as_text=True)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 40 for r in reqs)


def test_sharegpt_synthetic_is_long_tailed_and_seeded():
    reqs = sharegpt_synthetic_requests(2000, 256, 128, vocab_size=32000, seed=7)
    assert reqs == sharegpt_synthetic_requests(2000, 256, 128, vocab_size=32000, seed=7)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert 220 <= np.median(ins) <= 290                       # median = the given length
    assert np.percentile(ins, 90) / np.median(ins) > 2.5      # sigma 1: p90/median = e^1.28 = 3.6
    assert ins.min() >= 4 and ins.max() <= 8 * 256
    assert 110 <= np.median(outs) <= 145
    assert outs.max() <= 8 * 128
    assert all(len(r.prompt) == r.prompt_len for r in reqs[:50])


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "hello there world", "output_len": 5}, {"prompt": [101, 102, 103]},
             {"prompt": "x" * 40, "max_tokens": 7}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    reqs = jsonl_requests(path, 3, default_output_len=9)
    assert [r.output_len for r in reqs] == [5, 9, 7]
    assert reqs[1].prompt == [101, 102, 103] and reqs[1].prompt_len == 3
    assert reqs[2].prompt_len == 10                            # ~4 characters a token
    cycled = jsonl_requests(path, 8, default_output_len=9, seed=1)
    assert len(cycled) == 8 and cycled[:3] == reqs
    assert cycled == jsonl_requests(path, 8, default_output_len=9, seed=1)


@pytest.mark.parametrize("line", ['{"text": "no prompt"}', "not json", '{"prompt": 5}', '{"prompt": ["a"]}'])
def test_jsonl_errors_name_the_flag_and_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match="--dataset-path: line 2"):
        jsonl_requests(path, 2, default_output_len=4)


def test_content_seed_changes_tokens_not_lengths():
    a = sharegpt_synthetic_requests(30, 64, 16, seed=2, content_seed=1)
    b = sharegpt_synthetic_requests(30, 64, 16, seed=2, content_seed=2)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    c = random_requests(5, 32, 4, range_ratio=0.5, seed=2, content_seed=1)
    d = random_requests(5, 32, 4, range_ratio=0.5, seed=2, content_seed=2)
    assert [r.prompt_len for r in c] == [r.prompt_len for r in d] and c[0].prompt != d[0].prompt
