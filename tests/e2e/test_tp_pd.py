"""Prefill and decode nodes with different tensor-parallel layouts, as real processes (each TP
node: rank 0 + a rank subprocess over gloo), KV pushed over real NIXL/UCX: every decode rank gets
exactly its KV heads (direct page runs, or relayouts staged on the prefill side), and the output
is token-identical to transformers."""

from __future__ import annotations

import pytest

from tests.e2e.test_pd_nodes import GREEDY, Router, assert_parity, start_node, stop

pytestmark = pytest.mark.slow

PICKS = [0, 5]              # 5 and 513 prompt tokens (the long one in 5 chunk writes)
KV_BYTES_513 = -(-513 // 16) * 16 * 30 * 2 * 3 * 64 * 4     # 33 pages x all 30 layers' K and V, all 3 heads


@pytest.mark.parametrize("prefill_flags, decode_flags, decode_ranks", [
    ([], ["--tp", "2"], 2),                                                    # 1 -> 2: staged, split
    # 2 -> 1: each attention group of the decode node is one rank holding every head, assembled from
    # both prefill ranks (the plain 2 -> 1 mapping, plus DP attention's group placement)
    (["--tp", "2"], ["--tp", "2", "--dp", "2", "--enable-dp-attention"], 1),
], ids=["p1-d2", "p2-d1-per-dp-group"])
def test_mismatched_tp_is_token_identical(smollm2_path, parity_prompts, parity_expected, prefill_flags,
                                          decode_flags, decode_ranks):
    p, pinfo = start_node("prefill", smollm2_path, *prefill_flags)
    try:
        d, dinfo = start_node("decode", smollm2_path, *decode_flags)
    except Exception:
        stop(p)
        raise
    try:
        r = Router()
        rids = {r.submit(pinfo, dinfo, parity_prompts[i], GREEDY): i for i in PICKS}
        results = r.collect(set(rids))
        assert_parity(results, rids, parity_expected)
        big = results[next(rid for rid, i in rids.items() if i == 5)]["prefill"]
        assert big.ok and big.kv_bytes == KV_BYTES_513          # every head of every page, once
        # one descriptor per page run per decode rank: <= 5 chunk writes + page-boundary splits,
        # never one per page, layer or head
        assert decode_ranks <= big.num_descriptors <= 8 * decode_ranks, big
        for info in (pinfo, dinfo):
            s = r.stats(info)
            assert s.waiting == 0 and s.running == 0 and s.free_pages + s.cached_pages == s.total_pages, s
    finally:
        stop(d)
        stop(p)
