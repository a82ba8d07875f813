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
from pdserve.runtime.kv_pool import KVPool


class AttentionBackend(Protocol):
    def init_batch(self, batch: ForwardBatch) -> None:
        """Prepare per-step metadata (called once per step, before the layers)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; writes k/v into the pool."""


class TorchAttention:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def init_batch(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        self.pool.write(layer, batch.out_loc, k, v)
        out = torch.empty_like(q)
        for seq, q_start, kv_loc in zip(batch.seqs, batch.q_starts, batch.kv_locs):
            n = seq.num_new_tokens
            keys, values = self.pool.gather(layer, kv_loc)  # [kv_len, Hkv, D]
            out[q_start:q_start + n] = reference_attention(q[q_start:q_start + n], keys, values, seq.start_pos, scale)
        return out


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
