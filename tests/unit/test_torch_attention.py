"""The batched torch attention (CPU path) against per-sequence causal SDPA."""

import pytest
import torch

from pdserve.runtime.attention import TorchAttention, reference_attention
from pdserve.runtime.forward import SeqChunk, build_forward_batch, page_slots
from pdserve.runtime.kv_pool import KVLayout, KVPool


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_mixed_batch_matches_reference(hq, hkv):
    torch.manual_seed(0)
    ps, d = 4, 8
    pool = KVPool(32, KVLayout(num_layers=2, num_kv_heads=hkv, head_dim=d, page_size=ps, dtype="float32"))
    att = TorchAttention(pool)
    # history for two decode seqs (lengths 6 and 9) and a prefill seq with a 5-token cached prefix
    seqs_hist = [SeqChunk("a", [0] * 6, 0, [3, 7]), SeqChunk("b", [0] * 9, 0, [10, 11, 12]),
                 SeqChunk("c", [0] * 5, 0, [20, 21])]
    hist = build_forward_batch(seqs_hist, ps)
    t = hist.num_tokens
    att.init_batch(hist)
    att.forward(1, torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d), hist, 0.3)
    step = build_forward_batch([SeqChunk("a", [1], 6, [3, 7]), SeqChunk("c", [1, 2, 3], 5, [20, 21]),
                                SeqChunk("b", [1], 9, [10, 11, 12])], ps)
    n = step.num_tokens
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    att.init_batch(step)
    out = att.forward(1, q, k, v, step, 0.3)
    for seq, q0 in zip(step.seqs, step.q_starts):
        loc = page_slots(seq.page_ids, 0, seq.kv_len, ps)
        keys, values = pool.gather(1, loc)
        ref = reference_attention(q[q0:q0 + seq.num_new_tokens], keys, values, seq.start_pos, 0.3)
        torch.testing.assert_close(out[q0:q0 + seq.num_new_tokens], ref, atol=1e-5, rtol=1e-5)
