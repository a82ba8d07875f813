"""``--quantization w8a8_int8``: int8 weights, int8 activations, int32 accumulation.

Weights are quantized once, at load, per output channel and symmetric: ``W ~= q_w * s_w[:, None]``
with ``s_w = max|W[n, :]| / 127``. Activations are quantized at run time per token (per row):
``x ~= q_x * s_x[:, None]``. Then ``x W^T ~= (q_x q_w^T) * s_x[:, None] * s_w[None, :]``, where the
integer product is exact (``torch._int_mm``, int32). Every factor of a row's output depends on that
row alone, so a request's output never depends on its batch-mates (a per-tensor activation scale,
as in fbgemm's ``quantize_dynamic``, would make it depend on them).

Why: decode on CPU is bound by reading the weights (int8 halves bf16's bytes and quarters fp32's),
and prefill by GEMM throughput (VNNI int8 runs at about twice bf16's rate on the CI box).
"""

from __future__ import annotations

import torch

from pdserve.models import quant_native

QUANTIZATION_METHODS = ("w8a8_int8",)
INT8_MAX = 127.0
_TINY = 1e-10          # scale of an all-zero row (its codes are all 0 whatever the scale)
_CUDA_MIN_ROWS = 17    # torch._int_mm on CUDA needs more than 16 rows (and K, N multiples of 8)


def check_quantization(method: str | None) -> None:
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization: {method!r} is not one of {', '.join(QUANTIZATION_METHODS)}")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (int8 codes ``[N, K]``, float32 scales ``[N]``), per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_(min=_TINY) / INT8_MAX      # [N]
    codes = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` float -> (int8 codes ``[M, K]``, float32 scales ``[M, 1]``), per row.

    ``|x| * (127 / max|x|)`` never exceeds 127 by more than a rounding, so no clamp is needed."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=_TINY)   # [M, 1] (5x faster than aminmax)
    codes = (x.float() * amax.reciprocal().mul_(INT8_MAX)).round_().to(torch.int8)
    return codes, amax.div_(INT8_MAX)


def int8_matmul(codes: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """int8 ``[M, K]`` x int8 ``[N, K]``^T -> int32 ``[M, N]`` (exact)."""
    m = codes.shape[0]
    if codes.is_cuda and m < _CUDA_MIN_ROWS:  # pad the rows; the padding rows' results are dropped
        padded = codes.new_zeros(_CUDA_MIN_ROWS, codes.shape[1])
        padded[:m] = codes
        return torch._int_mm(padded, qweight.t())[:m]
    return torch._int_mm(codes, qweight.t())


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x [..., K]`` (float) -> ``[..., N]`` ~= ``x @ (qweight * weight_scale)^T + bias``, in
    ``out_dtype`` (default: x's dtype). ``packed``: ``quant_native.pack_weight(qweight)``, for the
    native few-row kernel on CPU. Every path gives the same bits."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    native = x.device.type == "cpu" and quant_native.native() is not None
    if native and packed is not None and rows.shape[0] <= quant_native.GEMV_MAX_ROWS:
        out = quant_native.gemv(rows, packed[0], packed[1], weight_scale)          # [M, N] float32
    elif native:
        codes, x_scale = quant_native.quantize_rows(rows)
        out = quant_native.dequantize(int8_matmul(codes, qweight), x_scale, weight_scale)
    else:
        codes, x_scale = quantize_tokens(rows)
        acc = int8_matmul(codes, qweight)                                # [M, N] int32
        out = acc.to(torch.float32).mul_(weight_scale).mul_(x_scale)     # [M, N] float32
    if bias is not None:
        out.add_(bias)
    return out.to(out_dtype or x.dtype).view(*shape[:-1], qweight.shape[0])


def dequantize_weight(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight the int8 codes stand for (``[N, K]``): the tests' reference."""
    return qweight.float() * weight_scale[:, None]


def check_int8_shape(qweight: torch.Tensor, name: str) -> None:
    """CUDA's int8 GEMM needs K and N multiples of 8; say so at load rather than at the first step."""
    n, k = qweight.shape
    if qweight.is_cuda and (n % 8 or k % 8):
        raise ValueError(f"--quantization w8a8_int8: {name} has shape [{n}, {k}]; int8 GEMMs on CUDA need "
                         f"both sizes to be multiples of 8")
