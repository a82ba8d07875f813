"""Extend (prefill) attention over a ragged batch: new queries attend a cached prefix + themselves.

Sequence ``b`` brings ``ext_len = q_starts[b+1] - q_starts[b]`` new tokens (rows
``q_starts[b]..`` of q/k/v) after ``prefix_lens[b]`` tokens already in the page pool. New query
``i`` sees every prefix token (read through the page table) and new tokens ``0..i`` (read from the
contiguous k/v of this step, which are cheaper to load than a paged gather).

Program ``(seq, q_head, m_block)`` owns ``BLOCK_M`` query rows of one head and runs three loops:
prefix blocks (bounds mask only), new-token blocks left of the diagonal block (no mask at all),
and the diagonal blocks (causal mask). Both products use ``tl.dot`` (tensor cores).
The grid is ``(B, Hq, cdiv(max_extend_len, BLOCK_M))``; programs past a sequence's end exit
after loading nothing. Only constexprs and tensor strides are specialised, so batch composition
never triggers a recompile.

FP8 pages: only the prefix is read from the pool, so only prefix blocks are upcast to q's dtype,
with ``k_scale`` folded into their logit scale and V multiplied by ``v_scale`` (when not 1.0).
The step's own tokens are attended at full precision, as SGLang's extend kernel does; they are
quantized only in the pool, for later steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import (FLOAT_DTYPES, INTERPRET, check_same_device, check_tensor, dot_precision,
                                     kv_page_dtypes, next_pow2, require)
from pdserve.kernels.attention_common import LOG2E, attend_block, load_paged


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, k_pages_ptr, v_pages_ptr, page_table_ptr, q_starts_ptr, prefix_lens_ptr,
    qk_scale, prefix_qk_scale, v_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kph, stride_vp, stride_vs, stride_vph, stride_ptb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SCALE_V: tl.constexpr,
    FLAT_SEQS: tl.constexpr,
):
    b, head, m0, valid = _program_block(q_starts_ptr, FLAT_SEQS, BLOCK_M)
    kv_head = head // GROUP
    q_start = tl.load(q_starts_ptr + b)
    ext_len = tl.where(valid, tl.load(q_starts_ptr + b + 1) - q_start, 0)
    is_active = m0 < ext_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext_len
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    # 1. cached prefix, through the page table
    prefix_end = tl.where(is_active, tl.load(prefix_lens_ptr + b), 0)
    m_i, l_i, acc = _attend_prefix(q, m_i, l_i, acc, k_pages_ptr, v_pages_ptr, page_table_ptr + b * stride_ptb,
                                   prefix_end, offs_d, mask_d, stride_kp, stride_ks, kv_head * stride_kph, stride_vp,
                                   stride_vs, kv_head * stride_vph, prefix_qk_scale, v_scale, PAGE_SIZE, BLOCK_N,
                                   SCALE_V, PRECISION)

    # 2. new tokens strictly left of this query block: every key visible to every row
    full_end = tl.where(is_active, m0, 0)
    for n0 in range(0, full_end, BLOCK_N):
        k, v = _load_new(k_ptr, v_ptr, q_start, n0, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh,
                         kv_head, ext_len, BLOCK_N)
        m_i, l_i, acc = attend_block(q, k, v, mask_m[:, None], m_i, l_i, acc, qk_scale, False, PRECISION)

    # 3. the diagonal: causal mask
    diag_end = tl.where(is_active, tl.minimum(m0 + BLOCK_M, ext_len), 0)
    for n0 in range(full_end, diag_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_new(k_ptr, v_ptr, q_start, n0, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh,
                         kv_head, ext_len, BLOCK_N)
        causal = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < ext_len)
        m_i, l_i, acc = attend_block(q, k, v, causal, m_i, l_i, acc, qk_scale, True, PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _program_block(q_starts_ptr, FLAT_SEQS: tl.constexpr, BLOCK_M: tl.constexpr):
    """-> (sequence, q head, first query row of the block, valid) of this program."""
    if FLAT_SEQS > 0:  # grid (Hq, query blocks of all sequences): program -> (sequence, block)
        b, m0, valid = _flat_block(q_starts_ptr, tl.program_id(1), FLAT_SEQS, BLOCK_M)
        head = tl.program_id(0)  # every head of a block launches together, as in the batch grid
    else:  # grid (B, Hq, blocks of the longest)
        b, head, valid = tl.program_id(0), tl.program_id(1), True
        m0 = (tl.num_programs(2) - 1 - tl.program_id(2)) * BLOCK_M  # heaviest (last) causal blocks launch first
    return b, head, m0, valid


@triton.jit
def _attend_prefix(q, m_i, l_i, acc, k_pages_ptr, v_pages_ptr, pt_row, prefix_end, offs_d, mask_d,
                   stride_kp, stride_ks, k_head_offset, stride_vp, stride_vs, v_head_offset, prefix_qk_scale, v_scale,
                   PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_V: tl.constexpr, PRECISION: tl.constexpr):
    """The cached prefix ``[0, prefix_end)`` of one kv head, read through the page table row."""
    for n0 in range(0, prefix_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix_end
        page_ids = tl.load(pt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = load_paged(k_pages_ptr, page_ids, offs_n, offs_d, mask_nd, stride_kp, stride_ks, k_head_offset, PAGE_SIZE)
        v = load_paged(v_pages_ptr, page_ids, offs_n, offs_d, mask_nd, stride_vp, stride_vs, v_head_offset, PAGE_SIZE)
        k = k.to(q.dtype)  # fp8 pages: upcast; k_scale is in prefix_qk_scale
        if SCALE_V:
            v = v.to(tl.float32) * v_scale
        v = v.to(q.dtype)
        m_i, l_i, acc = attend_block(q, k, v, mask_n[None, :], m_i, l_i, acc, prefix_qk_scale, True, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _flat_block(q_starts_ptr, pid, NUM_SEQS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Flat program ``pid`` -> (sequence, first query row of its block, valid). Sequences' blocks
    are numbered in order, each sequence's heaviest (last) block first; a pid past them all, or a
    sequence with no new tokens (q_starts not increasing: graph padding), is not valid."""
    seq, m_idx, blocks_of_seq, seen = -1, 0, 0, 0
    start = tl.load(q_starts_ptr)
    for i in tl.static_range(NUM_SEQS):
        end = tl.load(q_starts_ptr + i + 1)
        blocks = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
        hit = (seq < 0) & (pid < seen + blocks)
        seq = tl.where(hit, i, seq)
        m_idx = tl.where(hit, pid - seen, m_idx)
        blocks_of_seq = tl.where(hit, blocks, blocks_of_seq)
        seen += blocks
        start = end
    return tl.maximum(seq, 0), tl.maximum(blocks_of_seq - 1 - m_idx, 0) * BLOCK_M, seq >= 0  # rows >= 0 always


