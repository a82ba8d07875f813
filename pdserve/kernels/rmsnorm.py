"""RMSNorm, plain and fused with the residual add that precedes it in every decoder layer.

Rounding follows Hugging Face's LlamaRMSNorm so outputs match the reference model bit-for-bit
far more often than not: the sum ``x + residual`` is rounded to the activation dtype (it *is* the
new residual), the variance is taken in fp32 of that rounded value, the normalised row is rounded
to the activation dtype and then multiplied by the weight. One program per row; the row lives in
registers (hidden sizes up to 16k), so the fused op reads x, residual, weight once and writes twice.
All arithmetic is fp32 (the Triton interpreter cannot do bf16 arithmetic, and fp32 is what the
GPU does anyway).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, next_pow2, require


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_ro, hidden,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 1, (x.dtype,))
    require(weight.shape[0] == x.shape[1], lambda: f"weight has {weight.shape[0]} entries, hidden size is {x.shape[1]}")
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        check_tensor("residual", residual, 2, (x.dtype,))
        require(residual.shape == x.shape, lambda: f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        tensors["residual"] = residual
    check_same_device(**tensors)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    rows, hidden = x.shape
    if rows == 0:
        return out, res_out
    block = next_pow2(hidden)
    res_in = residual if residual is not None else x
    _rmsnorm_kernel[(rows,)](
        x, res_in, weight, out, res_out, eps,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0), hidden,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=max(1, min(16, block // 512)),
    )
    return out, res_out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``[T, H]``, weight ``[H]`` (same dtype) -> ``[T, H]``."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``(rmsnorm(x + residual), x + residual)``, both ``[T, H]``; inputs are not modified."""
    return _launch(x, residual, weight, eps)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_ref(new_residual, weight, eps), new_residual
