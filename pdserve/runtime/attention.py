"""Attention backends behind one small interface, chosen by name.

A backend stores the step's new K/V into the paged pool and computes attention of the new
queries over each sequence's whole context. ``TorchAttention`` is the reference (and the CPU
path); the Triton and flashinfer backends live in ``pdserve.kernels`` and are imported lazily.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from pdserve.runtime.forward import ForwardBatch
from pdserve.runtime.kv_pool import KVPool, dequantize_kv


class AttentionBackend(Protocol):
    def init_batch(self, batch: ForwardBatch) -> None:
        """Prepare per-step metadata (called once per step, before the layers)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; writes k/v into the pool."""


class TorchAttention:
    """Plain-torch attention over the paged pool (the CPU path and the kernels' reference).

    Decode tokens of a step are attended together: their contexts are gathered into one padded
    ``[B, L, Hkv, D]`` block and GQA is done by grouping query heads per KV head, so a step costs
    two batched matmuls per layer instead of one call per sequence. Prefill chunks go one
    sequence at a time with a causal mask offset by the cached prefix.

    FP8 pools: ``pool.write`` quantizes (scale, saturate) and ``_context`` dequantizes the gathered
    pages to the query dtype (``x * scale``). Every key, the step's own included, is read back from
    the pool, so here a prefill chunk attends its own tokens after fp8 rounding (the Triton extend
    kernel uses them at full precision); decode steps read the same values on both backends.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def init_batch(self, batch: ForwardBatch) -> None:
        dev = batch.input_ids.device
        ps = self.pool.page_size
        dec = [i for i, s in enumerate(batch.seqs) if s.num_new_tokens == 1]
        batch.extras["torch_decode_idx"] = dec
        batch.extras["torch_prefill_idx"] = [i for i, s in enumerate(batch.seqs) if s.num_new_tokens != 1]
        # Contexts are read page by page (index_select of whole pages: one index per page_size
        # tokens), then positions past each sequence's length are masked.
        batch.extras["torch_pages"] = {i: torch.tensor(s.page_ids[:-(-s.kv_len // ps)], dtype=torch.int64, device=dev)
                                       for i, s in enumerate(batch.seqs) if s.num_new_tokens != 1}
        if not dec:
            return
        lens = [batch.seqs[i].kv_len for i in dec]
        max_pages = -(-max(lens) // ps)
        table = torch.zeros(len(dec), max_pages, dtype=torch.int64)  # padding rows read page 0, masked
        for row, i in enumerate(dec):
            n = -(-lens[row] // ps)
            table[row, :n] = torch.tensor(batch.seqs[i].page_ids[:n], dtype=torch.int64)
        valid = torch.arange(max_pages * ps)[None, :] < torch.tensor(lens)[:, None]   # [B, L]
        batch.extras["torch_decode"] = (table.view(-1).to(dev), valid.to(dev),
                                        torch.tensor([batch.q_starts[i] for i in dec], device=dev))

    def _context(self, layer: int, pages: torch.Tensor, rows: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``pages`` (flat, ``rows`` tables of equal length) -> two ``[rows, L, Hkv, D]``;
        fp8 pages come back dequantized to ``dtype``."""
        k = self.pool.k(layer).index_select(0, pages)   # [rows * pages, page_size, Hkv, D]
        v = self.pool.v(layer).index_select(0, pages)
        if self.pool.is_fp8:
            k_scale, v_scale = self.pool.scales(layer)
            k, v = dequantize_kv(k, dtype, k_scale), dequantize_kv(v, dtype, v_scale)
        return k.view(rows, -1, *k.shape[2:]), v.view(rows, -1, *v.shape[2:])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        self.pool.write(layer, batch.out_loc, k, v)
        out = torch.empty_like(q)
        if batch.extras.get("torch_decode_idx"):
            table, valid, rows = batch.extras["torch_decode"]
            keys, values = self._context(layer, table, rows.numel(), q.dtype)  # [B, L, Hkv, D]
            out[rows] = grouped_attention(q[rows][:, None], keys, values, valid[:, None, :], scale)[:, 0]
        for i in batch.extras.get("torch_prefill_idx", ()):
            seq, q_start = batch.seqs[i], batch.q_starts[i]
            n = seq.num_new_tokens
            keys, values = self._context(layer, batch.extras["torch_pages"][i], 1, q.dtype)  # [1, L, Hkv, D]
            q_pos = torch.arange(seq.start_pos, seq.kv_len, device=q.device)[:, None]
            mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= q_pos  # [n, L]; also cuts the page tail
            out[q_start:q_start + n] = grouped_attention(q[None, q_start:q_start + n], keys, values,
                                                         mask[None], scale)[0]
        return out


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q ``[B, n, Hq, D]``, k/v ``[B, L, Hkv, D]``, mask ``[B, n, L]`` (True = attend) -> ``[B, n, Hq, D]``.

    The G query heads sharing a KV head are folded into the rows of one matmul per KV head
    (``[G*n, D] @ [D, L]``), so K and V are each copied once into ``[B, Hkv, L, D]`` and never
    repeated per query head (a broadcast matmul would expand them G times).
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)  # [B, Hkv, G*n, D]
    kh = k.to(q.dtype).transpose(1, 2).contiguous()                                  # [B, Hkv, L, D]
    vh = v.to(q.dtype).transpose(1, 2).contiguous()                                  # [B, Hkv, L, D]
    scores = torch.matmul(qg, kh.transpose(-1, -2)) * scale                          # [B, Hkv, G*n, L]
    rows_mask = mask[:, None].expand(b, g, n, mask.shape[-1]).reshape(b, 1, g * n, mask.shape[-1])
    scores = scores.masked_fill(~rows_mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, vh)                                                     # [B, Hkv, G*n, D]
    return out.reshape(b, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, hq, d)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                        scale: float) -> torch.Tensor:
    """Causal attention of ``n`` queries at positions ``start_pos..`` over ``kv_len`` keys.

    q ``[n, Hq, D]``, k/v ``[kv_len, Hkv, D]`` -> ``[n, Hq, D]``. GQA: Hq a multiple of Hkv.
    """
    n, kv_len = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    mask = None
    if n > 1:
        q_pos = torch.arange(start_pos, start_pos + n, device=q.device)[:, None]
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos  # [n, kv_len]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                         enable_gqa=qh.shape[0] != kh.shape[0])
    return out.transpose(0, 1)


def make_attention_backend(name: str, pool: KVPool, **options) -> AttentionBackend:
    if name == "torch":
        return TorchAttention(pool)
    if name == "triton":
        from pdserve.kernels.backend import TritonAttention
        return TritonAttention(pool, **options)
    if name == "flashinfer":
        from pdserve.kernels.flashinfer_backend import FlashInferAttention
        return FlashInferAttention(pool, **options)
    raise ValueError(f"--attention-backend: unknown backend {name!r}")