@triton.jit
def _load_new(k_ptr, v_ptr, q_start, n0, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh,
              kv_head, ext_len, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows = (q_start + offs_n).to(tl.int64)
    mask = (offs_n < ext_len)[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    return k, v


MAX_FLAT_SEQS = 64  # the flat grid's sequence scan is unrolled


def _check_extend_args(q, k, v, k_pages, v_pages, page_table, q_starts, prefix_lens) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k", k, 3, (q.dtype,))
    check_tensor("v", v, 3, (q.dtype,))
    check_tensor("k_pages", k_pages, 4, kv_page_dtypes(q.dtype))
    check_tensor("v_pages", v_pages, 4, (k_pages.dtype,))
    check_tensor("page_table", page_table, 2, (torch.int32,))
    check_tensor("q_starts", q_starts, 1, (torch.int32,))
    check_tensor("prefix_lens", prefix_lens, 1, (torch.int32,))
    check_same_device(q=q, k=k, v=v, k_pages=k_pages, v_pages=v_pages, page_table=page_table,
                      q_starts=q_starts, prefix_lens=prefix_lens)
    t, hq, d = q.shape
    hkv = k.shape[1]
    require(k.shape == v.shape == (t, hkv, d),
            lambda: f"k {tuple(k.shape)} / v {tuple(v.shape)} must be [{t}, Hkv, {d}]")
    require(k_pages.shape == v_pages.shape and k_pages.shape[2:] == (hkv, d),
            lambda: f"k_pages {tuple(k_pages.shape)} / v_pages {tuple(v_pages.shape)} "
                    f"must be [pages, page_size, {hkv}, {d}]")
    require(hq % hkv == 0, lambda: f"q heads {hq} not a multiple of kv heads {hkv}")
    b = prefix_lens.shape[0]
    require(q_starts.shape[0] == b + 1, lambda: f"q_starts has {q_starts.shape[0]} entries, need batch + 1 = {b + 1}")
    require(page_table.shape[0] >= b, lambda: f"page_table has {page_table.shape[0]} rows, batch is {b}")
    require(d >= 16, lambda: f"head_dim {d} < 16 is not supported (tl.dot minimum)")


def _default_blocks(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). H200, D=128, 16-bit: 3 stages gave 400-402
    TFLOP/s at 4k tokens against 352 for 2 (kernels_check sweep, two runs); fp32 tiles are twice
    the bytes and keep 2 stages (3 would not fit shared memory)."""
    if INTERPRET:
        return 32, 32, 4, 1
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 3 if dtype != torch.float32 else 2
    return 64, 32, 8, 2


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                     v_pages: torch.Tensor, page_table: torch.Tensor, q_starts: torch.Tensor,
                     prefix_lens: torch.Tensor, max_extend_len: int, scale: float, *, k_scale: float = 1.0,
                     v_scale: float = 1.0, out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, flat_grid: bool = False) -> torch.Tensor:
    """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (this step's tokens) -> ``[T, Hq, D]``.

    page_table ``[>=B, W]`` int32 covers each sequence's prefix; q_starts ``[B+1]`` int32 cumulative
    offsets into T; prefix_lens ``[B]`` int32; ``max_extend_len`` (host int, sizes the grid) must be
    >= every sequence's new-token count, else rows past it are left unwritten. Pages in q's dtype,
    or fp8 holding ``K / k_scale`` and ``V / v_scale``.

    ``flat_grid``: one program per query block actually present (``cdiv(T, BLOCK_M) + B`` per
    head at most, the surplus exits at once) instead of ``B x cdiv(max_extend_len, BLOCK_M)``; for
    a grid fixed by a CUDA graph for up to B sequences (prefill graphs: measured on an H200 at 4k
    tokens, B = 16, the B-sized grid took 25.3 ms of attention against 15.6 eager). Each program
    finds its sequence by scanning ``q_starts`` (B entries, unrolled). Heads vary fastest, so the
    q heads sharing a kv head run side by side and read its K/V from L2 (with blocks fastest,
    attention at 1k tokens took 2x the batch grid's time).
    """
    _check_extend_args(q, k, v, k_pages, v_pages, page_table, q_starts, prefix_lens)
    require(k_scale > 0 and v_scale > 0, lambda: f"k_scale {k_scale} / v_scale {v_scale} must be positive")
    t, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    bm, bn, warps, stages = _default_blocks(d, q.dtype)
    block_m, block_n = block_m or bm, block_n or bn
    require(block_m % block_n == 0, lambda: f"block_m {block_m} must be a multiple of block_n {block_n}")
    require(INTERPRET or block_n >= 16, lambda: f"block_n {block_n} < 16 (tl.dot minimum on GPU)")
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, 3, (q.dtype,))
    require(out.shape == q.shape, lambda: f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    b = prefix_lens.shape[0]
    if t == 0 or b == 0 or max_extend_len <= 0:
        return out
    require(not flat_grid or b <= MAX_FLAT_SEQS, lambda: f"flat_grid: {b} sequences, at most {MAX_FLAT_SEQS}")
    grid = (hq, triton.cdiv(t, block_m) + b) if flat_grid else (b, hq, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k, v, out, k_pages, v_pages, page_table, q_starts, prefix_lens, scale * LOG2E,
        scale * k_scale * LOG2E, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1),
        v_pages.stride(2), page_table.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=next_pow2(d), PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), SCALE_V=v_scale != 1.0,
        FLAT_SEQS=b if flat_grid else 0, num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return out


def extend_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                         v_pages: torch.Tensor, page_table: torch.Tensor, q_starts: torch.Tensor,
                         prefix_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                         v_scale: float = 1.0) -> torch.Tensor:
    """Plain torch, fp32 math, one sequence at a time. Same arguments as ``extend_attention``;
    the prefix pages are dequantized (``page.float() * scale``), the step's k/v used as given."""
    t, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    for i in range(prefix_lens.shape[0]):
        s, e, p = int(q_starts[i]), int(q_starts[i + 1]), int(prefix_lens[i])
        pages = page_table[i, :(p + page_size - 1) // page_size].long()
        prefix_k = k_pages[pages].reshape(-1, hkv, d)[:p].float() * k_scale
        prefix_v = v_pages[pages].reshape(-1, hkv, d)[:p].float() * v_scale
        keys = torch.cat([prefix_k, k[s:e].float()])  # [p + n, Hkv, D]
        values = torch.cat([prefix_v, v[s:e].float()])
        keys, values = keys.repeat_interleave(hq // hkv, 1), values.repeat_interleave(hq // hkv, 1)
        logits = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * scale  # [Hq, n, p + n]
        visible = torch.arange(p + e - s)[None, :] <= (p + torch.arange(e - s))[:, None]  # [n, p + n]
        logits = logits.masked_fill(~visible.to(q.device), float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), values)
    return out.to(q.dtype)
