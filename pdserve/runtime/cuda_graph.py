"""CUDA graphs for the decode step (``--cuda-graph-max-bs``, ``--disable-cuda-graph``).

A decode step at batch ``B`` launches ~10 kernels per layer; at small ``B`` the host cannot
launch them as fast as the GPU runs them. ``CudaGraphRunner`` captures model forward +
``compute_logits`` once per batch-size *bucket* (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, ... up to
``max_bs``) and replays the smallest bucket that holds the batch:

1. the real rows' token ids, positions and KV slots go into fixed device buffers (one packed
   host->device copy); padding rows get token 0, position 0 and slot ``-1`` (``store_kv``
   skips it, so a padding row never writes a page);
2. ``TritonAttention.init_batch`` fills its fixed metadata buffers in place (page table rows
   ``[0, B)``, ``seq_lens[B:] = 0``: padding rows attend nothing and come out zero);
3. the bucket's graph replays; ``logits[:B]`` is returned (a view of the graph's output buffer,
   valid until the next replay).

The grid of every kernel depends only on the bucket size, never on context lengths, so one graph
per bucket serves every length (docs/kernels.md, "CUDA-graph contract").

Memory: graphs are captured *after* the KV pool is sized, all into one private memory pool,
largest bucket first (smaller buckets reuse its blocks). They therefore live in the headroom
that ``--mem-fraction-static`` leaves (12% of an H200 by default; a decode step at batch 256
needs well under 1 GiB, mostly the ``[256, vocab]`` logits). The bytes taken are logged.

The bucketing and padding are plain functions (``graph_buckets``, ``bucket_for``,
``decode_rows``) so they are unit-tested on CPU; the runner itself needs CUDA.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pdserve.runtime.forward import ForwardBatch, SeqChunk

if TYPE_CHECKING:
    from pdserve.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)

PAD_TOKEN_ID = 0
PAD_POSITION = 0
PAD_SLOT = -1   # store_kv skips it


def graph_buckets(max_bs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 to 32, every 16 to 128, every 32 beyond;
    ``max_bs`` itself is always the last bucket."""
    if max_bs < 1:
        raise ValueError(f"--cuda-graph-max-bs must be >= 1, got {max_bs}")
    sizes = [1, 2, 4, 8] + list(range(16, 33, 8)) + list(range(48, 129, 16)) + list(range(160, max_bs + 1, 32))
    buckets = [b for b in sizes if b < max_bs]
    return buckets + [max_bs]


