"""Store this step's K/V into the page pool: token ``t`` goes to slot ``loc[t]``.

``slot = page * page_size + offset``; one program per token copies its ``[Hkv, D]`` K and V rows
into ``k_pages[page, offset]`` / ``v_pages[page, offset]`` (any page/slot/head strides, so the
strided per-layer views of the page-major pool are written in place). A negative slot means
"skip": a CUDA-graph runner pads its batch with ``-1`` so padding never touches a real page.

FP8 pages (``--kv-cache-dtype``): each value is stored as ``x * (1 / scale)`` computed in fp32,
clamped to the format's finite range (+-448 for e4m3fn, +-57344 for e5m2: an outlier saturates
instead of becoming inf/nan) and rounded to nearest even, which is ``quantize_kv``'s arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import (FLOAT_DTYPES, FP8_DTYPES, check_same_device, check_tensor, fp8_max,
                                     next_pow2, require)
from pdserve.runtime.kv_pool import quantize_kv


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_pages_ptr, v_pages_ptr, loc_ptr, k_inv_scale, v_inv_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kp, stride_ks, stride_kph, stride_vp, stride_vs, stride_vph,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :] & (slot >= 0)
    src_k = k_ptr + t.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + t.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst_k = k_pages_ptr + page * stride_kp + offset * stride_ks + offs_h[:, None] * stride_kph + offs_d[None, :]
    dst_v = v_pages_ptr + page * stride_vp + offset * stride_vs + offs_h[:, None] * stride_vph + offs_d[None, :]
    tl.store(dst_k, to_page(tl.load(src_k, mask=mask), k_inv_scale, FP8_MAX, k_pages_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v, to_page(tl.load(src_v, mask=mask), v_inv_scale, FP8_MAX, v_pages_ptr.dtype.element_ty), mask=mask)


@triton.jit
def to_page(x, inv_scale, FP8_MAX: tl.constexpr, dtype: tl.constexpr):
    """Values -> the page dtype; fp8 (FP8_MAX > 0): scaled in fp32 and saturated to the finite range."""
    if FP8_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -FP8_MAX), FP8_MAX)
    return x.to(dtype)


def store_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k/v ``[T, Hkv, D]`` -> ``k_pages/v_pages[loc // page_size, loc % page_size]``; loc ``[T]`` int32/int64.

    Slots must lie inside the pool (``loc < num_pages * page_size``); negative slots are skipped.
    fp8 pages store ``clamp(x / scale)``; other page dtypes need scales of 1.0.
    """
    fmax = check_store_args(k_pages, v_pages, loc, k, v, k_scale, v_scale)
    t, hkv, d = k.shape
    if t == 0:
        return
    block_h, block_d = max(2, next_pow2(hkv)), next_pow2(d)  # no size-1 aranges
    _store_kv_kernel[(t,)](
        k, v, k_pages, v_pages, loc, 1.0 / k_scale, 1.0 / v_scale, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1),
        v_pages.stride(2),
        NUM_HEADS=hkv, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=k_pages.shape[1],
        FP8_MAX=fmax, num_warps=store_warps(block_h, block_d),
    )


def check_store_args(k_pages: torch.Tensor, v_pages: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, k_scale: float, v_scale: float) -> float:
    """Checks ``store_kv``'s arguments; -> the fp8 clamp of the page dtype (0.0: not fp8)."""
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("v", v, 3, FLOAT_DTYPES)
    check_tensor("k_pages", k_pages, 4, FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("v_pages", v_pages, 4, (k_pages.dtype,))
    check_tensor("loc", loc, 1, (torch.int32, torch.int64))
    check_same_device(k=k, v=v, k_pages=k_pages, v_pages=v_pages, loc=loc)
    t, hkv, d = k.shape
    require(v.shape == k.shape, lambda: f"v {tuple(v.shape)} != k {tuple(k.shape)}")
    require(k_pages.shape == v_pages.shape and k_pages.shape[2:] == (hkv, d),
            lambda: f"k_pages {tuple(k_pages.shape)} / v_pages {tuple(v_pages.shape)} "
                    f"must be [pages, page_size, {hkv}, {d}]")
    require(loc.shape[0] == t, lambda: f"loc has {loc.shape[0]} slots for {t} tokens")
    fmax = fp8_max(k_pages.dtype)
    require(k_scale > 0 and v_scale > 0 and (fmax > 0 or k_scale == v_scale == 1.0),
            lambda: f"k_scale {k_scale} / v_scale {v_scale}: positive, and 1.0 unless the pages are fp8 "
                    f"({k_pages.dtype})")
    return fmax


def store_warps(block_h: int, block_d: int) -> int:
    return max(1, min(8, block_h * block_d // 256))


def store_kv_ref(k_pages: torch.Tensor, v_pages: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    keep = loc >= 0
    loc = loc[keep].long()
    page_size = k_pages.shape[1]
    k_pages[loc // page_size, loc % page_size] = quantize_kv(k[keep], k_pages.dtype, k_scale)
    v_pages[loc // page_size, loc % page_size] = quantize_kv(v[keep], v_pages.dtype, v_scale)
