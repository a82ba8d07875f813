"""FlashInferAttention (``--attention-backend flashinfer``): FlashInfer's paged prefill kernel.

Status: written against FlashInfer's documented ``BatchPrefillWithPagedKVCacheWrapper`` API
(plan/run, NHD layout, separate K and V caches) but **never executed**: flashinfer is not
installed on any machine this project has run on. ``scripts/gpu/kernels_check.py`` compares it
with the Triton backend when flashinfer imports. Without flashinfer, construction fails with
an ``ImportError`` that says what to do.

One wrapper serves decode and extend (a decode step is an extend of one token). It is planned
once per step, on the first layer's call, because ``plan`` needs the q head count and scale that
only ``forward`` sees. It needs the pool's per-layer views ``[num_pages, page_size, Hkv, D]``
(page stride = whole page of all layers); FlashInfer must accept that stride or fail loudly.
"""

from __future__ import annotations

import numpy as np
import torch

from pdserve.kernels.kv_store import store_kv
from pdserve.runtime.forward import ForwardBatch
from pdserve.runtime.kv_pool import KVPool

_WORKSPACE_BYTES = 256 * 1024 * 1024


def _import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise ImportError("--attention-backend flashinfer needs the flashinfer package "
                          "(pip install flashinfer-python, matching your torch/CUDA); it is not installed. "
                          "Use --attention-backend triton instead.") from e
    return flashinfer


class FlashInferAttention:
    fuses_rope = False

    def __init__(self, pool: KVPool, **_unused_triton_options) -> None:
        flashinfer = _import_flashinfer()
        if pool.device.type != "cuda":
            raise ValueError(f"--attention-backend flashinfer needs a CUDA KV pool, got {pool.device}")
        check_kv_dtype(pool.layout.dtype)
        self.pool = pool
        workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self._plan_args: tuple | None = None
        self._planned_for: ForwardBatch | None = None

    def init_batch(self, batch: ForwardBatch) -> None:
        """CSR page lists: indptr ``[B+1]``, indices ``[sum pages]``, last_page_len ``[B]`` (int32)."""
        page_size = self.pool.page_size
        kv_lens = np.array([s.kv_len for s in batch.seqs], dtype=np.int64)
        num_pages = -(-kv_lens // page_size)
        indices = np.concatenate([np.asarray(s.page_ids[:n], dtype=np.int32)
                                  for s, n in zip(batch.seqs, num_pages)] or [np.zeros(0, np.int32)])
        device = self.pool.device
        self._plan_args = (
            _i32(np.concatenate([[0], np.cumsum([s.num_new_tokens for s in batch.seqs])]), device),  # qo_indptr
            _i32(np.concatenate([[0], np.cumsum(num_pages)]), device),                                # kv_indptr
            _i32(indices, device),
            _i32(kv_lens - (num_pages - 1) * page_size, device),                                     # last_page_len
        )
        self._planned_for = None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        k_pages, v_pages = self.pool.k(layer), self.pool.v(layer)
        store_kv(k_pages, v_pages, batch.out_loc, k, v)
        if self._planned_for is not batch:
            self.wrapper.plan(*self._plan_args, q.shape[1], k.shape[1], q.shape[2], self.pool.page_size,
                              causal=True, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_pages.dtype)
            self._planned_for = batch
        return self.wrapper.run(q, (k_pages, v_pages))


def check_kv_dtype(kv_dtype: str) -> None:
    """FlashInfer can read fp8 pages (``kv_data_type`` + ``k_scale``/``v_scale`` in ``run``), but this
    wrapper has never run anywhere, so it refuses fp8 rather than risk wrong attention silently."""
    if kv_dtype.startswith("float8"):
        raise ValueError(f"--kv-cache-dtype ({kv_dtype}) with --attention-backend flashinfer is not supported "
                         f"(its fp8 path is unverified here); use --attention-backend triton, or "
                         f"--kv-cache-dtype auto")


def _i32(values, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int32)).to(device)