def bucket_for(batch_size: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``batch_size`` sequences, or None (run eagerly)."""
    if batch_size < 1:
        return None
    for b in buckets:
        if b >= batch_size:
            return b
    return None


def decode_rows(seqs: list[SeqChunk], bucket: int, page_size: int) -> torch.Tensor:
    """Packed graph inputs of a decode batch -> ``[3, bucket]`` int64 (CPU).

    Row 0: token ids, row 1: positions, row 2: KV slots (``page * page_size + offset``).
    Columns past ``len(seqs)`` are padding: token 0, position 0, slot -1.
    """
    if len(seqs) > bucket:
        raise ValueError(f"{len(seqs)} sequences do not fit a bucket of {bucket}")
    pad = bucket - len(seqs)
    ids, positions, slots = [], [], []
    for s in seqs:
        if s.num_new_tokens != 1:
            raise ValueError(f"request {s.rid}: {s.num_new_tokens} new tokens, a decode row has 1")
        pos = s.start_pos
        page_idx = pos // page_size
        if page_idx >= len(s.page_ids):
            raise ValueError(f"request {s.rid}: page table covers {len(s.page_ids) * page_size} tokens, "
                             f"need {pos + 1}")
        ids.append(s.input_ids[0])
        positions.append(pos)
        slots.append(s.page_ids[page_idx] * page_size + pos % page_size)
    return torch.tensor([ids + [PAD_TOKEN_ID] * pad, positions + [PAD_POSITION] * pad,
                         slots + [PAD_SLOT] * pad], dtype=torch.int64)


def is_decode_batch(seqs: list[SeqChunk]) -> bool:
    """Every sequence feeds one token and wants its logits (what a captured step computes)."""
    return bool(seqs) and all(s.num_new_tokens == 1 and s.need_logits for s in seqs)


class CudaGraphRunner:
    """Captured decode steps of ``runner``'s model for batch-size buckets up to ``max_bs``."""

    def __init__(self, runner: "ModelRunner", max_bs: int, emulate: bool = False) -> None:
        """``emulate``: no graphs; ``run`` executes the padded static step eagerly. For CPU tests of
        the buffers-and-padding path (Triton interpreter); never used by the engine."""
        from pdserve.kernels.backend import TritonAttention

        if runner.device.type != "cuda" and not emulate:
            raise ValueError("CUDA graphs need --device cuda (use --disable-cuda-graph)")
        if not isinstance(runner.attn, TritonAttention):
            raise ValueError("CUDA graphs need --attention-backend triton (or pass --disable-cuda-graph)")
        if runner.attn.buffers.max_batch_size < max_bs:
            raise ValueError(f"--cuda-graph-max-bs {max_bs} exceeds the attention metadata buffers "
                             f"({runner.attn.buffers.max_batch_size} sequences)")
        self.runner = runner
        self.attn: TritonAttention = runner.attn
        self.max_bs = max_bs
        self.buckets = graph_buckets(max_bs)
        self.page_size = runner.layout.page_size
        device = runner.device
        self.inputs = torch.zeros(3, max_bs, dtype=torch.int64, device=device)  # ids | positions | slots
        self.emulate = emulate
        self.host_inputs = torch.zeros(3, max_bs, dtype=torch.int64)
        self.copy_done = None  # CUDA: the last host->device copy has finished reading host_inputs
        if device.type == "cuda":
            self.host_inputs = self.host_inputs.pin_memory()
            self.copy_done = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}  # None: emulated (eager) bucket
        self.out: torch.Tensor | None = None  # [max_bs, vocab] fp32, every graph's logits (rows [0, bucket))
        self.mempool = None
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    # -- capture ---------------------------------------------------------------------------------
    def _static_batch(self, bucket: int) -> ForwardBatch:
        """A decode ForwardBatch whose tensors are views of the fixed buffers."""
        from pdserve.kernels.backend import TritonBatchMeta

        bufs = self.attn.buffers
        seg = bufs.segment
        meta = TritonBatchMeta(is_decode=True, page_table=bufs.page_table, seq_lens=bufs.lens[:bufs.max_batch_size],
                               prefix_lens=bufs.lens[seg:seg + bucket], q_starts=bufs.lens[2 * seg:2 * seg + bucket + 1],
                               max_extend_len=1)
        ids, pos, slots = self.inputs[0, :bucket], self.inputs[1, :bucket], self.inputs[2, :bucket]
        return ForwardBatch(seqs=[], input_ids=ids, positions=pos, out_loc=slots, q_starts=list(range(bucket)),
                            logits_idx=torch.arange(bucket, device=ids.device), is_decode=True,
                            extras={"triton": meta})

    def _step(self, batch: ForwardBatch) -> torch.Tensor:
        model = self.runner.model
        hidden = model.forward(batch.input_ids, batch.positions, batch, self.attn)  # [bucket, hidden]
        return model.compute_logits(hidden)                                          # [bucket, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool."""
        if self.emulate:
            self.graphs = {b: None for b in self.buckets}
            return
        start = time.perf_counter()
        torch.cuda.synchronize(self.runner.device)
        free_before, _ = torch.cuda.mem_get_info(self.runner.device)
        self.inputs.zero_()
        self.inputs[2].fill_(PAD_SLOT)
        self.attn.buffers.lens.zero_()  # every row empty: capture reads and writes no page
        self.mempool = torch.cuda.graph_pool_handle()
        self.out = None
        stream = torch.cuda.Stream(self.runner.device)
        for bucket in sorted(self.buckets, reverse=True):
            batch = self._static_batch(bucket)
            stream.wait_stream(torch.cuda.current_stream(self.runner.device))
            with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles, workspace allocated
                self._step(batch)
            torch.cuda.current_stream(self.runner.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool, stream=stream, capture_error_mode="thread_local"):
                if self.out is None:  # made by the largest bucket's graph; smaller ones write its rows
                    self.out = self._step(batch)
                else:
                    self.out[:bucket].copy_(self._step(batch))
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.runner.device)
        free_after, _ = torch.cuda.mem_get_info(self.runner.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(0, free_before - free_after)
        log.info("CUDA graphs: %d buckets up to batch %d captured in %.1f s (~%.0f MiB)",
                 len(self.graphs), self.max_bs, self.capture_seconds, self.capture_bytes / 2**20)

    # -- replay ----------------------------------------------------------------------------------
    def can_run(self, seqs: list[SeqChunk]) -> bool:
        if not self.graphs or not is_decode_batch(seqs) or len(seqs) > self.max_bs:
            return False
        max_pages = max(-(-s.kv_len // self.page_size) for s in seqs)
        return max_pages <= self.attn.buffers.max_pages_per_seq

    @torch.inference_mode()
    def run(self, seqs: list[SeqChunk], future: list[tuple[int, int]] | None = None,
            tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` fp32 of a decode batch (``can_run`` must hold); a view, valid until
        the next ``run``. ``future``: ``(row, i)`` pairs whose input id is ``tokens[i]`` (the step
        in flight samples it), filled on the device before the replay."""
        bucket = bucket_for(len(seqs), self.buckets)
        if bucket is None or bucket not in self.graphs:
            raise ValueError(f"batch of {len(seqs)} has no captured graph (max {self.max_bs})")
        rows = decode_rows(seqs, bucket, self.page_size)  # [3, bucket]
        if self.copy_done is not None:
            self.copy_done.synchronize()  # the previous step's copy has finished reading the pinned buffer
        self.host_inputs[:, :bucket].copy_(rows)
        self.inputs[:, :bucket].copy_(self.host_inputs[:, :bucket], non_blocking=self.copy_done is not None)
        if self.copy_done is not None:
            self.copy_done.record()
        if future:
            from pdserve.runtime.model_runner import resolve_future
            resolve_future(self.inputs[0], future, tokens)
        batch = ForwardBatch(seqs=seqs, input_ids=self.inputs[0, :len(seqs)], positions=self.inputs[1, :len(seqs)],
                             out_loc=self.inputs[2, :len(seqs)], q_starts=list(range(len(seqs))),
                             logits_idx=self.inputs[0, :0], is_decode=True)
        self.attn.init_batch(batch)  # fills the fixed page table / seq_lens in place
        if batch.extras["triton"].page_table is not self.attn.buffers.page_table:
            raise RuntimeError("attention metadata left the fixed buffers; the graph would read stale tables")
        graph = self.graphs[bucket]
        if graph is None:  # emulated: the same padded step, eagerly
            return self._step(self._static_batch(bucket))[:len(seqs)]
        graph.replay()
        return self.out[:len(seqs)]
