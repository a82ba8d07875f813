import math

import pytest
import torch

from pdserve.runtime.request import Request
from pdserve.runtime.sampler import Sampler
from pdserve.sampling_params import SamplingParams, sampling_params_from

V = 8


def req(output=(), prompt=(0,), seed=None, **params):
    r = Request(rid="r", prompt_ids=list(prompt), params=SamplingParams(**params), eos_token_ids=frozenset({7}))
    r.output_ids = list(output)
    if seed is not None:
        r.generator = torch.Generator().manual_seed(seed)
    return r


def logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_and_logprobs_are_those_of_the_raw_distribution():
    lg = logits([0.0, 3.0, 1.0, 0, 0, 0, 0, 0])
    out = Sampler(V).sample(lg, [req(temperature=0, logprobs=True, top_logprobs=2)])
    assert out.token_ids == [1]
    expected = torch.log_softmax(lg, -1)[0]
    assert out.logprobs[0] == pytest.approx(expected[1].item())
    assert [t.token_id for t in out.top_logprobs[0]] == [1, 2]


def test_repetition_and_frequency_penalties_change_the_argmax():
    lg = logits([0, 2.0, 1.9, 0, 0, 0, 0, 0])
    s = Sampler(V)
    assert s.sample(lg, [req(temperature=0)]).token_ids == [1]
    assert s.sample(lg, [req(prompt=[1], temperature=0, repetition_penalty=1.2)]).token_ids == [2]
    assert s.sample(lg, [req(output=[1], temperature=0, frequency_penalty=0.5)]).token_ids == [2]
    assert s.sample(lg, [req(output=[1], temperature=0, presence_penalty=0.5)]).token_ids == [2]


def test_min_new_tokens_blocks_eos_and_stop_ids():
    lg = logits([0, 0, 0, 0, 0, 5.0, 0, 9.0])
    out = Sampler(V).sample(lg, [req(temperature=0, min_new_tokens=2, stop_token_ids=[5])])
    assert out.token_ids[0] not in (5, 7)


def test_top_k_top_p_min_p_restrict_the_support():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 1e-9, 1e-9, 1e-9]]))
    s = Sampler(V, seed=1)
    for params, allowed in [({"top_k": 2}, {0, 1}), ({"top_p": 0.75}, {0, 1}), ({"min_p": 0.25}, {0, 1}),
                            ({"top_p": 0.85}, {0, 1, 2})]:
        seen = {s.sample(lg, [req(temperature=1.0, **params)]).token_ids[0] for _ in range(200)}
        assert seen == allowed, params


def test_seed_reproduces_and_distribution_matches():
    lg = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0, 0, 0, 0, 0]]) + 1e-12)
    s = Sampler(V)
    a = [s.sample(lg, [req(seed=42, temperature=1.0)]).token_ids[0] for _ in range(1)]
    r1, r2 = req(seed=42, temperature=1.0), req(seed=42, temperature=1.0)
    seq1 = [s.sample(lg, [r1]).token_ids[0] for _ in range(50)]
    seq2 = [s.sample(lg, [r2]).token_ids[0] for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    draws = [s.sample(lg, [req(temperature=1.0)]).token_ids[0] for _ in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.7) < 0.05


def test_low_temperature_approaches_greedy():
    lg = logits([0, 1.0, 1.2, 0, 0, 0, 0, 0])
    s = Sampler(V)
    assert {s.sample(lg, [req(temperature=0.01)]).token_ids[0] for _ in range(50)} == {2}


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": 0}, {"min_p": 2},
                                 {"max_new_tokens": 0}, {"top_logprobs": 50}, {"frequency_penalty": 3},
                                 {"temperature": "hot"}, {"unknown": 1}])
def test_invalid_sampling_values_are_named(bad):
    with pytest.raises(ValueError) as e:
        sampling_params_from(bad).validate(vocab_size=V)
    assert next(iter(bad)) in str(e.value)
