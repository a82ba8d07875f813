"""Device helpers shared by the decode and extend attention kernels.

Online softmax in base 2: logits are scaled by ``scale * log2(e)`` so ``exp2`` (one MUFU op)
replaces ``exp``. State per query row: running max ``m``, running denominator ``l`` and the
unnormalised output ``acc`` in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pdserve.kernels import _common  # noqa: F401  (applies the interpreter fixes before any @jit)

LOG2E = 1.4426950408889634


@triton.jit
def attend_block(q, k, v, valid, m_i, l_i, acc, qk_scale,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block: q ``[M, D]``, k/v ``[N, D]``, valid ``[M or 1, N]`` (ignored if not MASKED)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N] fp32
    if MASKED:
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def load_paged(pages_ptr, page_ids, offs_n, offs_d, mask, stride_page, stride_slot, head_offset,
               PAGE_SIZE: tl.constexpr):
    """Rows ``offs_n`` ``[N]`` of one kv head from a page-major pool -> ``[N, D]``.

    ``page_ids`` ``[N]`` int64 are the pages holding those rows (looked up from the page table).
    """
    row = page_ids * stride_page + (offs_n % PAGE_SIZE) * stride_slot + head_offset  # [N] int64
    return tl.load(pages_ptr + row[:, None] + offs_d[None, :], mask=mask, other=0.0)
