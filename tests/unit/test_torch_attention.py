"""The batched torch attention (CPU path) against per-sequence causal SDPA."""

import pytest

from pdserve.runtime.kv_pool import KVLayout, KVPool
from tests.unit.attention_scenario import check_mixed_batch


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_mixed_batch_matches_reference(hq, hkv):
    """Two decode rows and a chunk over a 5-token cached prefix (tests/unit/attention_scenario.py)."""
    check_mixed_batch(KVPool(32, KVLayout(num_layers=2, num_kv_heads=hkv, head_dim=8, page_size=4,
                                          dtype="float32")), hq)
