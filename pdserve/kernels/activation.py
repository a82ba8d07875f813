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
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = act * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[T, 2I]`` -> ``[T, I]``."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    require(x.shape[1] % 2 == 0, lambda: f"x last dim {x.shape[1]} must be even (gate | up)")
    rows, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    check_tensor("out", out, 2, (x.dtype,))
    require(out.shape == (rows, inter), lambda: f"out {tuple(out.shape)} must be [{rows}, {inter}]")
    check_same_device(x=x, out=out)
    if rows == 0:
        return out
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, _BLOCK))](x, out, x.stride(0), out.stride(0), inter,
                                                             BLOCK=_BLOCK, num_warps=4)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
