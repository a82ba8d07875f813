"""Which prefill rank's KV goes to which decode rank, when the two nodes split heads differently.

A node's KV lives in one pool per rank (``runtime/tp_worker.py``); rank r's pool holds KV heads
``[kv_start, kv_start + kv_count)`` of every layer, page-major
(``[pages, layers, 2, page_size, kv_count, head_dim]``), and page ids mean the same tokens on every
rank of an attention group. Rank 0 of each node registers all its ranks' pools with its one NIXL
agent, so a transfer is planned here once per (prefill node, decode attention group) pair:

- **direct**: a decode rank holds exactly the heads of one prefill rank (equal TP): its pages are
  written from that rank's pool as page runs, one descriptor per run.
- **staged**: otherwise (prefill TP 1 -> decode TP 2, 2 -> 1, or uneven head splits): the prefill
  node assembles, for each decode rank, its heads in the decode rank's page layout in a staging
  buffer (a copy on the prefill side, from the one or several prefill ranks holding them; rank 0
  can read every rank's pool) and writes that as page runs into the decode rank's pages. Each
  decode rank receives exactly the heads it owns, still one descriptor per run.

Descriptors per request: (page runs) x (decode ranks of the group), in both cases.
A layout is refused (``plan_routes`` returns the reason) when the prefill node lacks a head the
decode group needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class RegionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One rank's KV pool as a transfer peer sees it (part of the handshake)."""
    rank: int
    base_addr: int              # address of page 0
    page_nbytes: int
    device_id: int              # CUDA ordinal in the process that registered it (0 on CPU)
    kv_start: int               # first KV head held
    kv_count: int               # KV heads held
    dp_group: int = 0           # DP attention group (decode nodes with --enable-dp-attention)


@dataclass(frozen=True)
class Piece:
    """Heads ``[head_start, head_start + head_count)`` of prefill rank ``src_rank``'s pool, placed at
    head offset ``dst_offset`` of the decode rank's page."""
    src_rank: int
    head_start: int             # first head, in the model's numbering
    head_count: int
    dst_offset: int             # head index within the decode rank's heads


@dataclass(frozen=True)
class Route:
    """How decode rank ``dst_rank`` gets its heads: from one pool directly, or assembled."""
    dst_rank: int
    pieces: tuple[Piece, ...]
    is_direct: bool             # one piece covering exactly the source rank's heads


def plan_routes(src: list[RegionInfo], dst: list[RegionInfo], dp_group: int = 0) -> list[Route] | str:
    """Routes for every decode rank of ``dp_group``, or the reason the layouts cannot be mapped."""
    targets = [d for d in dst if d.dp_group == dp_group]
    if not targets:
        return f"decode has no ranks in DP attention group {dp_group}"
    routes = []
    for d in targets:
        pieces, head = [], d.kv_start
        end = d.kv_start + d.kv_count
        while head < end:
            holder = _holder(src, head)
            if holder is None:
                have = sorted({(s.kv_start, s.kv_start + s.kv_count) for s in src})
                return (f"prefill ranks hold KV heads {have}, decode rank {d.rank} needs head {head} "
                        f"(of [{d.kv_start}, {end}))")
            count = min(end, holder.kv_start + holder.kv_count) - head
            pieces.append(Piece(holder.rank, head, count, head - d.kv_start))
            head += count
        direct = (len(pieces) == 1 and _region(src, pieces[0].src_rank).kv_count == d.kv_count
                  and _region(src, pieces[0].src_rank).page_nbytes == d.page_nbytes)
        routes.append(Route(d.rank, tuple(pieces), direct))
    return routes


def _holder(src: list[RegionInfo], head: int) -> RegionInfo | None:
    """The prefill rank holding ``head``; with replicated heads, the one whose range starts there
    (then the lowest rank), so a direct route is preferred."""
    holders = [s for s in src if s.kv_start <= head < s.kv_start + s.kv_count]
    return min(holders, key=lambda s: (s.kv_start != head, s.rank)) if holders else None


def _region(regions: list[RegionInfo], rank: int) -> RegionInfo:
    return next(r for r in regions if r.rank == rank)


def staging_nbytes(routes: list[Route], dst: list[RegionInfo], num_pages: int) -> int:
    """Bytes of staging the staged routes of a ``num_pages`` write need."""
    return sum(_region(dst, r.dst_rank).page_nbytes * num_pages for r in routes if not r.is_direct)
