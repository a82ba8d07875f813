"""Where each rank of a node sits: tensor parallelism and DP attention.

A node started with ``--tp N`` runs N ranks (one process and one device each). Rank 0 owns the
node's sockets, scheduler, sampler and transfer agent; ranks 1..N-1 are workers that execute the
steps rank 0 broadcasts (``runtime/tp_worker.py``).

With ``--enable-dp-attention --dp M`` (SGLang's meaning: M divides N) the N ranks form M attention
groups of ``N / M`` ranks. Each group attends its own requests over its own KV pages, with the
attention weights split over the group's ranks (``attn_tp``); the MLP is split over all N ranks,
so hidden states are gathered across groups before the MLP and scattered back after it.

Rank layout, N = 4, M = 2::

    rank:           0      1      2      3
    dp group:       0      0      1      1        attention + KV pages of group g's requests
    attn-tp rank:   0      1      0      1        KV heads [0, H/2) and [H/2, H)
    MLP / LM head:  tp rank 0..3 of 4              weights split four ways

Process groups (every rank creates every group, in the same order, as torch.distributed asks):
``world`` (MLP collectives; NCCL on GPU, gloo on CPU), ``attn`` (one per dp group), ``cross``
(ranks of equal attn-tp rank across dp groups: the gather around the MLP), ``control`` (gloo,
for rank 0's step broadcasts, also on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pdserve.models.layers import TPInfo


@dataclass(frozen=True)
class RankLayout:
    """The position of one rank; pure arithmetic, no process group."""
    world_size: int = 1
    dp_size: int = 1            # attention groups (1 without --enable-dp-attention)
    rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.dp_size < 1:
            raise ValueError(f"--tp/--dp: must be >= 1, got {self.world_size}/{self.dp_size}")
        if self.world_size % self.dp_size:
            raise ValueError(f"--dp: {self.dp_size} attention groups must divide --tp {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def attn_tp_size(self) -> int:
        return self.world_size // self.dp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.attn_tp_size

    @property
    def attn_tp_rank(self) -> int:
        return self.rank % self.attn_tp_size

    def attn_group_ranks(self, dp_rank: int) -> list[int]:
        start = dp_rank * self.attn_tp_size
        return list(range(start, start + self.attn_tp_size))

    def cross_group_ranks(self, attn_tp_rank: int) -> list[int]:
        return [g * self.attn_tp_size + attn_tp_rank for g in range(self.dp_size)]

    def with_rank(self, rank: int) -> "RankLayout":
        return RankLayout(self.world_size, self.dp_size, rank)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups (``None`` members at world size 1)."""
    layout: RankLayout
    world: Any = None
    attn: Any = None
    cross: Any = None
    control: Any = None

    @property
    def mlp_tp(self) -> TPInfo:
        return TPInfo(self.layout.rank, self.layout.world_size, self.world)

    @property
    def attn_tp(self) -> TPInfo:
        return TPInfo(self.layout.attn_tp_rank, self.layout.attn_tp_size, self.attn)

    @property
    def dp(self) -> "DPInfo":
        return DPInfo(self.layout.dp_rank, self.layout.dp_size, self.cross)


@dataclass(frozen=True)
class DPInfo:
    """Attention data parallelism as the model sees it: which group this rank attends for, and the
    collectives that gather the groups' tokens around the MLP (over ``cross``)."""
    rank: int = 0
    size: int = 1
    group: Any = None

    def gather(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """This group's rows ``x [counts[rank], ...]`` -> every group's rows ``[sum(counts), ...]``."""
        if self.size == 1:
            return x
        most = max(counts)
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def own(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every group's rows -> this group's rows (no communication: every rank holds them all)."""
        if self.size == 1:
            return x
        start = sum(counts[:self.rank])
        return x[start:start + counts[self.rank]]


def init_groups(layout: RankLayout, backend: str, init_method: str, timeout_s: float) -> ParallelGroups:
    """Join the node's process group and create the sub-groups (collective: every rank calls it)."""
    from datetime import timedelta

    if layout.world_size == 1:
        return ParallelGroups(layout)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=layout.rank,
                            world_size=layout.world_size, timeout=timeout)
    world = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else world
    attn = cross = None
    for g in range(layout.dp_size):
        group = dist.new_group(layout.attn_group_ranks(g), timeout=timeout)
        if g == layout.dp_rank:
            attn = group
    for r in range(layout.attn_tp_size):
        group = dist.new_group(layout.cross_group_ranks(r), timeout=timeout)
        if r == layout.attn_tp_rank:
            cross = group
    return ParallelGroups(layout, world=world, attn=attn, cross=cross, control=control)


def broadcast_bytes(data: bytes | None, group: Any) -> bytes:
    """Rank 0's ``data`` to every rank of ``group`` (gloo, CPU tensors): length, then the bytes."""
    is_src = dist.get_rank() == 0
    size = torch.tensor([len(data) if is_src else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if is_src and size.item()
           else torch.empty(int(size.item()), dtype=torch.uint8))
    if size.item():
        dist.broadcast(buf, src=0, group=group)
    return data if is_src else buf.numpy().tobytes()
