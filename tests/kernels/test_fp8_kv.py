"""FP8 KV pages (--kv-cache-dtype fp8_e4m3 | fp8_e5m2): store, decode and extend kernels against
their torch references, and TritonAttention against TorchAttention on one fp8 pool.

On CPU these run through the Triton interpreter. Its own fp32->fp8 cast is wrong (see
pdserve/kernels/_common.py); with pdserve's interpreter fix the store is bit-exact against torch,
subnormals and ties included, which is what the GPU's ``cvt.rn`` gives.
"""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close, page_table_for, random_pool
from pdserve.kernels.backend import TritonAttention
from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve.runtime.attention import TorchAttention
from pdserve.runtime.forward import SeqChunk, build_forward_batch
from pdserve.runtime.kv_pool import KVLayout, KVPool, quantize_kv

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
GQA = [(2, 2), (8, 2), (8, 1)]  # query heads per kv head: 1, 4, 8
HEAD_DIM, PAGE_SIZE = 32, 4
SCALES = [(1.0, 1.0), (0.37, 1.9)]  # default, and scales that are not powers of two


def _fp8_pool(num_pages: int, num_kv_heads: int, fp8: torch.dtype, k_scale: float, v_scale: float,
              seed: int = 0) -> torch.Tensor:
    """[num_pages, 2 layers, 2, PAGE_SIZE, Hkv, D] fp8 holding N(0, 3^2) / scale (K and V differ)."""
    buf = random_pool(num_pages, 2, PAGE_SIZE, num_kv_heads, HEAD_DIM, torch.float32, seed) * 3
    out = torch.empty(buf.shape, dtype=fp8, device=DEVICE)
    out[:, :, 0], out[:, :, 1] = quantize_kv(buf[:, :, 0], fp8, k_scale), quantize_kv(buf[:, :, 1], fp8, v_scale)
    return out


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_store_kv_quantizes_like_the_reference(fp8, dtype, k_scale, v_scale):
    num_pages, t = 6, 9
    buf = torch.zeros(num_pages, 2, 2, PAGE_SIZE, 2, 64, dtype=fp8, device=DEVICE)
    ref = buf.clone()
    k = (_randn(t, 2, 64, seed=3) * torch.logspace(-7, 3, 64, device=DEVICE)).to(dtype)  # every fp8 binade
    v = (_randn(t, 2, 64, seed=4) * torch.logspace(3, -7, 64, device=DEVICE)).to(dtype)
    k[0, 0, :4] = torch.tensor([1e5, -1e5, 1e30, -1e30], device=DEVICE).to(dtype)  # saturate, both signs
    loc = torch.tensor([0, 5, -1, 23, 17, 6, 8, 9, 1], device=DEVICE)  # -1: padding, skipped
    store_kv(buf[:, 1, 0], buf[:, 1, 1], loc, k, v, k_scale, v_scale)
    store_kv_ref(ref[:, 1, 0], ref[:, 1, 1], loc, k, v, k_scale, v_scale)
    got, want = buf.float(), ref.float()
    fmax = torch.finfo(fp8).max
    assert got.isfinite().all() and got.abs().max() == fmax  # outliers clamp to +-max, not inf/nan
    assert torch.equal(got[0, 1, 0, 0, 0, :4], torch.tensor([fmax, -fmax, fmax, -fmax], device=DEVICE))
    assert torch.equal(buf.view(torch.uint8), ref.view(torch.uint8))  # same rounding, bit for bit
    assert (want.abs() < torch.finfo(fp8).tiny).logical_and(want != 0).any()  # subnormals were covered
    assert torch.equal(buf[:, 0], torch.zeros_like(buf[:, 0]))  # other layer untouched


