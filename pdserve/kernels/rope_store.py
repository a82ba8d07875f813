"""Rotary embedding fused with the K/V store: one launch per layer where there were two.

Program ``t`` (one per token) rotates token t's q heads in place, rotates its k heads (in place
too: extend attention reads the step's own keys from ``k``) and writes them, with its v heads, into
slot ``loc[t]`` of the page pool; a negative slot skips the pool write (CUDA-graph padding).
Roundings are rotary.py's (those of transformers' ops), fp8 pages get kv_store.py's quantization,
so the result equals ``apply_rotary`` followed by ``store_kv`` bit for bit. Dims past the rotary
dim (partial rotary) are stored unrotated.

Prefill and mixed steps run this; decode steps do the same inside decode attention
(``decode_attention(..., rope=DecodeRope(...))``, no launch at all).

Why: at batch 1 a decode step is ~350 kernels in a CUDA graph, and each costs a ramp and a tail
beside its own work (H200, Llama-3.1-8B: rotary 1.9 us and store 1.3 us per layer, mostly
fixed cost); eager prefill is host-bound on launches, and this removes one per layer there too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import next_pow2, require
from pdserve.kernels.kv_store import check_store_args, store_kv_ref, store_warps, to_page
from pdserve.kernels.rotary import apply_rotary_ref, check_rotary_args, rotary_warps, rotate_pair, rotate_token_q


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cache_ptr, k_pages_ptr, v_pages_ptr, loc_ptr, k_inv_scale, v_inv_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache,
    stride_kp, stride_ks, stride_kph, stride_vp, stride_vs, stride_vph,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs_r, mask_r = rotate_token_q(q_ptr, pos_ptr, cache_ptr, t, stride_qt, stride_qh, stride_cache,
                                              NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_R)

    slot = tl.load(loc_ptr + t).to(tl.int64)
    page, offset = slot // PAGE_SIZE, slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_KH)
    mask_h = (offs_h < NUM_KV_HEADS)[:, None]
    k_dst = k_pages_ptr + page * stride_kp + offset * stride_ks + offs_h[:, None] * stride_kph
    # k: rotate in registers, write back in place and into the page
    k_src = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_r[None, :]
    mask_k = mask_h & mask_r[None, :]
    k1 = tl.load(k_src, mask=mask_k, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + HALF, mask=mask_k, other=0.0).to(tl.float32)
    r1, r2 = rotate_pair(k1, k2, cos, sin, k_ptr.dtype.element_ty)
    tl.store(k_src, r1, mask=mask_k)
    tl.store(k_src + HALF, r2, mask=mask_k)
    page_dtype = k_pages_ptr.dtype.element_ty
    mask_kp = mask_k & (slot >= 0)
    tl.store(k_dst + offs_r[None, :], to_page(r1, k_inv_scale, FP8_MAX, page_dtype), mask=mask_kp)
    tl.store(k_dst + HALF + offs_r[None, :], to_page(r2, k_inv_scale, FP8_MAX, page_dtype), mask=mask_kp)
    offs_d = tl.arange(0, BLOCK_D)
    if 2 * HALF < HEAD_DIM:  # partial rotary: the rest of k as it is
        mask_tail = mask_h & ((offs_d >= 2 * HALF) & (offs_d < HEAD_DIM))[None, :] & (slot >= 0)
        tail = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask_tail)
        tl.store(k_dst + offs_d[None, :], to_page(tail, k_inv_scale, FP8_MAX, page_dtype), mask=mask_tail)
    # v: straight into the page
    mask_v = mask_h & (offs_d < HEAD_DIM)[None, :] & (slot >= 0)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask_v)
    v_dst = v_pages_ptr + page * stride_vp + offset * stride_vs + offs_h[:, None] * stride_vph + offs_d[None, :]
    tl.store(v_dst, to_page(v, v_inv_scale, FP8_MAX, v_pages_ptr.dtype.element_ty), mask=mask_v)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, loc: torch.Tensor,
                  k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """``apply_rotary(q, k, positions, cos_sin_cache)`` then ``store_kv(k_pages, v_pages, loc, k, v)``,
    in one launch: q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` are rotated in place (strided views of a
    fused qkv output are fine), v ``[T, Hkv, D]``; pool and slot rules as ``store_kv``'s."""
    check_rotary_args(q, k, positions, cos_sin_cache)
    fmax = check_store_args(k_pages, v_pages, loc, k, v, k_scale, v_scale)
    require(positions.device == k_pages.device, lambda: f"positions on {positions.device}, pages on {k_pages.device}")
    t, hq, d = q.shape
    if t == 0:
        return
    hkv, half = k.shape[1], cos_sin_cache.shape[1] // 2
    block_kh, block_d = max(2, next_pow2(hkv)), next_pow2(d)
    _rope_store_kernel[(t,)](
        q, k, v, positions, cos_sin_cache, k_pages, v_pages, loc, 1.0 / k_scale, 1.0 / v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1),
        v_pages.stride(2),
        NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv, HEAD_DIM=d, HALF=half, BLOCK_QH=max(2, next_pow2(hq)),
        BLOCK_KH=block_kh, BLOCK_R=max(2, next_pow2(half)), BLOCK_D=block_d, PAGE_SIZE=k_pages.shape[1],
        FP8_MAX=fmax, num_warps=max(rotary_warps(hq, half), store_warps(block_kh, block_d)),
        enable_fp_fusion=False,  # rotary.py's roundings: no FMA contraction
    )


def rope_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, loc: torch.Tensor,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """The two reference ops, with the same in-place effects."""
    rq, rk = apply_rotary_ref(q, k, positions, cos_sin_cache)
    q.copy_(rq)
    k.copy_(rk)
    store_kv_ref(k_pages, v_pages, loc, k, v, k_scale, v_scale)
