"""Refcounted page allocator that hands out contiguous runs.

Free pages are kept as runs ``start -> length``. ``alloc(n)`` takes the smallest free run that
holds all ``n`` pages (best fit), so a prompt's pages are usually one contiguous run — one
transfer descriptor for all layers (see kv_pool.py). When no run is long enough it takes the
longest runs first, keeping the page table to as few runs as it can.

Each page has a refcount: every holder (a request's page table, the prefix cache) owns one
reference. A page returns to the free runs when its count reaches zero; releasing a page that is
already free is a bug and raises.
"""

from __future__ import annotations

import bisect

import numpy as np


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"need at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.refcount = np.zeros(num_pages, dtype=np.int32)
        self._starts: list[int] = [0]          # sorted starts of free runs
        self._length: dict[int, int] = {0: num_pages}
        self._end_to_start: dict[int, int] = {num_pages: 0}  # exclusive end -> start
        self.num_free = num_pages

    # -- queries ------------------------------------------------------------------------------
    def free_runs(self) -> list[tuple[int, int]]:
        return [(s, self._length[s]) for s in self._starts]

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    # -- alloc / free -------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int] | None:
        """``n`` pages with refcount 1, or None (nothing taken) when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n == 0:
            return []
        if n > self.num_free:
            return None
        best = None
        for s in self._starts:
            length = self._length[s]
            if length >= n and (best is None or length < self._length[best]):
                best = s
                if length == n:
                    break
        if best is not None:
            pages = self._take(best, n)
        else:
            pages = []
            for s in sorted(self._starts, key=lambda s: -self._length[s]):
                take = min(self._length[s], n - len(pages))
                pages.extend(self._take(s, take))
                if len(pages) == n:
                    break
        self.refcount[pages] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        if pages and (self.refcount[pages] <= 0).any():
            raise RuntimeError(f"incref of a free page in {pages[:8]}")
        np.add.at(self.refcount, pages, 1)

    def decref(self, pages: list[int]) -> int:
        """Drop one reference from each page; returns how many pages became free."""
        if not pages:
            return 0
        idx = np.asarray(pages, dtype=np.int64)
        np.subtract.at(self.refcount, idx, 1)
        if (self.refcount[idx] < 0).any():
            np.add.at(self.refcount, idx, 1)  # undo before reporting
            raise RuntimeError(f"double free among pages {pages[:8]}")
        freed = [int(p) for p in np.unique(idx) if self.refcount[p] == 0]
        for p in freed:
            self._give_back(p, 1)
        return len(freed)

    # -- run bookkeeping ----------------------------------------------------------------------
    def _take(self, start: int, n: int) -> list[int]:
        length = self._length.pop(start)
        del self._end_to_start[start + length]
        i = bisect.bisect_left(self._starts, start)
        del self._starts[i]
        if length > n:
            self._insert_run(start + n, length - n)
        self.num_free -= n
        return list(range(start, start + n))

    def _insert_run(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._length[start] = length
        self._end_to_start[start + length] = start

    def _give_back(self, start: int, length: int) -> None:
        self.num_free += length
        left = self._end_to_start.pop(start, None)
        if left is not None:  # merge with the run ending where this one starts
            length += self._length.pop(left)
            del self._starts[bisect.bisect_left(self._starts, left)]
            start = left
        right_len = self._length.pop(start + length, None)
        if right_len is not None:  # merge with the run starting where this one ends
            del self._end_to_start[start + length + right_len]
            del self._starts[bisect.bisect_left(self._starts, start + length)]
            length += right_len
        self._insert_run(start, length)


def count_runs(pages: list[int]) -> int:
    """How many maximal runs of consecutive ids a page table holds."""
    if not pages:
        return 0
    return 1 + sum(1 for a, b in zip(pages, pages[1:]) if b != a + 1)
