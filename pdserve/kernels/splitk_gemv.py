"""Split-K GEMV for decode: ``y = x @ w.T`` with few rows (``M <= 16``), bandwidth-bound.

At batch 1 a Llama-3.1-8B decode step on an H200 is ~87% weight GEMMs, and cuBLAS reads the
4096x4096 output projection at 1.3-1.9 TB/s and QKV at 2.2-3.3 of the ~4.3 the HBM gives
(scripts/gpu/gemv_bench.py): too few programs for 132 SMs. A kernel without split-K was no better
(commit 07651b5). Here program ``(n_block, k_split)`` streams a ``[BLOCK_N, K / SPLIT_K]`` slice of
the weight once and writes an fp32 partial; a second kernel sums the partials in a fixed order
(deterministic, no atomics) and casts. ``SPLIT_K`` is chosen so the grid gives every SM several
programs. One row (the batch-1 case) multiplies in registers; more rows use ``tl.dot``.

``splitk_gemv`` is the wrapper (checks, tiling); ``splitk_gemv_ref`` the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, dot_precision, require

MAX_M = 16
PROGRAMS_PER_SM = 4


@triton.jit
def _splitk_partial_kernel(x_ptr, w_ptr, part_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
                           stride_ps, stride_pm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_end
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)                                                        # [BN, BK]
        if BLOCK_M == 1:
            x = tl.load(x_ptr + kk, mask=mask_k, other=0.0)                           # [BK]
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)[None, :]
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)                                                    # [BM, BK]
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    out = part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(part_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, stride_ps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: the same bits every run
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvTiling:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def pick_tiling(m: int, n: int, k: int, num_sms: int | None, block_n: int = 64, block_k: int = 256) -> GemvTiling:
    """Split K until the grid gives each SM ``PROGRAMS_PER_SM`` programs (power of two, each
    split at least one ``block_k`` wide)."""
    n_blocks = triton.cdiv(n, block_n)
    target = PROGRAMS_PER_SM * (num_sms or 132)
    split = 1
    while n_blocks * split < target and k // (2 * split) >= block_k:
        split *= 2
    return GemvTiling(block_n, block_k, split)


def splitk_gemv(x: torch.Tensor, w: torch.Tensor, tiling: GemvTiling | None = None,
                num_sms: int | None = None) -> torch.Tensor:
    """x ``[M, K]`` (1 <= M <= 16, rows contiguous), w ``[N, K]`` (a Linear weight) -> ``[M, N]``."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w", w, 2, (x.dtype,))
    check_same_device(x=x, w=w)
    m, k = x.shape
    n = w.shape[0]
    require(w.shape[1] == k, f"w {tuple(w.shape)} does not match x {tuple(x.shape)}")
    require(1 <= m <= MAX_M, f"splitk_gemv takes 1..{MAX_M} rows, got {m}")
    require(m == 1 or x.stride(0) == k, f"x rows must be contiguous, strides {x.stride()}")
    t = tiling or pick_tiling(m, n, k, num_sms)
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    part = torch.empty(t.split_k, m, n, dtype=torch.float32, device=x.device)
    _splitk_partial_kernel[(triton.cdiv(n, t.block_n), t.split_k)](
        x, w, part, m, n, k, k_per_split, x.stride(0), w.stride(0), part.stride(0), part.stride(1),
        BLOCK_M=1 if m == 1 else MAX_M, BLOCK_N=t.block_n, BLOCK_K=t.block_k, PRECISION=dot_precision(x.dtype),
        num_warps=t.num_warps, num_stages=t.num_stages)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](part, y, m * n, SPLIT_K=t.split_k,
                                                          stride_ps=part.stride(0), BLOCK=block)
    return y


def splitk_gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)
