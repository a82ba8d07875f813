"""The fused rotary + K/V store kernel equals ``apply_rotary`` then ``store_kv`` bit for bit, and
the torch references (16-bit roundings, fp8 quantization, skipped slots, partial rotary, GQA)."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, fused_qkv, random_pool
from pdserve.kernels.kv_store import store_kv
from pdserve.kernels.rope_store import rope_store_kv, rope_store_kv_ref
from pdserve.kernels.rotary import apply_rotary, build_cos_sin_cache, rope_inv_freq

HEAD_DIM, PAGE_SIZE, NUM_PAGES = 32, 4, 8
LOC = [5, 0, -1, 31, 12, 6, 17]  # -1: a padding row, no pool write


def _case(hq: int, hkv: int, dtype: torch.dtype, seed: int = 0):
    """A fused qkv output [T, (Hq + 2 Hkv) D] and its q/k/v views, as the model slices it."""
    g = torch.Generator().manual_seed(seed)
    t = len(LOC)
    qkv, (q, k, v) = fused_qkv(t, hq, hkv, HEAD_DIM, dtype, g)
    positions = torch.randint(0, 500, (t,), generator=g).to(DEVICE)
    return qkv, (q, k, v), positions


def _run(fn, hq, hkv, dtype, rotary_dim, page_dtype=None, scales=(1.0, 1.0)):
    qkv, (q, k, v), positions = _case(hq, hkv, dtype)
    cache = build_cos_sin_cache(rope_inv_freq(rotary_dim, 10000.0), 512, DEVICE)
    pool = random_pool(NUM_PAGES, 2, PAGE_SIZE, hkv, HEAD_DIM, torch.float32, seed=7).to(page_dtype or dtype)
    loc = torch.tensor(LOC, device=DEVICE)
    fn(q, k, v, positions, cache, pool[:, 1, 0], pool[:, 1, 1], loc, *scales)
    return qkv, pool


def _two_kernels(q, k, v, positions, cache, k_pages, v_pages, loc, k_scale=1.0, v_scale=1.0):
    apply_rotary(q, k, positions, cache)
    store_kv(k_pages, v_pages, loc, k, v, k_scale, v_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])  # GQA 1, 4, 8
@pytest.mark.parametrize("rotary_dim", [32, 24])  # full and partial rotary
def test_rope_store_equals_the_two_kernels_and_the_reference(dtype, hq, hkv, rotary_dim):
    fused = _run(rope_store_kv, hq, hkv, dtype, rotary_dim)
    assert all(torch.equal(a, b) for a, b in zip(fused, _run(_two_kernels, hq, hkv, dtype, rotary_dim)))
    assert all(torch.equal(a, b) for a, b in zip(fused, _run(rope_store_kv_ref, hq, hkv, dtype, rotary_dim)))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_rope_store_fp8_pages(fp8):
    args = (8, 2, torch.bfloat16, 32, fp8, (0.37, 1.9))
    fused_qkv, fused_pool = _run(rope_store_kv, *args)
    ref_qkv, ref_pool = _run(rope_store_kv_ref, *args)
    assert torch.equal(fused_qkv, ref_qkv)
    assert torch.equal(fused_pool.view(torch.uint8), ref_pool.view(torch.uint8))


def test_rope_store_skips_negative_slots_and_writes_the_rotated_key():
    qkv, pool = _run(rope_store_kv, 8, 2, torch.float32, 32)
    untouched = random_pool(NUM_PAGES, 2, PAGE_SIZE, 2, HEAD_DIM, torch.float32, seed=7)
    assert torch.equal(pool[:, 0], untouched[:, 0])  # other layer
    written = {slot for slot in LOC if slot >= 0}
    for slot in range(NUM_PAGES * PAGE_SIZE):  # slots no token maps to keep their old values
        if slot not in written:
            assert torch.equal(pool[slot // PAGE_SIZE, 1, :, slot % PAGE_SIZE],
                               untouched[slot // PAGE_SIZE, 1, :, slot % PAGE_SIZE])
    k_rotated = qkv[0, 8 * HEAD_DIM:10 * HEAD_DIM].view(2, HEAD_DIM)  # token 0 -> slot 5
    assert torch.equal(pool[1, 1, 0, 1], k_rotated)


def test_rope_store_rejects_mismatched_slots():
    _, (q, k, v), positions = _case(8, 2, torch.float32)
    cache = build_cos_sin_cache(rope_inv_freq(32, 10000.0), 512, DEVICE)
    pool = random_pool(NUM_PAGES, 1, PAGE_SIZE, 2, HEAD_DIM, torch.float32)
    with pytest.raises(ValueError, match="slots"):
        rope_store_kv(q, k, v, positions, cache, pool[:, 0, 0], pool[:, 0, 1], torch.zeros(2, device=DEVICE).long())
