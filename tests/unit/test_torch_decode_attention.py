"""TorchAttention's decode-only step (every token a decode row), through the native kernel and
through the batched torch path, and a prefill-only step, against per-sequence causal SDPA, in fp32
and bf16."""

import pytest
import torch

from pdserve.runtime import attention_native
from pdserve.runtime.attention import TorchAttention, reference_attention
from pdserve.runtime.forward import SeqChunk, build_forward_batch, page_slots
from pdserve.runtime.kv_pool import KVLayout, KVPool

PS, D = 4, 16
TABLES = {"a": [9, 2, 14], "b": [5], "c": [0, 11, 7, 3, 12], "d": [1, 8]}
LENS = {"a": 10, "b": 3, "c": 17, "d": 5}  # lengths after the step: partial and full last pages


def _fill(att: TorchAttention, hq: int, hkv: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Prefill every sequence's history (all but its last token) in one step."""
    seqs = [SeqChunk(r, [0] * (LENS[r] - 1), 0, TABLES[r]) for r in TABLES]
    batch = build_forward_batch(seqs, PS)
    t = batch.num_tokens
    att.init_batch(batch)
    att.forward(0, *(torch.randn(t, h, D, generator=gen).to(dtype) for h in (hq, hkv, hkv)), batch, 0.25)


def _check(att, step, q, out, atol):
    for seq, q0 in zip(step.seqs, step.q_starts):
        keys, values = att.pool.gather(0, page_slots(seq.page_ids, 0, seq.kv_len, PS))
        ref = reference_attention(q[q0:q0 + seq.num_new_tokens].float(), keys.float(), values.float(),
                                  seq.start_pos, 0.25)
        torch.testing.assert_close(out[q0:q0 + seq.num_new_tokens].float(), ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
def test_decode_only_step_matches_reference(hq, hkv, dtype, atol, native):
    if native and attention_native.native() is None:
        pytest.skip("native CPU kernels unavailable here (no AVX-512 or no C compiler)")
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    pool = KVPool(16, KVLayout(num_layers=1, num_kv_heads=hkv, head_dim=D, page_size=PS,
                               dtype=str(dtype).removeprefix("torch.")))
    att = TorchAttention(pool, use_native=native)
    assert not native or attention_native.supports(pool.k(0), hq)  # the native case really runs native
    _fill(att, hq, hkv, dtype, gen)
    step = build_forward_batch([SeqChunk(r, [1], LENS[r] - 1, TABLES[r]) for r in TABLES], PS)
    q, k, v = (torch.randn(len(TABLES), h, D, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    att.init_batch(step)
    out = att.forward(0, q, k, v, step, 0.25)
    assert out.shape == q.shape and out.dtype == dtype
    _check(att, step, q, out, atol)


def test_prefill_only_step_matches_reference():
    gen = torch.Generator().manual_seed(7)
    hq, hkv = 6, 2
    pool = KVPool(16, KVLayout(num_layers=1, num_kv_heads=hkv, head_dim=D, page_size=PS, dtype="float32"))
    att = TorchAttention(pool)
    _fill(att, hq, hkv, torch.float32, gen)
    step = build_forward_batch([SeqChunk("c", [1, 2, 3], 14, TABLES["c"]),   # chunks after a cached prefix
                                SeqChunk("a", [1, 2], 8, TABLES["a"]),
                                SeqChunk("e", [1] * 6, 0, [4, 10])], PS)       # a first chunk, partial last page
    q, k, v = (torch.randn(11, h, D, generator=gen) for h in (hq, hkv, hkv))
    att.init_batch(step)
    _check(att, step, q, att.forward(0, q, k, v, step, 0.25), 1e-5)
