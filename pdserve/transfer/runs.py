"""Page runs: the unit of a KV write.

The pool is page-major (``[num_pages, num_layers, 2, page_size, H, D]``), so one page is one
contiguous block holding every layer, and consecutive page ids are consecutive bytes. A stretch of
pages that is consecutive on BOTH sides therefore moves as one descriptor (one contiguous range
covering all layers). NIXL costs ~8 us per descriptor (design.md), so we coalesce before posting.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Run(NamedTuple):
    src_start: int
    dst_start: int
    num_pages: int


def coalesce(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[Run]:
    """Pair ``src_pages[i] -> dst_pages[i]`` and merge stretches consecutive on both sides.

    >>> coalesce([4, 5, 6, 9], [0, 1, 2, 3])
    [Run(src_start=4, dst_start=0, num_pages=3), Run(src_start=9, dst_start=3, num_pages=1)]
    """
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"src has {len(src_pages)} pages, dst has {len(dst_pages)}")
    runs: list[Run] = []
    for s, d in zip(src_pages, dst_pages):
        s, d = int(s), int(d)
        if runs:
            last = runs[-1]
            if s == last.src_start + last.num_pages and d == last.dst_start + last.num_pages:
                runs[-1] = Run(last.src_start, last.dst_start, last.num_pages + 1)
                continue
        runs.append(Run(s, d, 1))
    return runs


def run_descriptors(runs: Sequence[Run], base_addr: int, page_nbytes: int, device_id: int,
                    *, side: str) -> np.ndarray:
    """NIXL descriptors ``[num_runs, 3]`` uint64 rows (address, nbytes, device id) for one side.

    ``side`` is "src" (uses ``src_start``) or "dst" (uses ``dst_start``).
    """
    if side not in ("src", "dst"):
        raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
    col = 0 if side == "src" else 1
    arr = np.asarray(runs, dtype=np.uint64).reshape(-1, 3)   # [num_runs, (src, dst, n)]
    out = np.empty((len(arr), 3), dtype=np.uint64)           # [num_runs, (addr, nbytes, dev)]
    out[:, 0] = np.uint64(base_addr) + arr[:, col] * np.uint64(page_nbytes)
    out[:, 1] = arr[:, 2] * np.uint64(page_nbytes)
    out[:, 2] = np.uint64(device_id)
    return out


def page_descriptors(base_addr: int, num_pages: int, page_nbytes: int, device_id: int) -> np.ndarray:
    """One descriptor per page of a pool ``[num_pages, 3]`` (for lists prepared once per peer)."""
    out = np.empty((num_pages, 3), dtype=np.uint64)
    out[:, 0] = np.uint64(base_addr) + np.arange(num_pages, dtype=np.uint64) * np.uint64(page_nbytes)
    out[:, 1] = np.uint64(page_nbytes)
    out[:, 2] = np.uint64(device_id)
    return out


def expand(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Runs back to page indices ``([n] src, [n] dst)`` as int32 (indices into per-page lists)."""
    if not runs:
        empty = np.empty(0, dtype=np.int32)
        return empty, empty
    src = np.concatenate([np.arange(r.src_start, r.src_start + r.num_pages) for r in runs])
    dst = np.concatenate([np.arange(r.dst_start, r.dst_start + r.num_pages) for r in runs])
    return src.astype(np.int32), dst.astype(np.int32)
