"""TritonAttention: the GPU attention backend (``--attention-backend triton``).

Per step, ``init_batch`` turns the batch's page tables and lengths into int32 device tensors
(two host->device copies) and parks them in ``batch.extras["triton"]``; ``forward`` then, for
each layer, stores the step's K/V into the pool and runs decode attention (every sequence has one
new token) or extend attention (anything else, mixed batches included).

CUDA-graph contract (see docs/kernels.md): metadata lives in fixed buffers allocated once for
``max_batch_size`` sequences x ``max_pages_per_seq`` pages. For a decode batch that fits,
``init_batch`` only copies into those buffers (rows ``[0, B)``) and zeroes ``seq_lens[B:]``; the
tensors a captured graph reads therefore never move, and padding rows past the real batch attend
nothing and come out zero. Batches that do not fit get fresh tensors (they cannot be replayed
from a graph anyway).

FP8 KV (``--kv-cache-dtype``): the pool's per-layer ``(k_scale, v_scale)`` go to the store (which
quantizes) and to the attention kernels (which dequantize); they are host floats, so a captured
graph holds them as kernel arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.kernels.decode_attention import DecodeRope, DecodeWorkspace, decode_attention
from pdserve.kernels.extend_attention import extend_attention
from pdserve.kernels.kv_store import store_kv
from pdserve.kernels.rope_store import rope_store_kv
from pdserve.runtime.forward import ForwardBatch
from pdserve.runtime.kv_pool import KVPool


@dataclass
class TritonBatchMeta:
    is_decode: bool
    page_table: torch.Tensor   # [B_buf, W] int32, row b = pages of sequence b (B_buf >= B)
    seq_lens: torch.Tensor     # [B_buf] int32, context length after this step; 0 on padding rows
    prefix_lens: torch.Tensor  # [B] int32, tokens cached before this step (= seq_lens - new tokens)
    q_starts: torch.Tensor     # [B + 1] int32, offsets of each sequence's new tokens in T
    max_extend_len: int        # most new tokens of any sequence (sizes the extend grid)
    flat_grid: bool = False    # extend grid over the query blocks present (a graph's fixed grid for B_max seqs)


class MetadataBuffers:
    """Fixed device buffers for up to ``max_batch_size`` sequences of ``max_pages_per_seq`` pages."""

    def __init__(self, max_batch_size: int, max_pages_per_seq: int, device: torch.device | str) -> None:
        self.max_batch_size = max_batch_size
        self.max_pages_per_seq = max_pages_per_seq
        self.page_table = torch.zeros(max_batch_size, max_pages_per_seq, dtype=torch.int32, device=device)
        # seq_lens | prefix_lens | q_starts in one buffer (one copy per step); segments start on
        # 16-byte boundaries so every view has the same pointer alignment (no Triton re-specialisation)
        self.segment = -(-(max_batch_size + 1) // 4) * 4
        self.lens = torch.zeros(3 * self.segment, dtype=torch.int32, device=device)

    def fits(self, batch_size: int, pages_per_seq: int) -> bool:
        return batch_size <= self.max_batch_size and pages_per_seq <= self.max_pages_per_seq

    def fill(self, table: np.ndarray, seq_lens: np.ndarray, prefix_lens: np.ndarray,
             q_starts: np.ndarray, is_decode: bool, max_extend_len: int) -> TritonBatchMeta:
        b, width = table.shape
        seg = self.segment
        lens = np.zeros(3 * seg, dtype=np.int32)  # rows past b stay 0: padding sequences are empty
        lens[:b], lens[seg:seg + b], lens[2 * seg:2 * seg + b + 1] = seq_lens, prefix_lens, q_starts
        if width:
            self.page_table[:b, :width].copy_(torch.from_numpy(table), non_blocking=True)  # staged at once:
        self.lens.copy_(torch.from_numpy(lens), non_blocking=True)  # no wait for the step in flight
        return TritonBatchMeta(is_decode=is_decode, page_table=self.page_table,
                               seq_lens=self.lens[:self.max_batch_size], prefix_lens=self.lens[seg:seg + b],
                               q_starts=self.lens[2 * seg:2 * seg + b + 1], max_extend_len=max_extend_len)


CTAS_PER_SM = 4


def kv_splits_for(batch_size: int, num_kv_heads: int, max_splits: int, num_sms: int | None) -> int:
    """Enough (batch x kv head x split) programs to fill the GPU, and no more: the power of two
    at or below ``4 x SMs / (batch x kv heads)``, within ``[1, max_splits]``. Measured on an H200
    (8 kv heads, 2k context): batch 1 at 32 splits 9.0 us/layer vs 12.6 at 8; batch 256 at 1
    split 501 us (100% of 4.3 TB/s) vs 567 at 8. Without an SM count (CPU): ``max_splits``."""
    if num_sms is None:
        return max_splits
    want = -(-CTAS_PER_SM * num_sms // max(1, batch_size * num_kv_heads))
    return max(1, min(1 << (want.bit_length() - 1), max_splits))


class TritonAttention:
    fuses_rope = True  # forward(..., rope=) rotates q and k in the launch that stores K/V

    def __init__(self, pool: KVPool, num_kv_splits: int = 8, reduce_in_fp32: bool = False,
                 max_batch_size: int = 256, max_context_len: int | None = None) -> None:
        if num_kv_splits < 1:
            raise ValueError(f"--triton-attention-num-kv-splits must be >= 1, got {num_kv_splits}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.pool = pool
        self.num_kv_splits = num_kv_splits  # the most; splits_for picks per batch size
        self.num_sms = (torch.cuda.get_device_properties(pool.device).multi_processor_count
                        if pool.device.type == "cuda" else None)
        self.reduce_in_fp32 = reduce_in_fp32
        max_context_len = max_context_len or pool.capacity_tokens
        max_pages = min(pool.num_pages, -(-max_context_len // pool.page_size))
        self.buffers = MetadataBuffers(max_batch_size, max_pages, pool.device)
        self.workspace: DecodeWorkspace | None = None

    def init_batch(self, batch: ForwardBatch) -> None:
        page_size = self.pool.page_size
        b = batch.batch_size
        seq_lens = np.array([s.kv_len for s in batch.seqs], dtype=np.int32)
        new_tokens = np.array([s.num_new_tokens for s in batch.seqs], dtype=np.int32)
        pages = -(-seq_lens // page_size)  # [B] pages covering each context
        width = int(pages.max()) if b else 0
        table = np.zeros((b, width), dtype=np.int32)  # [B, W]
        for row, (s, n) in enumerate(zip(batch.seqs, pages)):
            table[row, :n] = s.page_ids[:n]
        q_starts = np.zeros(b + 1, dtype=np.int32)
        np.cumsum(new_tokens, out=q_starts[1:])
        buffers = self.buffers
        if not buffers.fits(b, width):
            buffers = MetadataBuffers(max(b, 1), max(width, 1), self.pool.device)
        batch.extras["triton"] = buffers.fill(table, seq_lens, seq_lens - new_tokens, q_starts,
                                              batch.is_decode, int(new_tokens.max()) if b else 0)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; stores k/v at ``batch.out_loc``.
        ``rope`` = (positions ``[T]``, cos/sin cache): q and k are not rotated yet; a decode step
        rotates and stores inside the attention kernel (``DecodeRope``), a prefill or mixed step
        rotates them in place first (``rope_store_kv``)."""
        meta: TritonBatchMeta = batch.extras["triton"]
        k_pages, v_pages = self.pool.k(layer), self.pool.v(layer)
        k_scale, v_scale = self.pool.scales(layer)
        if meta.is_decode and rope is not None:  # rotary + store inside the split kernel: one launch fewer
            return decode_attention(q, k_pages, v_pages, meta.page_table, meta.seq_lens, scale,
                                    k_scale=k_scale, v_scale=v_scale, num_kv_splits=self.splits_for(q.shape[0]),
                                    reduce_in_fp32=self.reduce_in_fp32, workspace=self._workspace(q),
                                    rope=DecodeRope(k, v, rope[0], rope[1], batch.out_loc))
        if rope is None:
            store_kv(k_pages, v_pages, batch.out_loc, k, v, k_scale, v_scale)
        else:
            rope_store_kv(q, k, v, rope[0], rope[1], k_pages, v_pages, batch.out_loc, k_scale, v_scale)
        if meta.is_decode:
            return decode_attention(q, k_pages, v_pages, meta.page_table, meta.seq_lens, scale,
                                    k_scale=k_scale, v_scale=v_scale, num_kv_splits=self.splits_for(q.shape[0]),
                                    reduce_in_fp32=self.reduce_in_fp32, workspace=self._workspace(q))
        return extend_attention(q, k, v, k_pages, v_pages, meta.page_table, meta.q_starts, meta.prefix_lens,
                                meta.max_extend_len, scale, k_scale=k_scale, v_scale=v_scale, flat_grid=meta.flat_grid)

    def splits_for(self, batch_size: int) -> int:
        """Context splits of decode attention for a batch (fixed per CUDA-graph bucket)."""
        return kv_splits_for(batch_size, self.pool.layout.num_kv_heads, self.num_kv_splits, self.num_sms)

    def _workspace(self, q: torch.Tensor) -> DecodeWorkspace:
        """Decode split buffers for the max batch, made on the first decode step (do that before capture)."""
        _, hq, d = q.shape
        mid_dtype = torch.float32 if self.reduce_in_fp32 else q.dtype
        if self.workspace is None or not self.workspace.fits(1, hq, d, self.num_kv_splits, mid_dtype):
            self.workspace = DecodeWorkspace.allocate(self.buffers.max_batch_size, hq, d, self.num_kv_splits,
                                                      q.dtype, q.device, self.reduce_in_fp32)
        return self.workspace
