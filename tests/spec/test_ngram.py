"""N-gram drafting and the scheduler's side of a verify step, as plain data (no model): the draft
a prompt-lookup finds, the flags' one-line refusals, and what ``commit`` does with a verify row's
result (KV rewound past rejected drafts, pages handed back, no overshoot of max_new_tokens)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve import cli
from pdserve.config import SchedulerConfig, SpeculativeConfig
from pdserve.runtime.kv_manager import KVManager, pages_for
from pdserve.runtime.request import Request
from pdserve.runtime.scheduler import Scheduler
from pdserve.runtime.spec_ngram import NgramDrafter, accept_greedy, ngram_draft
from pdserve.sampling_params import SamplingParams


def draft(tokens, k=4, lo=1, hi=12):
    return ngram_draft(np.asarray(tokens), k, lo, hi)


def test_draft_continues_the_longest_then_latest_match():
    # "7 8" occurs twice before the end; the longer match "6 7 8" only at the start.
    assert draft([6, 7, 8, 1, 2, 9, 7, 8, 3, 4, 6, 7, 8]) == [1, 2, 9, 7]
    # equal match lengths: the latest occurrence wins
    assert draft([5, 8, 1, 5, 8, 2, 5, 8], k=2) == [2, 5]
    assert draft([1, 2, 3, 4], k=3) == []                       # the last token never occurred before
    assert draft([1, 2, 9, 3, 2], k=3, lo=2) == []               # only a 1-token match: below the min window
    assert draft([4, 4, 4, 4], k=5) == [4] * 5                   # a continuation that reaches the end loops
    assert draft([1, 2, 3, 9, 1, 2, 3], k=6, lo=3) == [9, 1, 2, 3, 9, 1]   # with the match's period (4)


def test_drafter_caps_the_draft_at_the_room_left():
    drafter = NgramDrafter(SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_steps=3))
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert drafter.propose(tokens, max_draft=10) == [3, 4, 5]
    assert drafter.propose(tokens, max_draft=1) == [3]
    assert drafter.propose(tokens, max_draft=0) == []


def test_accept_greedy_stops_at_the_first_mismatch():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == 1
    assert accept_greedy([5], [4, 1]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm: EAGLE needs a draft model"),
    (["--speculative-algorithm", "MEDUSA"], "--speculative-algorithm: 'MEDUSA' is not one of NGRAM"),
    (["--speculative-draft-model-path", "x"], "--speculative-draft-model-path: no draft model can be downloaded"),
    (["--speculative-num-steps", "3"], "--speculative-num-steps: needs --speculative-algorithm NGRAM"),
    (["--speculative-algorithm", "NGRAM", "--speculative-num-steps", "3", "--speculative-num-draft-tokens", "8"],
     "--speculative-num-draft-tokens: must be --speculative-num-steps + 1 = 4"),
    (["--speculative-algorithm", "NGRAM", "--speculative-eagle-topk", "4"],
     "--speculative-eagle-topk: NGRAM drafts one chain"),
    (["--speculative-algorithm", "NGRAM", "--speculative-ngram-min-match-window-size", "3",
      "--speculative-ngram-max-match-window-size", "2"], "--speculative-ngram-max-match-window-size: must be >= "),
    (["--speculative-algorithm", "NGRAM", "--tp", "2", "--dp", "2", "--enable-dp-attention"],
     "--speculative-algorithm: not with --enable-dp-attention"),
])
def test_bad_speculative_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["decode", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_num_draft_tokens_counts_the_last_accepted_token():
    assert SpeculativeConfig(speculative_algorithm="ngram", speculative_num_draft_tokens=6).num_draft == 5
    assert SpeculativeConfig(speculative_algorithm="NGRAM").num_draft == 4


# -- the scheduler's side ----------------------------------------------------------------------

PAGE = 4


def _setup(max_new_tokens=32, steps=4, num_pages=64):
    kv = KVManager(num_pages, PAGE, enable_prefix_cache=False)
    drafter = NgramDrafter(SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_steps=steps))
    s = Scheduler(SchedulerConfig(chunked_prefill_size=64), kv, max_running=8, max_seq_len=4096, drafter=drafter)
    prompt = [10, 11, 12, 13, 14, 15, 16, 17, 10, 11]
    req = Request(rid="a", prompt_ids=prompt, params=SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    s.add(req)
    step = s.schedule()
    s.mark_launched(step)
    s.commit(step, {0: (12, None, None)})     # the first token: "10 11 12" now repeats the prompt's start
    return s, kv, req


def _verify(s, tokens):
    step = s.schedule()
    s.mark_launched(step)
    s.commit(step, {0: [(t, None, None) for t in tokens]})
    return step


def test_a_verify_row_keeps_accepted_drafts_and_hands_back_rejected_pages():
    s, kv, req = _setup()
    step = s.schedule()
    (seq,) = step.seqs
    assert seq.input_ids == [12, 13, 14, 15, 16] and seq.num_draft == 4 and seq.start_pos == 10
    assert len(req.page_ids) == pages_for(10 + 5, PAGE) == 4
    s.mark_launched(step)
    s.commit(step, {0: [(99, None, None)]})     # no draft accepted: the target's own token only
    assert req.output_ids == [12, 99]
    assert req.num_computed == 11 == req.seq_len - 1          # KV up to "12"; the rejected drafts' is dropped
    assert len(req.page_ids) == pages_for(req.seq_len, PAGE) == 3   # the 4th page, drafts only, went back
    assert s.schedule().seqs[0].num_draft == 0                 # 99 never occurred before: a plain decode row
    assert kv.num_free == kv.num_pages - len(req.page_ids)


def test_accepted_drafts_never_overshoot_max_new_tokens():
    s, kv, req = _setup(max_new_tokens=3)
    step = s.schedule()
    assert step.seqs[0].num_draft == 1         # 1 output so far: one draft, then the target's token = 3
    s.mark_launched(step)
    s.commit(step, {0: [(13, None, None), (14, None, None)]})
    assert req.output_ids == [12, 13, 14] and req.finish_reason == "length"
    assert kv.num_free == kv.num_pages


def test_a_stop_token_among_accepted_drafts_ends_the_request_there():
    s, kv, req = _setup()
    req.params.stop_token_ids = [14]
    step = _verify(s, [13, 14, 15, 16, 17])
    assert step.seqs[0].num_draft == 4
    assert req.output_ids == [12, 13, 14] and req.finish_reason == "stop" and req.matched_stop == 14
    assert kv.num_free == kv.num_pages


def test_requests_that_cannot_speculate_get_plain_rows():
    s, kv, req = _setup()
    req.params.temperature = 0.7
    assert s.schedule().seqs[0].num_draft == 0
    req.params.temperature = 0
    req.params.repetition_penalty = 1.2
    assert s.schedule().seqs[0].num_draft == 0


@pytest.mark.parametrize("num_pages,drafts", [(5, 4), (4, 0)])
def test_drafts_only_take_pages_the_batch_can_spare(num_pages, drafts):
    s, kv, req = _setup(max_new_tokens=6, num_pages=num_pages)   # 3 pages held; drafting 4 needs a 4th
    assert s.schedule().seqs[0].num_draft == drafts


def test_a_request_drafts_one_more_than_it_had_accepted_or_twice_as_many():
    s, kv, req = _setup()
    assert s.schedule().seqs[0].num_draft == 4             # the first time: --speculative-num-steps
    _verify(s, [13, 10])                                     # 1 of 4 accepted
    step = _verify(s, [11, 12, 13])                          # so 2 drafted ("11 12"), both accepted
    assert step.seqs[0].input_ids == [10, 11, 12] and step.seqs[0].num_draft == 2
    assert s.schedule().seqs[0].num_draft == 4             # all accepted: twice as many (at most k = 4)
