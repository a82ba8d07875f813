"""A node's KV pools as the transfer layer sees them, and the staging of relayouts.

``PoolSet``: one ``KVPool`` per rank (rank 0's view of a tensor-parallel node; a single pool
otherwise) with the KV heads and DP attention group of each. ``StagingArea``: byte ranges of one
registered buffer, handed out per staged write and returned when the write is done.
``assemble``: copy a decode rank's heads of some pages, from the prefill ranks holding them, into
a staging range laid out as that decode rank's pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.runtime.kv_pool import KVPool
from pdserve.transfer.tp_map import Route


@dataclass(frozen=True)
class RankPool:
    rank: int
    pool: KVPool
    kv_start: int
    kv_count: int
    dp_group: int = 0


@dataclass(frozen=True)
class PoolSet:
    ranks: list[RankPool]
    total_kv_heads: int

    @classmethod
    def single(cls, pool: KVPool) -> "PoolSet":
        heads = pool.layout.num_kv_heads
        return cls([RankPool(0, pool, 0, heads)], heads)

    @classmethod
    def of_runner(cls, runner) -> "PoolSet":
        """Every rank's pool of a ModelRunner (rank 0 of its node)."""
        lay = runner.rank_layout
        ranks = [RankPool(r, pool, h.kv_start, h.kv_count, lay.with_rank(r).dp_rank)
                 for r, (pool, h) in enumerate(zip(runner.rank_pools, runner.rank_heads()))]
        return cls(ranks, runner.loaded.arch.num_kv_heads)

    @property
    def pools(self) -> list[KVPool]:
        return [r.pool for r in self.ranks]

    @property
    def num_pages(self) -> int:
        return self.ranks[0].pool.num_pages

    @property
    def device(self) -> torch.device:
        return self.ranks[0].pool.device

    @property
    def layout(self):
        """Rank 0's layout (the fields every rank shares; heads per rank are in ``ranks``)."""
        return self.ranks[0].pool.layout

    def rank_pool(self, rank: int) -> RankPool:
        return self.ranks[rank]


def assemble(pools: PoolSet, src_pages: list[int], route: Route, out: torch.Tensor) -> None:
    """``out [n, layers, 2, page_size, kv_count_dst, head_dim]`` <- the route's heads of ``src_pages``:
    one strided copy per run of consecutive source pages and piece (no gather of whole pages)."""
    from pdserve.transfer.runs import coalesce

    runs = coalesce(src_pages, range(len(src_pages)))      # (src_start, out_start, n)
    for piece in route.pieces:
        src = pools.rank_pool(piece.src_rank)
        lo = piece.head_start - src.kv_start
        heads = slice(piece.dst_offset, piece.dst_offset + piece.head_count)
        for run in runs:
            rows = src.pool.buffer[run.src_start:run.src_start + run.num_pages, ..., lo:lo + piece.head_count, :]
            out[run.dst_start:run.dst_start + run.num_pages, ..., heads, :].copy_(rows, non_blocking=True)


class StagingArea:
    """First-fit byte ranges of a buffer of ``capacity`` bytes (aligned to 256)."""

    ALIGN = 256

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]   # (offset, nbytes), sorted by offset

    def alloc(self, nbytes: int) -> int | None:
        nbytes = -(-nbytes // self.ALIGN) * self.ALIGN
        for i, (off, size) in enumerate(self._free):
            if size >= nbytes:
                self._free[i:i + 1] = [(off + nbytes, size - nbytes)] if size > nbytes else []
                return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        nbytes = -(-nbytes // self.ALIGN) * self.ALIGN
        spans = sorted(self._free + [(offset, nbytes)])
        merged: list[tuple[int, int]] = []
        for off, size in spans:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self._free = merged

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)


class StagedWriter:
    """Posts the staged routes of a write: assemble each decode rank's heads into staging (laid
    out as its pages), then one WRITE of page runs from staging into its pages."""

    def __init__(self, pools: PoolSet, capacity_nbytes: int) -> None:
        self.pools = pools
        self.capacity_nbytes = capacity_nbytes
        self.area: StagingArea | None = None     # created with the buffer, on first use

    def page_nbytes(self, peer, routes: list[Route]) -> int:
        """Staging bytes one page of this write needs (every staged decode rank's page)."""
        return sum(peer.regions[peer.region_index(r.dst_rank)].page_nbytes for r in routes)

    def post(self, nixl, peer_name: str, routes: list[Route], src: list[int], dst: list[int]):
        """A ``WriteHandle``, or None when staging is full now (retry once writes complete)."""
        from pdserve.transfer.runs import coalesce

        peer = nixl.peer(peer_name)
        need = self.page_nbytes(peer, routes) * len(src)
        if self.area is None:
            self.area = StagingArea(max(self.capacity_nbytes, need))
        if need > self.area.capacity:
            raise ValueError(f"a write of {len(src)} pages needs {need} staging bytes, the area holds "
                             f"{self.area.capacity}: split it")
        offset = self.area.alloc(need)
        if offset is None:
            return None
        buf = nixl.register_staging(self.area.capacity, self.pools.device)
        runs = coalesce(range(len(src)), dst)
        src_descs, dst_descs, pos = [], [], offset
        for route in routes:
            region = peer.regions[peer.region_index(route.dst_rank)]
            page = region.page_nbytes
            lay = self.pools.layout
            view = buf[pos:pos + page * len(src)].view(getattr(torch, lay.dtype)).view(
                len(src), lay.num_layers, 2, lay.page_size, region.kv_count, lay.head_dim)
            assemble(self.pools, src, route, view)
            for run in runs:
                src_descs.append((buf.data_ptr() + pos + run.src_start * page, run.num_pages * page,
                                  _device_id(buf.device)))
                dst_descs.append((region.base_addr + run.dst_start * page, run.num_pages * page, region.device_id))
            pos += page * len(src)
        _sync(self.pools)
        return nixl.post_descs(peer_name, src_descs, dst_descs, staging=(offset, need))

    def release(self, staging: tuple[int, int] | None) -> None:
        if staging is not None and self.area is not None:
            self.area.free(*staging)

    def max_pages(self, peer, routes: list[Route]) -> int:
        """Most pages one staged post can carry."""
        return max(1, max(self.capacity_nbytes, 1) // max(self.page_nbytes(peer, routes), 1))


def _device_id(device: torch.device) -> int:
    return device.index or 0 if device.type == "cuda" else 0


def _sync(pools: PoolSet) -> None:
    """The assembled copies are done before NIXL reads the staging buffer."""
    for dev in {r.pool.device for r in pools.ranks}:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
