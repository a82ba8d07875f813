"""One mixed prefill/decode attention scenario, shared by the torch-attention tests (fp32 and fp8
pools): three sequences' history written through the backend, then a step with two decode rows
and a 3-token chunk over a cached prefix, each row checked against exact attention over the
context read back from the pool."""

from __future__ import annotations

import torch

from pdserve.runtime.attention import TorchAttention, reference_attention
from pdserve.runtime.forward import SeqChunk, build_forward_batch, page_slots
from pdserve.runtime.kv_pool import KVPool

SCALE = 0.3


def check_mixed_batch(pool: KVPool, hq: int, k_history_gain: float = 1.0) -> None:
    """Run the scenario on ``pool`` (layer 1) through ``TorchAttention``; the history's keys are
    ``k_history_gain`` times N(0, 1) (large keys exercise fp8 clamping)."""
    torch.manual_seed(0)
    att = TorchAttention(pool)
    ps, hkv, d = pool.page_size, pool.layout.num_kv_heads, pool.layout.head_dim
    hist = build_forward_batch([SeqChunk("a", [0] * 6, 0, [3, 7]), SeqChunk("b", [0] * 9, 0, [10, 11, 12]),
                                SeqChunk("c", [0] * 5, 0, [20, 21])], ps)
    t = hist.num_tokens
    att.init_batch(hist)
    att.forward(1, torch.randn(t, hq, d), torch.randn(t, hkv, d) * k_history_gain, torch.randn(t, hkv, d),
                hist, SCALE)
    step = build_forward_batch([SeqChunk("a", [1], 6, [3, 7]), SeqChunk("c", [1, 2, 3], 5, [20, 21]),
                                SeqChunk("b", [1], 9, [10, 11, 12])], ps)
    n = step.num_tokens
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    att.init_batch(step)
    out = att.forward(1, q, k, v, step, SCALE)
    for seq, q0 in zip(step.seqs, step.q_starts):
        keys, values = pool.gather(1, page_slots(seq.page_ids, 0, seq.kv_len, ps), torch.float32)  # whole context
        ref = reference_attention(q[q0:q0 + seq.num_new_tokens], keys, values, seq.start_pos, SCALE)
        torch.testing.assert_close(out[q0:q0 + seq.num_new_tokens], ref, atol=1e-5, rtol=1e-5)
