"""Fused batch-1 decode GEMV: ``y = x @ w.T`` with the small kernels around it folded in.

At batch 1 a Llama-3.1-8B step on an H200 is ~87% weight GEMMs, and between them each layer ran
three small kernels (add + RMSNorm twice, SiLU-and-mul), each a launch, a ramp-up and a tail. Here
they ride on the GEMVs that read their output anyway, four kernels per layer's GEMMs instead of
seven (docs/kernels.md, "Fused batch-1 GEMV"):

- ``norm_weight``: ``x`` is the residual stream; the program multiplies by the norm weight on
  the fly, sums the squares of the row as it streams (every program sees the whole row), and
  applies 1/RMS to the finished sums (before QKV, and before gate/up);
- ``silu_out``: ``w`` is the merged gate/up weight as ``MergedColumnParallelLinear`` stores it, in
  blocks of ``gate_up_block`` gate rows followed by their up rows, so each program streams one
  contiguous tile holding both and writes ``silu(gate) * up``, rounded as transformers' modules
  round (gate and up as two separate streams: 59.7 against 56.0 us on the H200);
- ``residual``: the product, rounded to the activation dtype, is added into the residual stream
  in place (after the O and down projections), as transformers' ``residual + hidden_states``.

Each program owns ``BLOCK_N`` weight rows and streams their ``[BLOCK_N, K]`` tile once,
multiplying in fp32 registers (no split-K: the residual add needs the finished sum, and no second
pass runs). Numerics: one difference from the unfused path beyond the summation order: the
normalised row is not rounded to the activation dtype before the GEMM (1/RMS scales the fp32 sums
instead), so it is slightly closer to the fp32 result.

On the H200 (``scripts/gpu/gemv_bench.py --fused``) the plain GEMV matches or beats cuBLAS on every
Llama-3.1-8B shape at batch 1, and a layer's chain takes 110.5 us against 121.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, require


@dataclass(frozen=True)
class GemvConfig:
    block_n: int   # weight rows per program
    block_k: int   # weight tile width per step
    num_warps: int
    num_stages: int


@triton.jit
def _gemv_kernel(x_ptr, g_ptr, w_ptr, b_ptr, y_ptr, N, K, eps, stride_wn,
                 NORM: tl.constexpr, BIAS: tl.constexpr, SILU_OUT: tl.constexpr, RESIDUAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GU_BLOCK: tl.constexpr):
    out_ty = y_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    one = tl.arange(0, 1)  # x as a [1, BLOCK_K] row: the weight tile's layout, no conversion per step
    if RESIDUAL:  # issued first: its latency hides behind the weight stream
        res = tl.load(y_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    ss = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        x = tl.load(x_ptr + one[:, None] + kk[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        if NORM:  # x * g now, the row's 1/RMS on the finished sums
            ss += x * x
            x = x * tl.load(g_ptr + one[:, None] + kk[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        mask = mask_n[:, None] & mask_k[None, :]
        acc += tl.load(w_rows + kk[None, :], mask=mask, other=0.0).to(tl.float32) * x
    y = tl.sum(acc, 1)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(ss, 1), 0) / K + eps)
        y = y * rstd
    if BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SILU_OUT:  # rows come as blocks of GU_BLOCK gate rows then the same GU_BLOCK up rows
        _store_gate_up_blocks(y, y_ptr, N // 2, BLOCK_N, GU_BLOCK)
    else:
        y = y.to(x_ptr.dtype.element_ty)  # the activation dtype's rounding, whatever out holds
        if RESIDUAL:  # residual += y, rounded as transformers' ``residual + hidden_states``
            y = (res + y.to(tl.float32)).to(out_ty)
        tl.store(y_ptr + offs_n, y, mask=mask_n)


@triton.jit
def _store_gate_up_blocks(y, y_ptr, n_out, BLOCK_N: tl.constexpr, GU_BLOCK: tl.constexpr):
    """``y`` [BLOCK_N] fp32 sums over (gate block, up block) pairs -> silu(gate) * up at their
    columns, rounded as the unfused GEMM output, transformers' ``silu(gate)``, then the product."""
    out_ty = y_ptr.dtype.element_ty
    pairs: tl.constexpr = BLOCK_N // (2 * GU_BLOCK)
    y3 = tl.reshape(y, (pairs, 2, GU_BLOCK))
    half = tl.arange(0, 2)[None, :, None]
    gate = tl.sum(tl.where(half == 0, y3, 0.0), 1).to(out_ty).to(tl.float32)  # [pairs, GU_BLOCK]
    up = tl.sum(tl.where(half == 1, y3, 0.0), 1).to(out_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    cols = (tl.program_id(0) * pairs + tl.arange(0, pairs))[:, None] * GU_BLOCK + tl.arange(0, GU_BLOCK)[None, :]
    tl.store(y_ptr + cols, (act * up).to(out_ty), mask=cols < n_out)


def fused_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu_out: bool = False,
               residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
               config: GemvConfig | None = None, gate_up_block: int = 8) -> torch.Tensor:
    """One row: ``x [1, K]``, ``w [N, K]`` (+ ``bias [N]``) -> ``[1, N]`` (``[1, N / 2]`` with ``silu_out``).

    ``norm_weight [K]``: RMSNorm of x, its 1/RMS applied to the finished sums. ``silu_out``: w is a
    merged gate/up weight in blocks of ``gate_up_block`` gate rows, then their up rows
    (``MergedColumnParallelLinear``); the output is ``silu(gate) * up``. ``residual [1, N]``: the
    product is added into it in place, and it is returned. A float32 ``out`` (plain or norm form)
    takes the product rounded to x's dtype, widened: the LM head's logits without a cast kernel."""
    n, k = w.shape
    n_out = n // 2 if silu_out else n
    out = _check_gemv_args(x, w, bias, norm_weight, silu_out, residual, out)
    cfg = config or pick_config(n_out, k, silu_out)
    require(not silu_out or (gate_up_block >= 1 and n_out % gate_up_block == 0
                             and cfg.block_n % (2 * gate_up_block) == 0),
            lambda: f"gate_up_block {gate_up_block} must divide {n_out} and half of block_n {cfg.block_n}")
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, norm_weight if norm_weight is not None else x, w, bias if bias is not None else x, out, n, k, eps,
        w.stride(0), NORM=norm_weight is not None, BIAS=bias is not None, SILU_OUT=silu_out,
        RESIDUAL=residual is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GU_BLOCK=gate_up_block,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _check_gemv_args(x, w, bias, norm_weight, silu_out: bool, residual, out) -> torch.Tensor:
    """Shapes, dtypes, devices; -> the output tensor (``residual``, ``out`` or a new one)."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w", w, 2, (x.dtype,))
    n, k = w.shape
    require(x.shape == (1, k), lambda: f"fused_gemv takes one row x [1, {k}] for w {tuple(w.shape)}, "
            f"got {tuple(x.shape)}")
    require(not silu_out or n % 2 == 0, lambda: f"silu_out: w has {n} rows, not gate | up halves")
    require(bias is None or not silu_out, "fused_gemv: bias with silu_out is not supported")
    n_out = n // 2 if silu_out else n
    tensors = {"x": x, "w": w}
    for name, t, size in (("norm_weight", norm_weight, k), ("bias", bias, n)):
        if t is not None:
            check_tensor(name, t, 1, (x.dtype,))
            require(t.shape[0] == size, lambda: f"{name} has {t.shape[0]} entries, expected {size}")
            tensors[name] = t
    if residual is not None:
        require(out is None, "fused_gemv: residual is the output; pass one of residual and out")
        out = residual
    elif out is None:
        out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    out_dtypes = (x.dtype,) if residual is not None or silu_out else (x.dtype, torch.float32)
    check_tensor("residual" if residual is not None else "out", out, 2, out_dtypes)
    require(tuple(out.shape) == (1, n_out), lambda: f"output {tuple(out.shape)} != {(1, n_out)}")
    check_same_device(out=out, **tensors)
    return out


def pick_config(n: int, k: int, silu_out: bool) -> GemvConfig:
    """Tiling by shape, from the H200 sweep (``scripts/gpu/gemv_bench.py --fused``, Llama-3.1-8B):
    narrow column blocks for narrow outputs (4096: 512 programs), 16 for QKV-sized ones, 256-wide K
    steps for the vocabulary, 16 rows (a gate block and its up block) for gate/up (``silu_out``)."""
    if silu_out:
        return GemvConfig(16, 256, 4, 2)
    if n <= 8192:
        return GemvConfig(8 if n <= 4096 else 16, 512, 4, 3)
    return GemvConfig(16, 256, 4, 3)


def fused_gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                   norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu_out: bool = False,
                   residual: torch.Tensor | None = None, gate_up_block: int = 8) -> torch.Tensor:
    """The unfused ops, rounded as transformers' modules; returns a new tensor (residual untouched)."""
    from pdserve.kernels.activation import silu_and_mul_ref
    from pdserve.kernels.rmsnorm import rmsnorm_ref

    if norm_weight is not None:
        x = rmsnorm_ref(x, norm_weight, eps)
    y = (x.float() @ w.float().T + (0 if bias is None else bias.float())).to(x.dtype)
    if silu_out:  # transformers' modules: silu(gate) rounded, then the product
        y = silu_and_mul_ref(y, gate_up_block)
    return y if residual is None else (residual.float() + y.float()).to(x.dtype)
