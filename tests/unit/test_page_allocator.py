import random

import pytest

from pdserve.runtime.page_allocator import PageAllocator, count_runs


def test_alloc_prefers_one_contiguous_run():
    a = PageAllocator(64)
    first = a.alloc(10)
    assert first == list(range(10))
    a.decref(a.alloc(5))            # pages 10..14 come back, merging with the tail
    big = a.alloc(40)
    assert count_runs(big) == 1
    assert a.num_free == 64 - 10 - 40


def test_best_fit_keeps_big_runs_for_prompts():
    a = PageAllocator(32)
    pages = a.alloc(32)
    a.decref(pages[2:4])      # a hole of 2
    a.decref(pages[10:20])    # a hole of 10
    single = a.alloc(1)
    assert single[0] in (2, 3)        # the small hole serves the single page
    assert count_runs(a.alloc(10)) == 1


def test_fragmented_alloc_uses_longest_runs_first():
    a = PageAllocator(20)
    pages = a.alloc(20)
    for p in (1, 2, 5, 6, 7, 8, 12):
        a.decref([p])
    got = a.alloc(6)
    assert got[:4] == [5, 6, 7, 8] and set(got) == {1, 2, 5, 6, 7, 8}  # longest run first
    assert count_runs(got) == 2
    assert a.alloc(2) is None                # only 1 free: nothing taken
    assert a.num_free == 1


def test_double_free_raises_and_refcounts_hold():
    a = PageAllocator(8)
    pages = a.alloc(3)
    a.incref(pages[:1])
    assert a.decref(pages) == 2          # page 0 still held by the second reference
    assert a.num_free == 7
    with pytest.raises(RuntimeError):
        a.decref(pages[1:2])
    assert a.decref(pages[:1]) == 1
    assert a.num_free == 8
    with pytest.raises(RuntimeError):
        a.incref([5])


def test_random_alloc_free_keeps_invariants():
    rng = random.Random(0)
    a = PageAllocator(256)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            a.decref(held.pop(rng.randrange(len(held))))
        else:
            got = a.alloc(rng.randint(1, 20))
            if got is not None:
                held.append(got)
        used = [p for h in held for p in h]
        assert len(used) == len(set(used))
        assert a.num_free == 256 - len(used)
        runs = a.free_runs()
        assert sum(n for _, n in runs) == a.num_free
        assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in zip(runs, runs[1:]))  # disjoint, merged
