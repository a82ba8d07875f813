"""Rotary position embedding, neox style (Llama, Qwen, Mistral): the two halves of the rotated dims.

For each head, with ``x1 = x[:R/2]``, ``x2 = x[R/2:R]`` (R = rotary dim <= head_dim; dims past R
are left alone): ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin``, cos/sin of
``position * inv_freq``. The cache is ``[max_positions, R]`` = ``cat(cos, sin)`` per position (the
vLLM/SGLang layout), built once by ``build_cos_sin_cache`` from any ``inv_freq`` (so Llama-3 or
YaRN scaling stays in the model code). One program per token rotates all its q and k heads in
place.

Rounding follows Hugging Face's ``apply_rotary_pos_emb`` (and vLLM's kernel): cos/sin are rounded to
the activation dtype, and ``x1 * cos``, ``x2 * sin`` and their sum are each rounded to it, as
three 16-bit tensor ops would be. Each step is computed in fp32 from 16-bit inputs, where a
product is exact, so the result is the 16-bit ops' result bit for bit (the kernels are compiled
with ``enable_fp_fusion=False``: an FMA would skip the rounding of a product, which the H200 showed
as one-ulp differences); with fp32 activations every rounding is a no-op. One rounding at the end would be a little more accurate, but it
moves about a third of the rotated values by one bf16 step against the reference model, and
those steps compound over layers into different greedy tokens (the GPU parity check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, next_pow2, require


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, offs_h, offs_r, mask, HALF: tl.constexpr):
    """Rotate ``[BLOCK_H, HALF]`` pairs of one token's heads in place."""
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_r[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    r1, r2 = rotate_pair(x1, x2, cos, sin, x_ptr.dtype.element_ty)
    tl.store(p1, r1, mask=mask)
    tl.store(p1 + HALF, r2, mask=mask)


@triton.jit
def rotate_token_q(q_ptr, pos_ptr, cache_ptr, t, stride_qt, stride_qh, stride_cache, NUM_Q_HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_R: tl.constexpr):
    """Token ``t``: its cos/sin ``[1, BLOCK_R]`` from the cache, its q heads rotated in place;
    -> (cos, sin, offs_r, mask_r) for its k heads."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    offs_qh = tl.arange(0, BLOCK_QH)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, offs_qh,
                  offs_r, (offs_qh < NUM_Q_HEADS)[:, None] & mask_r[None, :], HALF)
    return cos, sin, offs_r, mask_r


@triton.jit
def _round(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def rotate_pair(x1, x2, cos, sin, dtype: tl.constexpr):
    """fp32 halves (values of ``dtype``) -> the rotated halves in ``dtype``, rounded as HF's ops."""
    c, s = _round(cos, dtype), _round(sin, dtype)
    r1 = _round(x1 * c, dtype) - _round(x2 * s, dtype)
    r2 = _round(x2 * c, dtype) + _round(x1 * s, dtype)
    return r1.to(dtype), r2.to(dtype)


@triton.jit
def rotate_rows(x, partner, cos, sin, offs_d, HALF: tl.constexpr, dtype: tl.constexpr):
    """Whole rows ``[R, BLOCK_D]`` (fp32 holding ``dtype`` values) and their rotate-half partners
    (``x[d + HALF]`` below HALF, ``x[d - HALF]`` above) -> the rotated rows, rounded op by op as
    ``rotate_pair``; dims from ``2 * HALF`` on (partial rotary) pass through. ``cos``/``sin``
    ``[1, BLOCK_D]`` hold the cache's entry ``d % HALF`` at dim d."""
    a = _round(x * _round(cos, dtype), dtype)
    b = _round(partner * _round(sin, dtype), dtype)
    rot = _round(tl.where((offs_d < HALF)[None, :], a - b, a + b), dtype)
    return tl.where((offs_d < 2 * HALF)[None, :], rot, x)


@triton.jit
def load_rotated_rows(rows_ptr, offs_d, mask_rows, pos, cache_ptr, stride_cache, HEAD_DIM: tl.constexpr,
                      HALF: tl.constexpr, dtype: tl.constexpr):
    """Rows at ``rows_ptr`` ``[R, 1]`` (pointers to each row's first dim) of a token at position
    ``pos``, rotated -> ``[R, BLOCK_D]`` fp32 holding ``dtype`` values (``rotate_rows``)."""
    mask = mask_rows[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(rows_ptr + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    rotated = offs_d < 2 * HALF
    partner_d = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    partner = tl.load(rows_ptr + partner_d[None, :], mask=mask & rotated[None, :], other=0.0).to(tl.float32)
    cs = cache_ptr + pos * stride_cache + offs_d % HALF
    cos = tl.load(cs, mask=rotated, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF, mask=rotated, other=0.0).to(tl.float32)[None, :]
    return rotate_rows(x, partner, cos, sin, offs_d, HALF, dtype)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs_r, mask_r = rotate_token_q(q_ptr, pos_ptr, cache_ptr, t, stride_qt, stride_qh, stride_cache,
                                              NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_R)
    offs_kh = tl.arange(0, BLOCK_KH)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, offs_kh,
                  offs_r, (offs_kh < NUM_K_HEADS)[:, None] & mask_r[None, :], HALF)


def rope_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """Plain RoPE frequencies ``[rotary_dim // 2]`` fp32 (``base ** (-2i / rotary_dim)``)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)).float()


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """-> ``[max_positions, 2 * len(inv_freq)]`` fp32: ``cat(cos, sin)`` of ``pos * inv_freq``."""
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float().cpu()[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


def check_rotary_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k", k, 3, (q.dtype,))
    check_tensor("positions", positions, 1, (torch.int32, torch.int64))
    check_tensor("cos_sin_cache", cos_sin_cache, 2, FLOAT_DTYPES)
    check_same_device(q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    t, _, d = q.shape
    rot = cos_sin_cache.shape[1]
    require(k.shape[0] == t and k.shape[2] == d, lambda: f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    require(positions.shape[0] == t, lambda: f"positions has {positions.shape[0]} entries for {t} tokens")
    require(rot % 2 == 0 and 0 < rot <= d, lambda: f"rotary dim {rot} must be even and <= head_dim {d}")


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` **in place**; positions ``[T]`` int; returns (q, k).

    q/k may be strided views (e.g. slices of a fused qkv output); only the last dim must be dense.
    """
    check_rotary_args(q, k, positions, cos_sin_cache)
    t, hq, _ = q.shape
    if t == 0:
        return q, k
    half = cos_sin_cache.shape[1] // 2
    _rotary_kernel[(t,)](
        q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=hq, NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_QH=max(2, next_pow2(hq)), BLOCK_KH=max(2, next_pow2(k.shape[1])), BLOCK_R=max(2, next_pow2(half)),
        num_warps=rotary_warps(hq, half), enable_fp_fusion=False,  # keep HF's roundings: no FMA
    )
    return q, k


def rotary_warps(num_q_heads: int, half: int) -> int:
    return 4 if num_q_heads * half >= 1024 else 1


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place, as HF computes it: cos/sin in x's dtype, every op rounded to x's dtype."""
    half = cos_sin_cache.shape[1] // 2
    cos = cos_sin_cache[positions.long(), :half][:, None, :]  # [T, 1, R/2]
    sin = cos_sin_cache[positions.long(), half:][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:2 * half]
        out[..., :half] = x1 * c - x2 * s
        out[..., half:2 * half] = x2 * c + x1 * s
        return out

    return rotate(q), rotate(k)
