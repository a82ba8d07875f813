"""Attention backends behind one small interface, chosen by name.

A backend stores the step's new K/V into the paged pool and computes attention of the new
queries over each sequence's whole context. ``TorchAttention`` is the reference (and the CPU
path); the Triton and flashinfer backends live in ``pdserve.kernels`` and are imported lazily.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from pdserve.runtime import attention_native
from pdserve.runtime.forward import ForwardBatch
from pdserve.runtime.kv_pool import KVPool, dequantize_kv


class AttentionBackend(Protocol):
    # True: ``forward`` also takes ``rope=(positions, cos_sin_cache)`` with q and k not yet
    # rotated, and rotates them in place as it stores K/V (one kernel instead of two)
    fuses_rope: bool

    def init_batch(self, batch: ForwardBatch) -> None:
        """Prepare per-step metadata (called once per step, before the layers)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; writes k/v into the pool."""


class TorchAttention:
    """Plain-torch attention over the paged pool (the CPU path and the kernels' reference).

    Decode tokens go through ``attention_native`` (pages read in place, one task per sequence and
    KV head) where it can run. Otherwise they are attended together: pages gathered (one ``index_select``
    of whole pages each for K and V) and copied once into a padded head-major ``[Hkv * B, L, D]``
    block; the G query heads sharing a KV head are the rows of one matmul, so a layer costs one
    ``baddbmm`` (scale and padding mask fused in) and one ``bmm`` for the whole batch. Prefill
    chunks go one sequence at a time through SDPA (torch's fused CPU kernel, GQA without copies):
    plain causal for a first chunk, else a mask offset by the cached prefix, built once per step.

    FP8 pools: ``pool.write`` quantizes (scale, saturate) and ``_context`` dequantizes the gathered
    pages to the query dtype (``x * scale``). Every key, the step's own included, is read back from
    the pool, so here a prefill chunk attends its own tokens after fp8 rounding (the Triton extend
    kernel uses them at full precision); decode steps read the same values on both backends.
    """

    fuses_rope = False

    def __init__(self, pool: KVPool, use_native: bool = True) -> None:
        self.pool = pool
        self.use_native = use_native  # decode through attention_native where it can run (CPU, AVX-512)

    def init_batch(self, batch: ForwardBatch) -> None:
        dev = batch.input_ids.device
        ps = self.pool.page_size
        dec = [i for i, s in enumerate(batch.seqs) if s.num_new_tokens == 1]
        batch.extras["torch_decode_idx"] = dec
        batch.extras["torch_prefill_idx"] = [i for i, s in enumerate(batch.seqs) if s.num_new_tokens != 1]
        # Contexts are read page by page (index_select of whole pages: one index per page_size
        # tokens), then positions past each sequence's length are masked.
        prefill = {i: s for i, s in enumerate(batch.seqs) if s.num_new_tokens != 1}
        batch.extras["torch_pages"] = {i: torch.tensor(s.page_ids[:-(-s.kv_len // ps)], dtype=torch.int64, device=dev)
                                       for i, s in prefill.items()}
        batch.extras["torch_prefill_mask"] = {i: _causal_mask(s, -(-s.kv_len // ps) * ps, dev) if s.start_pos else None
                                              for i, s in prefill.items()}
        if not dec:
            return
        lens = [batch.seqs[i].kv_len for i in dec]
        max_pages = -(-max(lens) // ps)
        table = torch.zeros(len(dec), max_pages, dtype=torch.int64)  # padding rows read page 0, masked
        for row, i in enumerate(dec):
            n = -(-lens[row] // ps)
            table[row, :n] = torch.tensor(batch.seqs[i].page_ids[:n], dtype=torch.int64)
        valid = torch.arange(max_pages * ps)[None, :] < torch.tensor(lens)[:, None]   # [B, L]
        rows = None if len(dec) == batch.num_tokens else torch.tensor([batch.q_starts[i] for i in dec], device=dev)
        batch.extras["torch_decode"] = (table.view(-1).to(dev), valid.to(dev), rows)
        batch.extras["torch_decode_native"] = (table.to(dev), torch.tensor(lens, dtype=torch.int64, device=dev))
        batch.extras["torch_decode_bias"] = {}  # dtype -> [Hkv * B, 1, L] additive mask, built by layer 0

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
        if batch.extras.get("torch_decode_idx"):
            rows = batch.extras["torch_decode"][2]
            if rows is None:  # a decode-only step: every token is a decode row, in order
                return self._decode(layer, q, batch, scale)
            out = torch.empty_like(q)
            out[rows] = self._decode(layer, q[rows], batch, scale)
        else:
            out = torch.empty_like(q)
        for i in batch.extras.get("torch_prefill_idx", ()):
            seq, q_start = batch.seqs[i], batch.q_starts[i]
            n = seq.num_new_tokens
            if n == 0:
                continue
            keys, values = self._context(layer, batch.extras["torch_pages"][i], 1, q.dtype)  # [1, L, Hkv, D]
            mask = batch.extras["torch_prefill_mask"][i]  # [n, L], or None: no prefix, plain causal
            if mask is None:
                keys, values = keys[:, :n], values[:, :n]
            # 4-D [1, H, len, D] views: torch's fused CPU (flash) kernel; 3-D inputs take the math path
            out[q_start:q_start + n] = F.scaled_dot_product_attention(
                q[None, q_start:q_start + n].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        return out

    def _decode(self, layer: int, q: torch.Tensor, batch: ForwardBatch, scale: float) -> torch.Tensor:
        """The step's decode tokens, q ``[B, Hq, D]`` -> ``[B, Hq, D]``."""
        if self.use_native and attention_native.supports(self.pool.k(layer), q.shape[1]):
            table, lens = batch.extras["torch_decode_native"]
            return attention_native.decode(q, self.pool.k(layer), self.pool.v(layer), table, lens, scale)
        table, valid, _ = batch.extras["torch_decode"]
        b, hq, d = q.shape
        hkv = self.pool.layout.num_kv_heads
        g = hq // hkv
        keys, values = self._decode_context(layer, table, b, q.dtype)             # [Hkv * B, L, D]
        bias = batch.extras["torch_decode_bias"].get(q.dtype)
        if bias is None:  # 0 where a position is in the sequence, -inf past its end
            bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
            bias = batch.extras["torch_decode_bias"][q.dtype] = bias.repeat(hkv, 1)[:, None, :]  # [Hkv * B, 1, L]
        qg = q.view(b, hkv, g, d).transpose(0, 1).reshape(hkv * b, g, d)            # [Hkv * B, G, D]
        scores = torch.baddbmm(bias, qg, keys.transpose(1, 2), alpha=scale)       # [Hkv * B, G, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(probs, values)                                            # [Hkv * B, G, D]
        return out.view(hkv, b, g, d).transpose(0, 1).reshape(b, hq, d)

    def _decode_context(self, layer: int, table: torch.Tensor, b: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``b`` equal-length page tables (flat ``table``) -> two head-major
        ``[Hkv * b, L, D]`` blocks in ``dtype``: one gather of whole pages, then one copy that
        transposes (and converts; fp8 is then scaled), instead of a gather and a transposing copy
        per tensor in the stored dtype."""
        out = []
        for pool_view, scale in zip((self.pool.k(layer), self.pool.v(layer)), self.pool.scales(layer)):
            pages = pool_view.index_select(0, table)                               # [b * P, page_size, Hkv, D]
            _, ps, hkv, d = pages.shape
            block = torch.empty(hkv, b, table.numel() // b * ps, d, dtype=dtype, device=pages.device)
            block.view(hkv, b, -1, ps, d).copy_(pages.view(b, -1, ps, hkv, d).permute(3, 0, 1, 2, 4))
            if self.pool.is_fp8 and scale != 1.0:
                block.mul_(scale)
            out.append(block.view(hkv * b, -1, d))
        return out[0], out[1]


def _causal_mask(seq, num_keys: int, device: torch.device) -> torch.Tensor:
    """``[n, num_keys]``, True = attend: causal, offset by the cached prefix; also cuts the last
    page's tail (keys past ``kv_len``)."""
    q_pos = torch.arange(seq.start_pos, seq.kv_len, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= q_pos


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
