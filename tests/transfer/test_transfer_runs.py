"""Coalescing page pairs into runs, and the byte descriptors built from them."""

import numpy as np
import pytest

from pdserve.runtime.kv_pool import KVLayout
from pdserve.transfer.runs import Run, coalesce, expand, page_descriptors, run_descriptors


def test_empty():
    assert coalesce([], []) == []


def test_fully_contiguous_is_one_run():
    assert coalesce(range(10, 20), range(3, 13)) == [Run(10, 3, 10)]


def test_break_on_either_side():
    # src breaks after 2 pages, dst breaks after 3: three runs
    assert coalesce([0, 1, 5, 6, 7], [4, 5, 6, 9, 10]) == [Run(0, 4, 2), Run(5, 6, 1), Run(6, 9, 2)]


def test_descending_pages_do_not_merge():
    assert coalesce([3, 2, 1], [0, 1, 2]) == [Run(3, 0, 1), Run(2, 1, 1), Run(1, 2, 1)]


def test_interleaved_destination():
    # every other decode page: nothing merges
    assert len(coalesce(range(8), range(0, 16, 2))) == 8


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="src has 2 pages, dst has 1"):
        coalesce([1, 2], [1])


def test_runs_cover_every_pair_once():
    rng = np.random.default_rng(0)
    src = rng.permutation(64)[:40]
    dst = np.sort(rng.permutation(100)[:40])
    runs = coalesce(src.tolist(), dst.tolist())
    s, d = expand(runs)
    assert s.tolist() == src.tolist() and d.tolist() == dst.tolist()


def test_descriptors_span_all_layers_of_a_run():
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16")
    assert layout.page_nbytes == 2 * 1024 * 1024          # 32 x 2 x 16 x 8 x 128 x 2 bytes
    runs = [Run(2, 7, 3), Run(9, 0, 1)]
    src = run_descriptors(runs, 1000, layout.page_nbytes, 5, side="src")
    dst = run_descriptors(runs, 0, layout.page_nbytes, 1, side="dst")
    assert src.tolist() == [[1000 + 2 * layout.page_nbytes, 3 * layout.page_nbytes, 5],
                            [1000 + 9 * layout.page_nbytes, layout.page_nbytes, 5]]
    assert dst.tolist() == [[7 * layout.page_nbytes, 3 * layout.page_nbytes, 1],
                            [0, layout.page_nbytes, 1]]
    assert src.dtype == np.uint64


def test_page_descriptors():
    d = page_descriptors(4096, 3, 512, 0)
    assert d.tolist() == [[4096, 512, 0], [4608, 512, 0], [5120, 512, 0]]
