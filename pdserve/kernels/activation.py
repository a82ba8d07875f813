"""SiLU-and-mul, the SwiGLU gate of Llama/Qwen MLPs: ``[T, 2I]`` (gate | up) -> ``silu(gate) * up``.

The gate/up projection is one fused matmul, so its output is read once here and ``[T, I]`` is
written once. Math in fp32, rounded as Hugging Face's two ops are (``silu(gate)`` to the
activation dtype, then the product): see rotary.py for why we follow the reference's roundings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, require

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, gu_block, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate_at = (offs // gu_block) * 2 * gu_block + offs % gu_block  # blocks of gate, then up, columns
    gate = tl.load(x_ptr + row * stride_x + gate_at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + gate_at + gu_block, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = act * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """x ``[T, 2I]`` -> ``[T, I]``; gate and up columns in blocks of ``block`` each (gate block,
    then its up block: ``MergedColumnParallelLinear``'s layout), or as halves (``None``)."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    require(x.shape[1] % 2 == 0, lambda: f"x last dim {x.shape[1]} must be even (gate | up)")
    rows, inter = x.shape[0], x.shape[1] // 2
    block = block or inter
    require(inter % block == 0, lambda: f"block {block} does not divide the {inter} gate columns")
    if out is None:
        out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    check_tensor("out", out, 2, (x.dtype,))
    require(out.shape == (rows, inter), lambda: f"out {tuple(out.shape)} must be [{rows}, {inter}]")
    check_same_device(x=x, out=out)
    if rows == 0:
        return out
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, _BLOCK))](x, out, x.stride(0), out.stride(0), inter, block,
                                                             BLOCK=_BLOCK, num_warps=4)
    return out


def silu_and_mul_ref(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    t, inter = x.shape[0], x.shape[1] // 2
    blocks = x.view(t, inter // (block or inter), 2, block or inter)
    gate, up = blocks[:, :, 0].reshape(t, inter), blocks[:, :, 1].reshape(t, inter)
    return torch.nn.functional.silu(gate) * up
