"""Tensor-parallel and DP-attention arithmetic (no process groups): rank layout, head splits, the
transfer routes between two TP layouts, staging, and the flags that refuse what is not built."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import ParallelConfig
from pdserve.launch import LaunchConfig
from pdserve.models.layers import head_shard
from pdserve.runtime.kv_pool import KVLayout, KVPool
from pdserve.runtime.parallel import DPInfo, RankLayout
from pdserve.transfer.pools import PoolSet, RankPool, StagingArea, assemble
from pdserve.transfer.tp_map import RegionInfo, plan_routes


def regions(heads: list[tuple[int, int]], page_per_head: int = 100, groups: list[int] | None = None):
    return [RegionInfo(rank=r, base_addr=r << 32, page_nbytes=n * page_per_head, device_id=0, kv_start=s,
                       kv_count=n, dp_group=(groups or [0] * len(heads))[r]) for r, (s, n) in enumerate(heads)]


def test_rank_layout_groups():
    lay = RankLayout(world_size=4, dp_size=2, rank=3)
    assert (lay.attn_tp_size, lay.dp_rank, lay.attn_tp_rank) == (2, 1, 1)
    assert lay.attn_group_ranks(1) == [2, 3] and lay.cross_group_ranks(1) == [1, 3]
    with pytest.raises(ValueError, match="--dp: 2 attention groups must divide --tp 3"):
        RankLayout(world_size=3, dp_size=2)


def test_head_shard_uneven_and_replicated():
    # SmolLM2: 9 query heads, 3 KV heads over 2 ranks -> whole KV groups 2 + 1
    assert [head_shard(9, 3, 2, r) for r in range(2)] == [
        type(head_shard(9, 3, 2, 0))(0, 6, 0, 2), type(head_shard(9, 3, 2, 0))(6, 3, 2, 1)]
    # 8 query heads, 2 KV heads over 4 ranks: KV heads replicated, each rank the one its queries use
    shards = [head_shard(8, 2, 4, r) for r in range(4)]
    assert [(s.q_start, s.q_count, s.kv_start, s.kv_count) for s in shards] == \
        [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        head_shard(9, 3, 4, 0)


def test_routes_equal_tp_are_direct():
    routes = plan_routes(regions([(0, 2), (2, 1)]), regions([(0, 2), (2, 1)]))
    assert [(r.dst_rank, r.is_direct, [(p.src_rank, p.head_start, p.head_count) for p in r.pieces])
            for r in routes] == [(0, True, [(0, 0, 2)]), (1, True, [(1, 2, 1)])]


def test_routes_tp1_to_tp2_take_each_decode_rank_its_heads():
    routes = plan_routes(regions([(0, 3)]), regions([(0, 2), (2, 1)]))
    assert [(r.dst_rank, r.is_direct, [(p.src_rank, p.head_start, p.head_count, p.dst_offset) for p in r.pieces])
            for r in routes] == [(0, False, [(0, 0, 2, 0)]), (1, False, [(0, 2, 1, 0)])]


def test_routes_tp2_to_tp1_assemble_from_both_prefill_ranks():
    (route,) = plan_routes(regions([(0, 2), (2, 1)]), regions([(0, 3)]))
    assert not route.is_direct
    assert [(p.src_rank, p.head_start, p.head_count, p.dst_offset) for p in route.pieces] == \
        [(0, 0, 2, 0), (1, 2, 1, 2)]


def test_routes_per_dp_group_and_refusals():
    dst = regions([(0, 3), (0, 3)], groups=[0, 1])      # decode tp=2 dp=2: each group holds all heads
    for group in (0, 1):
        (route,) = plan_routes(regions([(0, 3)]), dst, group)
        assert route.dst_rank == group and route.is_direct
    assert plan_routes(regions([(0, 3)]), dst, 2) == "decode has no ranks in DP attention group 2"
    reason = plan_routes(regions([(0, 2)]), regions([(0, 3)]))
    assert reason == "prefill ranks hold KV heads [(0, 2)], decode rank 0 needs head 2 (of [0, 3))"


def test_replicated_source_heads_prefer_a_direct_route():
    # prefill tp=4 over 2 KV heads (replicated), decode tp=2 (one head each)
    src = regions([(0, 1), (0, 1), (1, 1), (1, 1)])
    routes = plan_routes(src, regions([(0, 1), (1, 1)]))
    assert [(r.is_direct, r.pieces[0].src_rank) for r in routes] == [(True, 0), (True, 2)]


def test_staging_area_first_fit_and_merge():
    area = StagingArea(4096)
    a, b, c = area.alloc(1000), area.alloc(1000), area.alloc(1000)
    assert (a, b, c) == (0, 1024, 2048) and area.alloc(2000) is None
    area.free(b, 1000)
    area.free(a, 1000)
    assert area.alloc(2000) == 0                          # the two freed spans merged
    area.free(0, 2000)
    area.free(c, 1000)
    assert area.free_bytes == 4096


def test_assemble_builds_the_decode_rank_pages_from_two_prefill_ranks():
    lay = KVLayout(num_layers=2, num_kv_heads=3, head_dim=4, page_size=2, dtype="float32")
    full = torch.randn(6, 2, 2, 2, 3, 4)                  # [pages, layers, kv, slots, heads, dim]
    p0, p1 = KVPool(6, KVLayout(2, 2, 4, 2, "float32")), KVPool(6, KVLayout(2, 1, 4, 2, "float32"))
    p0.buffer.copy_(full[..., :2, :])
    p1.buffer.copy_(full[..., 2:, :])
    pools = PoolSet([RankPool(0, p0, 0, 2), RankPool(1, p1, 2, 1)], 3)
    (route,) = plan_routes(regions([(0, 2), (2, 1)]), regions([(0, 3)]))
    out = torch.empty(3, 2, 2, 2, 3, 4)
    assemble(pools, [4, 1, 5], route, out)
    assert torch.equal(out, full[[4, 1, 5]])
    assert lay.page_nbytes == out[0].numel() * 4


def test_dp_gather_own_without_groups_is_identity():
    x = torch.randn(3, 5)
    assert DPInfo().gather(x, [3]) is x and DPInfo().own(x, [3]) is x


@pytest.mark.parametrize("kwargs, message", [
    ({"dp": 2}, "--dp: 2 without --enable-dp-attention"),
    ({"tp": 3, "dp": 2, "enable_dp_attention": True}, "--dp: 2 attention groups must divide --tp 3"),
    ({"nnodes": 2}, "--nnodes: a node's ranks must share one host"),
    ({"dist_init_addr": "nohost"}, "--dist-init-addr: expected host:port"),
    ({"dist_timeout": 0}, "--dist-timeout: must be positive"),
])
def test_parallel_flags_refuse_with_the_flag_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_launcher_per_role_layouts():
    launch = LaunchConfig(prefill=1, decode=1, prefill_tp=2, decode_tp=4, decode_dp=2)
    base = ParallelConfig()
    assert launch.parallel_for("prefill", base) == ParallelConfig(tp=2)
    assert launch.parallel_for("decode", base) == ParallelConfig(tp=4, dp=2, enable_dp_attention=True)
    with pytest.raises(ValueError, match="--decode-tp/--decode-dp: --dp: 2 attention groups must divide --tp 3"):
        LaunchConfig(prefill=1, decode=1, decode_tp=3, decode_dp=2).parallel_for("decode", base)


def test_dp_attention_is_refused_on_prefill_nodes():
    from pdserve.config import EngineConfig
    from pdserve.runtime.model_runner import check_kernel_flags
    cfg = EngineConfig(parallel=ParallelConfig(tp=2, dp=2, enable_dp_attention=True))
    check_kernel_flags(cfg, "decode")
    with pytest.raises(ValueError, match="--enable-dp-attention: decode and colocated nodes only"):
        check_kernel_flags(cfg, "prefill")