def test_store_kv_refuses_scales_on_non_fp8_pages():
    buf = random_pool(2, 1, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="k_scale"):
        store_kv(buf[:, 0, 0], buf[:, 0, 1], torch.zeros(1, dtype=torch.int64, device=DEVICE),
                 _randn(1, 2, 16), _randn(1, 2, 16), k_scale=0.5)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_decode_attention_reads_fp8_pages(fp8, dtype, num_q_heads, num_kv_heads, k_scale, v_scale):
    lens = [1, 7, 13, 37]  # a single token, odd lengths, partial last pages
    buf = _fp8_pool(48, num_kv_heads, fp8, k_scale, v_scale)
    kp, vp = buf[:, 1, 0], buf[:, 1, 1]
    table = page_table_for(lens, PAGE_SIZE, 48)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = _randn(len(lens), num_q_heads, HEAD_DIM, dtype=dtype, seed=1)
    out = decode_attention(q, kp, vp, table, seq_lens, 0.2, k_scale=k_scale, v_scale=v_scale,
                           num_kv_splits=3, block_n=16)
    ref = decode_attention_ref(q, kp, vp, table, seq_lens, 0.2, k_scale, v_scale)
    assert_close(out, ref)
    # the scales are really applied: ignoring them gives a different answer
    unscaled = decode_attention_ref(q, kp, vp, table, seq_lens, 0.2)
    assert (k_scale, v_scale) == (1.0, 1.0) or (unscaled.float() - ref.float()).abs().max() > 0.1


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_extend_attention_reads_fp8_prefix(fp8, dtype, num_q_heads, num_kv_heads, k_scale, v_scale):
    prefix, new = [0, 5, 13, 3, 9], [7, 1, 37, 16, 0]  # empty / partial-page prefix, ragged chunks
    buf = _fp8_pool(40, num_kv_heads, fp8, k_scale, v_scale)
    kp, vp = buf[:, 0, 0], buf[:, 0, 1]
    table = page_table_for(prefix, PAGE_SIZE, 40)
    t = sum(new)
    q = _randn(t, num_q_heads, HEAD_DIM, dtype=dtype, seed=2)
    k, v = _randn(t, num_kv_heads, HEAD_DIM, dtype=dtype, seed=3), _randn(t, num_kv_heads, HEAD_DIM, dtype=dtype, seed=4)
    q_starts = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE)
    prefix_lens = torch.tensor(prefix, dtype=torch.int32, device=DEVICE)
    out = extend_attention(q, k, v, kp, vp, table, q_starts, prefix_lens, max(new), 0.2,
                           k_scale=k_scale, v_scale=v_scale, block_m=32, block_n=16)
    assert_close(out, extend_attention_ref(q, k, v, kp, vp, table, q_starts, prefix_lens, 0.2, k_scale, v_scale))


@pytest.mark.parametrize("fp8", FP8)
def test_decode_kernel_rejects_mixed_page_dtypes(fp8):
    buf = _fp8_pool(8, 2, fp8, 1.0, 1.0)
    q = _randn(1, 4, HEAD_DIM)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="v_pages"):
        decode_attention(q, buf[:, 0, 0], buf[:, 0, 1].float(), table, lens, 0.3)


@pytest.mark.parametrize("fp8,mantissa_bits", [("float8_e4m3fn", 3), ("float8_e5m2", 2)])
def test_triton_backend_matches_torch_backend_on_fp8_pool(fp8, mantissa_bits):
    """Same fp8 pool, same steps: identical stored bytes and decode outputs. Prefill differs by
    design (the Triton extend kernel attends the step's own tokens at full precision, torch reads
    them back from the fp8 pool): on average by less than one fp8 half-ulp, relative."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=HEAD_DIM, page_size=PAGE_SIZE, dtype=fp8,
                      k_scale=0.5, v_scale=0.25)
    torch_pool, triton_pool = KVPool(40, layout, DEVICE), KVPool(40, layout, DEVICE)
    ref, tri = TorchAttention(torch_pool), TritonAttention(triton_pool, num_kv_splits=2)
    prefill = [SeqChunk("a", list(range(9)), 0, [3, 7, 1]), SeqChunk("b", list(range(14)), 0, [10, 2, 30, 31])]
    decode = [SeqChunk("a", [1], 9, [3, 7, 1]), SeqChunk("b", [1], 14, [10, 2, 30, 31])]
    g = torch.Generator().manual_seed(5)
    outs = []
    for seqs in (prefill, decode):
        batch = build_forward_batch(seqs, PAGE_SIZE, DEVICE)
        ref.init_batch(batch)
        tri.init_batch(batch)
        q, k, v = (torch.randn(batch.num_tokens, h, HEAD_DIM, generator=g).to(DEVICE) for h in (8, 2, 2))
        outs.append((tri.forward(1, q, k, v, batch, 0.2), ref.forward(1, q, k, v, batch, 0.2)))
        assert torch.equal(triton_pool.buffer.view(torch.uint8), torch_pool.buffer.view(torch.uint8))
    assert (torch_pool.buffer[:, 1].float() != 0).sum() > 0.9 * 2 * (10 + 15) * 2 * HEAD_DIM  # every token stored
    (tri_prefill, ref_prefill), (tri_decode, ref_decode) = outs
    torch.testing.assert_close(tri_decode, ref_decode, atol=1e-5, rtol=1e-5)
    diff = (tri_prefill - ref_prefill).abs()
    assert 0 < diff.mean() < 2.0 ** -(mantissa_bits + 1) * ref_prefill.abs().mean()
