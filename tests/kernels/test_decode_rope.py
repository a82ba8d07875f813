"""Decode attention with the step's rotary + K/V store folded in (``decode_attention(...,
rope=DecodeRope(...))``) equals ``rope_store_kv`` then ``decode_attention`` bit for bit: the
output and every page, over GQA 1/4/8, partial rotary, one and several splits, fp8 pages, a
padding row (length 0, slot -1) and contexts whose new token falls in different splits."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close, fused_qkv, random_pool
from pdserve.kernels.decode_attention import DecodeRope, decode_attention, decode_attention_ref
from pdserve.kernels.rope_store import rope_store_kv
from pdserve.kernels.rotary import build_cos_sin_cache, rope_inv_freq

D, PS, PAGES = 32, 4, 32
LENS = [1, 9, 0, 22, 16]  # 0: a graph padding row (slot -1)


def _case(hq: int, hkv: int, dtype, page_dtype, rotary_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = len(LENS)
    qkv, (q, k, v) = fused_qkv(b, hq, hkv, D, dtype, g)
    pool = random_pool(PAGES, 2, PS, hkv, D, torch.float32, seed=3).to(page_dtype)
    perm = torch.randperm(PAGES, generator=g)
    width = max(-(-n // PS) for n in LENS)
    table = torch.stack([perm[i * width:(i + 1) * width] for i in range(b)]).to(torch.int32).to(DEVICE)
    lens = torch.tensor(LENS, dtype=torch.int32, device=DEVICE)
    loc = torch.tensor([int(table[i, (n - 1) // PS]) * PS + (n - 1) % PS if n else -1 for i, n in enumerate(LENS)],
                       device=DEVICE)
    positions = (lens.long() - 1).clamp(min=0)
    cache = build_cos_sin_cache(rope_inv_freq(rotary_dim, 10000.0), 64, DEVICE)
    return qkv, (q, k, v), pool, table, lens, DecodeRope(k, v, positions, cache, loc)


def _fused(case, splits, scales):
    qkv, (q, k, v), pool, table, lens, rope = case
    out = decode_attention(q, pool[:, 1, 0], pool[:, 1, 1], table, lens, 0.2, k_scale=scales[0], v_scale=scales[1],
                           num_kv_splits=splits, rope=rope, block_n=4)
    return out, pool


def _two_kernels(case, splits, scales):
    qkv, (q, k, v), pool, table, lens, rope = case
    rope_store_kv(q, k, v, rope.positions, rope.cos_sin_cache, pool[:, 1, 0], pool[:, 1, 1], rope.loc, *scales)
    out = decode_attention(q, pool[:, 1, 0], pool[:, 1, 1], table, lens, 0.2, k_scale=scales[0], v_scale=scales[1],
                           num_kv_splits=splits, block_n=4)
    return out, pool


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("rotary_dim,splits", [(32, 4), (24, 1), (32, 3)])
def test_fused_rope_store_equals_the_two_kernels(dtype, hq, hkv, rotary_dim, splits):
    fused_out, fused_pool = _fused(_case(hq, hkv, dtype, dtype, rotary_dim), splits, (1.0, 1.0))
    out, pool = _two_kernels(_case(hq, hkv, dtype, dtype, rotary_dim), splits, (1.0, 1.0))
    assert torch.equal(fused_pool, pool)
    assert torch.equal(fused_out, out)
    qkv, (q, k, v), ref_pool, table, lens, rope = _case(hq, hkv, dtype, dtype, rotary_dim)
    ref = decode_attention_ref(q, ref_pool[:, 1, 0], ref_pool[:, 1, 1], table, lens, 0.2, rope=rope)
    assert torch.equal(ref_pool, pool)
    assert_close(fused_out, ref)
    assert not fused_out[2].any()  # the padding row: no keys, zeros


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fused_rope_store_fp8_pages(fp8):
    args = (8, 2, torch.bfloat16, fp8, 32)
    fused_out, fused_pool = _fused(_case(*args), 3, (0.37, 1.9))
    out, pool = _two_kernels(_case(*args), 3, (0.37, 1.9))
    assert torch.equal(fused_pool.view(torch.uint8), pool.view(torch.uint8))
    assert torch.equal(fused_out, out)


def test_fused_rope_leaves_q_and_k_unrotated():
    qkv, (q, k, v), pool, table, lens, rope = case = _case(8, 2, torch.float32, torch.float32, 32)
    before = qkv.clone()
    _fused(case, 2, (1.0, 1.0))
    assert torch.equal(qkv, before)


def test_fused_rope_rejects_mismatched_k():
    qkv, (q, k, v), pool, table, lens, rope = _case(8, 2, torch.float32, torch.float32, 32)
    bad = DecodeRope(k[:2], v[:2], rope.positions, rope.cos_sin_cache, rope.loc)
    with pytest.raises(ValueError, match="k"):
        decode_attention(q, pool[:, 1, 0], pool[:, 1, 1], table, lens, 0.2, rope=bad)
