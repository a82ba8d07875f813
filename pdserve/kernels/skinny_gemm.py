"""Skinny GEMM for decode: ``y = x @ w.T`` with few rows (``M <= 16``), bandwidth-bound.

At batch 1 a decode step is ~87% weight GEMMs (Llama-3.1-8B on an H200, scripts/gpu/decode_profile.py)
and cuBLAS reads the smaller weights well below the HBM rate: the 4096x4096 output projection at
1.6 TB/s, QKV at 3.3 (scripts/gpu/gemv_bench.py), because it launches too few programs for 132 SMs.
Here each program owns ``BLOCK_N`` output columns and streams their ``[BLOCK_N, K]`` weight rows
once, with the (padded) activations in registers; ``BLOCK_N`` is chosen so the grid covers the GPU
several times. No split-K: no second pass, no atomics, deterministic.

``skinny_gemm`` is the wrapper (checks, block choice); ``skinny_gemm_ref`` the torch reference.
Whether it beats cuBLAS is a per-shape measurement: ``pdserve.models.layers`` asks ``SkinnySelector``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, dot_precision, require

MAX_M = 16


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)                                                       # [BM, BK]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)                                                       # [BN, BK]
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def pick_block_n(n: int, num_sms: int | None) -> int:
    """The widest power-of-two column block (16..128) that still gives >= 2 programs per SM."""
    target = 2 * (num_sms or 132)
    block = 128
    while block > 16 and triton.cdiv(n, block) < target:
        block //= 2
    return block


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, *, block_n: int | None = None,
                block_k: int = 256, num_warps: int = 4, num_stages: int = 4,
                num_sms: int | None = None) -> torch.Tensor:
    """x ``[M, K]`` (M <= 16), w ``[N, K]`` (a Linear weight) -> ``[M, N]`` in x's dtype."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w", w, 2, (x.dtype,))
    check_same_device(x=x, w=w)
    m, k = x.shape
    n = w.shape[0]
    require(w.shape[1] == k, f"w {tuple(w.shape)} does not match x {tuple(x.shape)}")
    require(1 <= m <= MAX_M, f"skinny_gemm takes 1..{MAX_M} rows, got {m}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    check_tensor("out", out, 2, (x.dtype,))
    require(tuple(out.shape) == (m, n), f"out {tuple(out.shape)} != {(m, n)}")
    block_n = block_n or pick_block_n(n, num_sms)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=MAX_M, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out


def skinny_gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)
