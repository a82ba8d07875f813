"""Scheduler decisions, without a model: steps are committed with made-up tokens."""

from pdserve.config import SchedulerConfig
from pdserve.runtime.kv_manager import KVManager
from pdserve.runtime.request import Request, Status
from pdserve.runtime.scheduler import Scheduler
from pdserve.sampling_params import SamplingParams

PS = 4


def make(num_pages=64, max_running=8, **cfg):
    kv = KVManager(num_pages, PS)
    cfg = {"chunked_prefill_size": 16, "max_prefill_tokens": 64, **cfg}
    return Scheduler(SchedulerConfig(**cfg), kv, max_running=max_running, max_seq_len=4096), kv


def req(rid, n, max_new=4, start=0, **kw):
    return Request(rid=rid, prompt_ids=list(range(start, start + n)),
                   params=SamplingParams(max_new_tokens=max_new, temperature=0, **kw))


def run_step(s, token=7):
    step = s.schedule()
    sampled = {i: (token, None, None) for i, seq in enumerate(step.seqs) if seq.need_logits}
    return step, s.commit(step, sampled)


def test_long_prompt_is_chunked_and_only_the_last_chunk_samples():
    s, _ = make()
    s.add(req("a", 40))
    sizes, logits = [], []
    for _ in range(3):
        step, _ = run_step(s)
        sizes.append(step.seqs[0].num_new_tokens)
        logits.append(step.seqs[0].need_logits)
    assert sizes == [16, 16, 8] and logits == [False, False, True]
    r = s.running[0]
    assert r.output_ids == [7] and r.num_computed == 40


def test_decode_and_prefill_share_a_step():
    s, _ = make()
    s.add(req("a", 8))
    run_step(s)                       # a prefilled, first token sampled
    s.add(req("b", 20, start=100))
    step, _ = run_step(s)
    kinds = {seq.rid: (seq.num_new_tokens, seq.start_pos) for seq in step.seqs}
    assert kinds == {"a": (1, 8), "b": (16, 0)}


def test_prefill_budget_is_shared_across_requests():
    s, _ = make(max_prefill_tokens=20)
    for i in range(3):
        s.add(req(f"r{i}", 12, start=100 * i))
    step, _ = run_step(s)
    assert [seq.num_new_tokens for seq in step.seqs] == [12, 8]
    assert len(s.waiting) == 1


def test_admission_waits_for_pages_and_finished_pages_come_back():
    s, kv = make(num_pages=8, schedule_conservativeness=1.0)
    s.add(req("a", 16, max_new=4))    # 4 prompt pages + reserve
    s.add(req("b", 16, max_new=4, start=50))
    step, _ = run_step(s)
    assert [seq.rid for seq in step.seqs] == ["a"]       # b does not fit beside a's reserve
    while s.running:
        run_step(s)
    assert s.waiting and s.waiting[0].rid == "b"
    step, _ = run_step(s)
    assert [seq.rid for seq in step.seqs] == ["b"]


def test_retraction_frees_the_newest_and_requeues_it_first():
    s, kv = make(num_pages=6, max_running=4, schedule_conservativeness=0.01)
    s.add(req("old", 8, max_new=40))
    s.add(req("new", 8, max_new=40, start=50))
    run_step(s)
    assert {r.rid for r in s.running} == {"old", "new"}
    for _ in range(20):
        run_step(s)
        if s.num_retractions:
            break
    assert s.num_retractions >= 1
    assert [r.rid for r in s.running] == ["old"]
    victim = s.waiting[0]
    assert victim.rid == "new" and victim.status is Status.WAITING and victim.page_ids == []
    assert victim.output_ids                       # its output is kept and recomputed later
    used = sum(len(r.page_ids) for r in s.running)
    assert kv.allocator.num_used - (kv.cache.num_pages if kv.cache else 0) <= used


def test_finished_prompt_is_reused_from_the_prefix_cache():
    s, kv = make()
    s.add(req("a", 16, max_new=1))
    run_step(s)
    assert not s.running
    s.add(req("b", 18, max_new=1))        # same first 16 tokens
    step, _ = run_step(s)
    assert step.seqs[0].start_pos == 16 and step.seqs[0].num_new_tokens == 2
    assert step.reqs[0].num_cached == 16


def test_lpm_orders_by_cached_prefix():
    s, _ = make(schedule_policy="lpm", max_prefill_tokens=8)
    s.add(req("seed", 16, max_new=1))
    run_step(s)
    run_step(s)
    s.add(req("miss", 16, max_new=1, start=500))
    s.add(req("hit", 16, max_new=1))
    step, _ = run_step(s)
    assert step.seqs[0].rid == "hit"


def test_abort_releases_pages():
    s, kv = make(num_pages=16)
    s.add(req("a", 12))
    run_step(s)
    assert kv.allocator.num_used > 0
    aborted = s.abort("a")
    assert aborted.finish_reason == "abort" and not s.running
    assert kv.allocator.num_used == 0
    assert s.abort("nope") is None


def test_max_seq_len_finishes_with_length():
    kv = KVManager(64, PS)
    s = Scheduler(SchedulerConfig(), kv, max_running=4, max_seq_len=10)
    s.add(req("a", 8, max_new=100))
    finished = []
    for _ in range(5):
        finished += run_step(s)[1]
    assert finished and finished[0].finish_reason == "length" and finished[0].seq_len == 10
