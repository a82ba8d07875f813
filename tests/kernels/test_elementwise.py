"""RMSNorm (plain and fused), rotary, SiLU-and-mul, K/V store: each against its torch reference."""

import pytest
import torch

from kernel_helpers import DEVICE, DTYPES, assert_close, random_pool
from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from pdserve.kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache, rope_inv_freq


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype):
    x, w = _randn(5, 72, dtype=dtype), _randn(72, dtype=dtype, seed=1)  # hidden not a power of two
    assert_close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm_returns_normed_and_new_residual(dtype):
    x, res, w = _randn(4, 48, dtype=dtype), _randn(4, 48, dtype=dtype, seed=1), _randn(48, dtype=dtype, seed=2)
    x_before, res_before = x.clone(), res.clone()
    normed, new_res = fused_add_rmsnorm(x, res, w, 1e-5)
    ref_normed, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-5)
    assert_close(new_res, ref_res)
    assert_close(normed, ref_normed)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


def test_rmsnorm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(_randn(2, 8), _randn(9), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [32, 24])  # full and partial rotary
def test_rotary_in_place(dtype, rotary_dim):
    cache = build_cos_sin_cache(rope_inv_freq(rotary_dim, 10000.0), 64, DEVICE)
    qkv = _randn(6, 8, 32, dtype=dtype)  # [T, Hq + 2 * Hkv, D] with Hq=4, Hkv=2
    q, k = qkv[:, :4], qkv[:, 4:6]  # strided views
    positions = torch.tensor([0, 1, 63, 7, 7, 30], device=DEVICE)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cache)
    out_q, out_k = apply_rotary(q, k, positions, cache)
    assert out_q.data_ptr() == q.data_ptr()
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    assert_close(q[0], qkv[0, :4])  # position 0: identity


def test_rotary_matches_hf_rotate_half():
    # the textbook formula (x * cos + rotate_half(x) * sin) with cos/sin duplicated over both halves
    cache = build_cos_sin_cache(rope_inv_freq(16, 500.0), 10, DEVICE)
    q, k = _randn(3, 2, 16), _randn(3, 1, 16, seed=1)
    pos = torch.tensor([1, 4, 9], device=DEVICE)
    angles = pos.float()[:, None].cpu() * rope_inv_freq(16, 500.0)[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None].to(DEVICE), torch.cat([angles.sin()] * 2, -1)[:, None].to(DEVICE)
    expected = q * cos + torch.cat([-q[..., 8:], q[..., :8]], -1) * sin
    apply_rotary(q, k, pos, cache)
    assert_close(q, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_16bit_is_bitwise_hf_ops(dtype):
    # transformers' apply_rotary_pos_emb in a 16-bit model: cos/sin cast to the dtype, each op rounds
    cache = build_cos_sin_cache(rope_inv_freq(32, 10000.0), 4096, DEVICE)
    q, k = _randn(5, 4, 32, dtype=dtype), _randn(5, 2, 32, dtype=dtype, seed=1)
    pos = torch.tensor([0, 7, 300, 2047, 4095], device=DEVICE)
    cos = torch.cat([cache[pos, :16]] * 2, -1)[:, None].to(dtype)
    sin = torch.cat([cache[pos, 16:]] * 2, -1)[:, None].to(dtype)
    hf_q = q * cos + torch.cat([-q[..., 16:], q[..., :16]], -1) * sin
    hf_k = k * cos + torch.cat([-k[..., 16:], k[..., :16]], -1) * sin
    apply_rotary(q, k, pos, cache)
    assert torch.equal(q, hf_q) and torch.equal(k, hf_k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_16bit_is_bitwise_hf_ops(dtype):
    # transformers' LlamaMLP: act_fn(gate) rounds to the dtype, then the product rounds again
    x = _randn(3, 2 * 300, dtype=dtype)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul(x), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = _randn(3, 2 * 1100, dtype=dtype)  # crosses a 1024 block
    assert_close(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_into_strided_layer_views(dtype):
    buf, ref = random_pool(6, 3, 4, 2, 16, dtype), random_pool(6, 3, 4, 2, 16, dtype)
    loc = torch.tensor([0, 5, -1, 23, 17, 6], device=DEVICE)  # -1: padding, skipped
    k, v = _randn(6, 2, 16, dtype=dtype, seed=3), _randn(6, 2, 16, dtype=dtype, seed=4)
    store_kv(buf[:, 1, 0], buf[:, 1, 1], loc, k, v)
    store_kv_ref(ref[:, 1, 0], ref[:, 1, 1], loc, k, v)
    assert torch.equal(buf, ref)
    assert torch.equal(buf[5, 1, 1, 3], v[3])  # slot 23 = page 5, offset 3


def test_store_kv_rejects_wrong_slot_count():
    buf = random_pool(2, 1, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="slots"):
        store_kv(buf[:, 0, 0], buf[:, 0, 1], torch.zeros(3, dtype=torch.int64, device=DEVICE),
                 _randn(2, 2, 16), _randn(2, 2, 16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_gate_up_blocks(dtype):
    """Gate and up columns in blocks (MergedColumnParallelLinear's layout): the same result as the
    halves layout of the same columns."""
    x = _randn(3, 2 * 1100, dtype=dtype)
    blocked = x.view(3, 2, 1100 // 4, 4).transpose(1, 2).reshape(3, 2200)  # 4 gate cols, their 4 up cols, ...
    assert torch.equal(silu_and_mul(blocked, block=4), silu_and_mul(x))
    assert_close(silu_and_mul(blocked, block=4), silu_and_mul_ref(blocked, 4))
    with pytest.raises(ValueError, match="block"):
        silu_and_mul(x, block=3)
