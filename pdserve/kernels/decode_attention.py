"""Paged decode attention: one new query per sequence over its whole context in the page pool.

Split-K ("flash-decoding"): each sequence's context is cut into ``num_kv_splits`` equal pieces
(rounded up to whole key blocks); program ``(seq, kv_head, split)`` attends the whole GQA group of
q heads that share ``kv_head`` over its piece, so every K/V byte is read from HBM exactly once,
and writes a partial output plus its log-sum-exp; a second kernel merges the splits. With one
split (large batches) the program normalises straight into the output: one launch, no partials.
An in-kernel merge of several splits (atomic counter per (seq, kv head), the last program merges)
was built and measured on an H200 (Llama-3.1-8B heads, 2k context, us/layer in a CUDA graph,
in-kernel vs second kernel): batch 1 13.5 vs 9.1, batch 8 29.5 vs 24.3, batch 64 134.0 vs 132.2;
the barrier, the atomic and the serial merge cost more than a launch, so it was removed.
With ``rope=DecodeRope(...)`` the step's rotary and K/V store happen here too (``rope_store_kv``'s
work, one launch per layer fewer): each program rotates its q heads as it loads them, and the one
whose split holds the new token rotates and stores that token's key and value before reading its
pages (a CTA barrier between; no other program reads that slot). H200, batch 1: 9.6 us per layer
against 12.3 for ``rope_store_kv`` + this kernel.
The grid depends only on the batch size, never on the context lengths, so a CUDA graph captured
for a batch size replays for any lengths; a sequence of length 0 yields zeros (graph padding).

Pool views: ``k_pages``/``v_pages`` are ``KVPool.k(layer)``/``v(layer)``:
``[num_pages, page_size, num_kv_heads, head_dim]`` with any page/slot/head strides.

FP8 pages: ``k_scale`` is folded into the logit scale and ``v_scale`` into each split's output
(softmax weights sum to 1, so ``sum p * (v * s) = s * sum p * v``): no multiply per element.
With fp32 queries K/V blocks are upcast to fp32. With 16-bit queries both products run in
fp16 (``F16_DOT``): fp8 -> fp16 is exact and one ``cvt`` per two values, while fp8 -> bf16 goes
through fp16 and fp32 (three), which made the kernel conversion-bound, slower than bf16 pages
at batch 64 on an H200. q is pre-multiplied by the logit scale (fp32) and rounded to fp16 (11
mantissa bits, finer than bf16's 8), clamped to fp16's range; the softmax weights p in [0, 1]
also round to fp16. Accumulation stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import (FLOAT_DTYPES, FP8_DTYPES, INTERPRET, check_same_device, check_tensor,
                                     dot_precision, kv_page_dtypes, next_pow2, require)
from pdserve.kernels.attention_common import LOG2E, attend_block, load_paged
from pdserve.kernels.kv_store import check_store_args, to_page
from pdserve.kernels.rotary import check_rotary_args, load_rotated_rows


@triton.jit
def _split_range(seq_lens_ptr, b, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(context length, first key, end) of split ``split`` of sequence ``b``: equal pieces rounded
    up to whole key blocks; end <= first for an empty split."""
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS
    split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * split_len
    return seq_len, start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _attend_split(
    q, k_ptr, v_ptr, page_table_ptr, b, kv_head, start, end, qk_scale, v_scale,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_ptb,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, F16_DOT: tl.constexpr,
):
    """Keys ``[start, end)`` of sequence ``b`` for the q heads ``q [BLOCK_H, BLOCK_D]`` of ``kv_head``
    -> (output ``[BLOCK_H, BLOCK_D]`` fp32, normalised and times v_scale; base-2 LSE ``[BLOCK_H]``,
    -inf with no keys)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    logit_scale = qk_scale
    if F16_DOT:  # fp8 pages: fp16 products, the logit scale applied to q once
        q = tl.minimum(tl.maximum(q.to(tl.float32) * qk_scale, -65504.0), 65504.0).to(tl.float16)
        logit_scale = 1.0

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, tl.float32)
    pt_row = page_table_ptr + b * stride_ptb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page_ids = tl.load(pt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = load_paged(k_ptr, page_ids, offs_n, offs_d, mask_nd, stride_kp, stride_ks, kv_head * stride_kh, PAGE_SIZE)
        v = load_paged(v_ptr, page_ids, offs_n, offs_d, mask_nd, stride_vp, stride_vs, kv_head * stride_vh, PAGE_SIZE)
        k, v = k.to(q.dtype), v.to(q.dtype)  # fp8 pages: upcast (no-op otherwise); scales applied outside
        m_i, l_i, acc = attend_block(q, k, v, mask_n[None, :], m_i, l_i, acc, logit_scale, True, PRECISION)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # base-2 log-sum-exp
    return acc * (v_scale / l_safe)[:, None], lse  # v_scale: dequantizes fp8 V (1.0 otherwise)


@triton.jit
def _store_partial(mid_o_ptr, mid_lse_ptr, out, lse, b, kv_head, split, stride_mob, stride_moh, stride_mos,
                   stride_mlb, stride_mlh, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    mo = mid_o_ptr + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(mo, out.to(mid_o_ptr.dtype.element_ty), mask=mask_h[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(mid_lse_ptr + b * stride_mlb + heads * stride_mlh + split, lse, mask=mask_h)


@triton.jit
def _store_out(out_ptr, out, b, kv_head, stride_ob, stride_oh, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_h < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _merge_head(mid_o_ptr, mid_lse_ptr, out_ptr, b, head, stride_mob, stride_moh, stride_mos, stride_mlb,
                stride_mlh, stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """All splits of one q head -> ``out[b, head]``: base-2 LSE weights, zeros when no keys."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(mid_lse_ptr + b * stride_mlb + head * stride_mlh + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no keys at all: weights 0, output 0
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]
    mo = mid_o_ptr + b * stride_mob + head * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :]
    o = tl.load(mo, mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _store_new_kv(k_new_ptr, v_new_ptr, k_ptr, v_ptr, loc_ptr, cache_ptr, b, kv_head, pos, offs_d,
                  k_inv_scale, v_inv_scale, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cache,
                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAGE_SIZE: tl.constexpr, FP8_MAX: tl.constexpr):
    """The step's token of sequence ``b``: its ``kv_head`` key rotated, key and value written into
    slot ``loc[b]`` (skipped when negative), as ``rope_store_kv`` writes them."""
    slot = tl.load(loc_ptr + b).to(tl.int64)
    page, offset = slot // PAGE_SIZE, slot % PAGE_SIZE
    one = tl.arange(0, 1)
    row = (one >= 0) & (slot >= 0)
    k = load_rotated_rows(k_new_ptr + b * stride_knb + kv_head * stride_knh + one[:, None], offs_d, row, pos,
                          cache_ptr, stride_cache, HEAD_DIM, HALF, k_new_ptr.dtype.element_ty)
    mask = row[:, None] & (offs_d < HEAD_DIM)[None, :]
    v = tl.load(v_new_ptr + b * stride_vnb + kv_head * stride_vnh + one[:, None] + offs_d[None, :], mask=mask)
    k_dst = k_ptr + page * stride_kp + offset * stride_ks + kv_head * stride_kh + one[:, None] + offs_d[None, :]
    v_dst = v_ptr + page * stride_vp + offset * stride_vs + kv_head * stride_vh + one[:, None] + offs_d[None, :]
    tl.store(k_dst, to_page(k, k_inv_scale, FP8_MAX, k_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, to_page(v, v_inv_scale, FP8_MAX, v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, page_table_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, qk_scale, v_scale,
    k_new_ptr, v_new_ptr, pos_ptr, cache_ptr, loc_ptr, k_inv_scale, v_inv_scale,
    stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_ptb, stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cache,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    F16_DOT: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """Program (seq, kv head, split) writes its partial for _decode_reduce_kernel, or with one split
    the normalised output itself. ``ROPE``: q arrives unrotated and the step's key/value are not in
    the pool yet; the program rotates its q heads, and the one whose split holds the new token
    rotates its key and stores it and the value first (``rope_store_kv``'s work, no launch of its own)."""
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len, start, end = _split_range(seq_lens_ptr, b, split, NUM_SPLITS, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + b * stride_qb + (kv_head * GROUP + offs_h)[:, None] * stride_qh  # [BLOCK_H, 1]
    if ROPE:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        q = load_rotated_rows(q_rows, offs_d, offs_h < GROUP, pos, cache_ptr, stride_cache, HEAD_DIM, HALF,
                              q_ptr.dtype.element_ty).to(q_ptr.dtype.element_ty)
        if (seq_len - 1 >= start) & (seq_len - 1 < end):  # this split reads the new token: store it first
            _store_new_kv(k_new_ptr, v_new_ptr, k_ptr, v_ptr, loc_ptr, cache_ptr, b, kv_head, pos, offs_d,
                          k_inv_scale, v_inv_scale, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cache,
                          stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                          HEAD_DIM, HALF, PAGE_SIZE, FP8_MAX)
            tl.debug_barrier()  # the whole program sees the stored token before reading its pages
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=(offs_h < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :],
                    other=0.0)  # [BLOCK_H, BLOCK_D]
    out, lse = _attend_split(
        q, k_ptr, v_ptr, page_table_ptr, b, kv_head, start, end, qk_scale, v_scale,
        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_ptb,
        BLOCK_H, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, PRECISION, F16_DOT)
    if NUM_SPLITS == 1:
        _store_out(out_ptr, out, b, kv_head, stride_ob, stride_oh, GROUP, BLOCK_H, HEAD_DIM, BLOCK_D)
    else:
        _store_partial(mid_o_ptr, mid_lse_ptr, out, lse, b, kv_head, split, stride_mob, stride_moh, stride_mos,
                       stride_mlb, stride_mlh, GROUP, BLOCK_H, HEAD_DIM, BLOCK_D)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    _merge_head(mid_o_ptr, mid_lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), stride_mob, stride_moh,
                stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh, HEAD_DIM, BLOCK_D, NUM_SPLITS, BLOCK_S)


@dataclass
class DecodeWorkspace:
    """Split partials, sized for up to ``max_batch_size`` sequences; reused across steps/graphs."""
    mid_o: torch.Tensor    # [max_batch_size, num_q_heads, num_kv_splits, head_dim]
    mid_lse: torch.Tensor  # [max_batch_size, num_q_heads, num_kv_splits] fp32, base-2

    @classmethod
    def allocate(cls, max_batch_size: int, num_q_heads: int, head_dim: int, num_kv_splits: int,
                 dtype: torch.dtype, device: torch.device | str, reduce_in_fp32: bool = False) -> "DecodeWorkspace":
        mid_dtype = torch.float32 if reduce_in_fp32 else dtype
        return cls(
            mid_o=torch.empty(max_batch_size, num_q_heads, num_kv_splits, head_dim, dtype=mid_dtype, device=device),
            mid_lse=torch.empty(max_batch_size, num_q_heads, num_kv_splits, dtype=torch.float32, device=device),
        )

    def fits(self, batch_size: int, num_q_heads: int, head_dim: int, num_kv_splits: int,
             mid_dtype: torch.dtype) -> bool:
        cap_b, hq, splits, d = self.mid_o.shape  # a workspace for more splits serves fewer (strided)
        return (batch_size <= cap_b and (hq, d) == (num_q_heads, head_dim) and splits >= num_kv_splits
                and self.mid_o.dtype == mid_dtype)


def _check_decode_args(q, k_pages, v_pages, page_table, seq_lens) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k_pages", k_pages, 4, kv_page_dtypes(q.dtype))
    check_tensor("v_pages", v_pages, 4, (k_pages.dtype,))
    check_tensor("page_table", page_table, 2, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_same_device(q=q, k_pages=k_pages, v_pages=v_pages, page_table=page_table, seq_lens=seq_lens)
    b, hq, d = q.shape
    require(k_pages.shape == v_pages.shape, lambda: f"k_pages {tuple(k_pages.shape)} != v_pages {tuple(v_pages.shape)}")
    hkv = k_pages.shape[2]
    require(k_pages.shape[3] == d, lambda: f"head_dim: q has {d}, k_pages has {k_pages.shape[3]}")
    require(hq % hkv == 0, lambda: f"q heads {hq} not a multiple of kv heads {hkv}")
    require(page_table.shape[0] >= b and seq_lens.shape[0] >= b,
            lambda: f"batch {b}: page_table rows {page_table.shape[0]}, seq_lens {seq_lens.shape[0]}")
    require(d >= 16, lambda: f"head_dim {d} < 16 is not supported (tl.dot minimum)")


@dataclass(frozen=True)
class DecodeRope:
    """The step's token not yet rotated nor stored: ``decode_attention`` does ``rope_store_kv``'s
    work in its split kernel. k/v ``[B, Hkv, D]`` (strided views of the qkv output are fine),
    positions ``[B]``, the cos/sin cache, and ``loc [B]`` the slots to write (-1: skip)."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    loc: torch.Tensor


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, *, k_scale: float = 1.0, v_scale: float = 1.0,
                     num_kv_splits: int = 8, reduce_in_fp32: bool = False, out: torch.Tensor | None = None,
                     workspace: DecodeWorkspace | None = None, rope: DecodeRope | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """q ``[B, Hq, D]`` -> ``[B, Hq, D]``: attention over ``seq_lens[b]`` tokens of ``page_table[b]``.

    page_table ``[>=B, W]`` int32 (page ids, row b covers ceil(seq_lens[b] / page_size) pages);
    seq_lens ``[>=B]`` int32 (context length including the new token, already stored; with
    ``rope``, stored by this call, and q not rotated yet: q itself is left as it is).
    Pages in q's dtype, or fp8 holding ``K / k_scale`` and ``V / v_scale``.
    """
    _check_decode_args(q, k_pages, v_pages, page_table, seq_lens)
    fp8_max = 0.0
    if rope is not None:
        check_rotary_args(q, rope.k, rope.positions, rope.cos_sin_cache)
        fp8_max = check_store_args(k_pages, v_pages, rope.loc, rope.k, rope.v, k_scale, v_scale)
    require(num_kv_splits >= 1, lambda: f"num_kv_splits must be >= 1, got {num_kv_splits}")
    require(k_scale > 0 and v_scale > 0, lambda: f"k_scale {k_scale} / v_scale {v_scale} must be positive")
    b, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, 3, (q.dtype,))
    require(out.shape == q.shape, lambda: f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    mid_dtype = torch.float32 if reduce_in_fp32 else q.dtype
    if workspace is None or not workspace.fits(b, hq, d, num_kv_splits, mid_dtype):
        workspace = DecodeWorkspace.allocate(b, hq, d, num_kv_splits, q.dtype, q.device, reduce_in_fp32)
    if b == 0:
        return out
    block_n = block_n or 64  # 4 pages of 16 per iteration: 32 KiB of K+V in flight per program (bf16, D=128)
    require(INTERPRET or block_n >= 16, lambda: f"block_n {block_n} < 16 (tl.dot minimum on GPU)")
    _launch(q, k_pages, v_pages, page_table, seq_lens, scale * k_scale * LOG2E, v_scale, out, workspace,
            num_kv_splits, block_n, num_warps or 4, num_stages or 2, rope, (1.0 / k_scale, 1.0 / v_scale, fp8_max))
    return out


def _launch(q, k_pages, v_pages, page_table, seq_lens, qk_scale: float, v_scale: float, out, ws: DecodeWorkspace,
            num_kv_splits: int, block_n: int, num_warps: int, num_stages: int, rope: DecodeRope | None,
            store: tuple[float, float, float]) -> None:
    """The split kernel, then (several splits) the reduce kernel."""
    (b, hq, d), hkv = q.shape, k_pages.shape[2]
    mid_o, mid_lse = ws.mid_o, ws.mid_lse
    group = hq // hkv
    r = rope or DecodeRope(q, q, seq_lens, q[0], seq_lens)  # placeholders, never read without ROPE
    _decode_split_kernel[(b, hkv, num_kv_splits)](
        q, k_pages, v_pages, page_table, seq_lens, mid_o, mid_lse, out, qk_scale, v_scale,
        r.k, r.v, r.positions, r.cos_sin_cache, r.loc, store[0], store[1],
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), page_table.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), r.k.stride(0), r.k.stride(1), r.v.stride(0), r.v.stride(1),
        r.cos_sin_cache.stride(0),
        GROUP=group, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=d, BLOCK_D=next_pow2(d), PAGE_SIZE=k_pages.shape[1],
        BLOCK_N=block_n, NUM_SPLITS=num_kv_splits, PRECISION=dot_precision(q.dtype),
        F16_DOT=k_pages.dtype in FP8_DTYPES and q.dtype != torch.float32, ROPE=rope is not None,
        HALF=r.cos_sin_cache.shape[-1] // 2 if rope is not None else 1, FP8_MAX=store[2],
        num_warps=num_warps, num_stages=num_stages,
        enable_fp_fusion=rope is None,  # rotary.py's roundings: no FMA contraction (as rope_store_kv)
    )
    if num_kv_splits == 1:  # normalised into out by the split kernel
        return
    _decode_reduce_kernel[(b, hq)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=next_pow2(d), NUM_SPLITS=num_kv_splits, BLOCK_S=max(2, next_pow2(num_kv_splits)),
        num_warps=4 if d >= 128 else 2,
    )


def decode_attention_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                         v_scale: float = 1.0, rope: DecodeRope | None = None) -> torch.Tensor:
    """Plain torch, fp32 math, one sequence at a time. Same arguments as ``decode_attention``;
    pages are dequantized (``page.float() * scale``) before the math. ``rope``: the reference
    rotary + store first (on copies of q and k; the pages are written, as the kernel writes them)."""
    if rope is not None:
        from pdserve.kernels.rope_store import rope_store_kv_ref
        q = q.clone()
        rope_store_kv_ref(q, rope.k.clone(), rope.v, rope.positions, rope.cos_sin_cache, k_pages, v_pages, rope.loc,
                          k_scale, v_scale)
    b, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        pages = page_table[i, :(n + page_size - 1) // page_size].long()
        k = k_pages[pages].reshape(-1, hkv, d)[:n].float() * k_scale  # [n, Hkv, D]
        v = v_pages[pages].reshape(-1, hkv, d)[:n].float() * v_scale
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        logits = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale  # [Hq, n]
        out[i] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v)
    return out.to(q.dtype)
