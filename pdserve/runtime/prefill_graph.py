"""CUDA graphs for prefill and mixed steps (``--cuda-graph-max-prefill-tokens``,
``--cuda-graph-max-prefill-seqs``; ``--disable-cuda-graph`` turns these off too).

Why: an eager prefill launches ~10 kernels per layer from Python, and the host can take longer to
queue them than the GPU takes to run them. On the H200 box, Llama-3.1-8B at 1,024 tokens: host
enqueue 18-31 ms against 22-24 ms of GPU work, so the step took whatever the host took (57-82%
MFU across runs); Llama-3.2-1B at 1,024 tokens: 9.5 ms of host for 2.6 ms of floor. A replayed
graph costs the host one launch.

How: one graph per *token-count bucket* (multiples of 128 up to 1,024, of 256 beyond, up to the
maximum), each for up to ``max_seqs`` sequences, replaying the smallest bucket that holds the
step's tokens:

1. token ids, positions and KV slots go into fixed device buffers (``prefill_inputs``), with the
   row of each sequence's last token where it wants logits; padding tokens get id 0, position 0
   and slot ``-1`` (no page is written), and belong to no sequence;
2. ``TritonAttention.init_batch`` fills the fixed metadata buffers: sequences past the real ones
   have no new tokens; extend attention runs on a flat grid (``flat_grid``: one program per
   query block present, at most ``bucket / 128 + max_seqs`` per head, found by scanning
   ``q_starts``), fixed by the bucket, never by the step. A grid of ``max_seqs`` x the bucket's
   blocks, most of them idle, made attention 1.6x slower at 4k tokens on the H200;
3. every other op works row by row, so padding rows never reach a real row; logits are gathered
   at the fixed index buffer, and ``logits[:N]`` (N = sequences wanting logits) is returned, a
   view valid until the next replay.

Padding costs GEMM rows: at most 127 (or 255) tokens per step. Below ~128 rows a GEMM of an 8B
model reads the same weights whatever the row count, so small steps lose almost nothing.
Memory: one private pool, largest bucket first (about one eager prefill step's activations);
captured after the KV pool is sized, inside the headroom ``--mem-fraction-static`` leaves.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pdserve.runtime.cuda_graph import PAD_POSITION, PAD_SLOT, PAD_TOKEN_ID, bucket_for, is_decode_batch
from pdserve.runtime.forward import ForwardBatch, SeqChunk, page_slots

if TYPE_CHECKING:
    from pdserve.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Captured step sizes in tokens: every 128 up to 1,024, every 256 beyond; ``max_tokens`` last."""
    if max_tokens < 1:
        raise ValueError(f"--cuda-graph-max-prefill-tokens must be >= 1 (0 disables), got {max_tokens}")
    sizes = list(range(128, 1025, 128)) + list(range(1280, max_tokens, 256))
    return [s for s in sizes if s < max_tokens] + [max_tokens]


def prefill_inputs(seqs: list[SeqChunk], bucket: int, max_seqs: int, page_size: int) -> tuple[torch.Tensor, int]:
    """Packed graph inputs of a step -> (``[3 * bucket + max_seqs]`` int64 on the CPU, number of
    sequences wanting logits).

    ``[0:bucket]`` token ids, ``[bucket:2 bucket]`` positions, ``[2 bucket:3 bucket]`` KV slots,
    then the token row of each logits-wanting sequence's last token (0 past them). Tokens past
    the step's are padding: id 0, position 0, slot -1.
    """
    total = sum(s.num_new_tokens for s in seqs)
    if total > bucket or len(seqs) > max_seqs:
        raise ValueError(f"{len(seqs)} sequences / {total} tokens do not fit a graph of {max_seqs} / {bucket}")
    out = torch.zeros(3 * bucket + max_seqs, dtype=torch.int64)
    out[:bucket] = PAD_TOKEN_ID
    out[bucket:2 * bucket] = PAD_POSITION
    out[2 * bucket:3 * bucket] = PAD_SLOT
    t, n_logits = 0, 0
    for s in seqs:
        n = s.num_new_tokens
        out[t:t + n] = torch.tensor(s.input_ids, dtype=torch.int64)
        out[bucket + t:bucket + t + n] = torch.arange(s.start_pos, s.kv_len, dtype=torch.int64)
        out[2 * bucket + t:2 * bucket + t + n] = page_slots(s.page_ids, s.start_pos, s.kv_len, page_size)
        t += n
        if s.need_logits:
            out[3 * bucket + n_logits] = t - 1
            n_logits += 1
    return out, n_logits


class PrefillGraphRunner:
    """Captured prefill/mixed steps of ``runner``'s model for token-count buckets."""

    def __init__(self, runner: "ModelRunner", max_tokens: int, max_seqs: int, emulate: bool = False) -> None:
        """``emulate``: no graphs; ``run`` executes the padded static step eagerly (CPU tests)."""
        from pdserve.kernels.backend import TritonAttention
        from pdserve.kernels.extend_attention import MAX_FLAT_SEQS

        if runner.device.type != "cuda" and not emulate:
            raise ValueError("prefill CUDA graphs need --device cuda (use --disable-cuda-graph)")
        if not isinstance(runner.attn, TritonAttention):
            raise ValueError("prefill CUDA graphs need --attention-backend triton (or --disable-cuda-graph)")
        most = min(runner.attn.buffers.max_batch_size, MAX_FLAT_SEQS)
        if not 1 <= max_seqs <= most:
            raise ValueError(f"--cuda-graph-max-prefill-seqs must be in [1, {most}], got {max_seqs}")
        self.runner, self.attn = runner, runner.attn
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.buckets = prefill_buckets(max_tokens)
        self.page_size = runner.layout.page_size
        self.emulate = emulate
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        self.out: torch.Tensor | None = None  # [max_seqs, vocab] fp32: every graph's logits
        self.host = torch.zeros(3 * max_tokens + max_seqs, dtype=torch.int64)
        self.copy_done = None
        if runner.device.type == "cuda":
            self.host = self.host.pin_memory()
            self.copy_done = torch.cuda.Event()
        # the packed inputs (prefill_inputs' layout for the bucket replayed); every graph reads its prefix
        self.device_inputs = torch.zeros(3 * max_tokens + max_seqs, dtype=torch.int64, device=runner.device)
        self.capture_seconds, self.capture_bytes = 0.0, 0

    def _static_batch(self, bucket: int) -> ForwardBatch:
        """A ForwardBatch of ``bucket`` tokens whose tensors are views of the fixed buffers."""
        from pdserve.kernels.backend import TritonBatchMeta

        bufs, seg, m = self.attn.buffers, self.attn.buffers.segment, self.max_seqs
        meta = TritonBatchMeta(is_decode=False, page_table=bufs.page_table, seq_lens=bufs.lens[:bufs.max_batch_size],
                               prefix_lens=bufs.lens[seg:seg + m], q_starts=bufs.lens[2 * seg:2 * seg + m + 1],
                               max_extend_len=bucket, flat_grid=True)
        flat = self.device_inputs[:3 * bucket + m]
        return ForwardBatch(seqs=[], input_ids=flat[:bucket], positions=flat[bucket:2 * bucket],
                            out_loc=flat[2 * bucket:3 * bucket], q_starts=[], logits_idx=flat[3 * bucket:],
                            is_decode=False, extras={"triton": meta})

    def _step(self, batch: ForwardBatch) -> torch.Tensor:
        model = self.runner.model
        hidden = model.forward(batch.input_ids, batch.positions, batch, self.attn)  # [bucket, hidden]
        return model.compute_logits(hidden[batch.logits_idx])                        # [max_seqs, vocab]

    def _fill_padding(self, bucket: int) -> None:
        """Every token padding and every sequence empty: a step that reads and writes no page."""
        empty, _ = prefill_inputs([], bucket, self.max_seqs, self.page_size)
        self.device_inputs[:empty.numel()].copy_(empty)
        self.attn.buffers.lens.zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool."""
        if self.emulate:
            self.graphs = {b: None for b in self.buckets}
            return
        dev = self.runner.device
        start = time.perf_counter()
        torch.cuda.synchronize(dev)
        free_before, _ = torch.cuda.mem_get_info(dev)
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(dev)
        for bucket in sorted(self.buckets, reverse=True):
            self._fill_padding(bucket)
            batch = self._static_batch(bucket)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles for this shape
                self._step(batch)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                if self.out is None:
                    self.out = self._step(batch)
                else:
                    self.out.copy_(self._step(batch))
            self.graphs[bucket] = graph
        torch.cuda.synchronize(dev)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(0, free_before - torch.cuda.mem_get_info(dev)[0])
        log.info("prefill CUDA graphs: %d buckets up to %d tokens x %d sequences in %.1f s (~%.0f MiB)",
                 len(self.graphs), self.max_tokens, self.max_seqs, self.capture_seconds, self.capture_bytes / 2**20)

    def can_run(self, seqs: list[SeqChunk]) -> bool:
        """A step of up to ``max_seqs`` sequences and ``max_tokens`` tokens, not decode-only (the
        decode graphs, or decode attention, serve those better than extend attention)."""
        if not self.graphs or not 1 <= len(seqs) <= self.max_seqs or is_decode_batch(seqs):
            return False
        total = sum(s.num_new_tokens for s in seqs)
        if not 1 <= total <= self.max_tokens:
            return False
        return max(-(-s.kv_len // self.page_size) for s in seqs) <= self.attn.buffers.max_pages_per_seq

    @torch.inference_mode()
    def run(self, seqs: list[SeqChunk], future: list[tuple[int, int]] | None = None,
            tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[N, vocab]`` fp32 of the sequences wanting them, in order (``can_run`` must hold);
        a view, valid until the next ``run``. ``future`` as in ``CudaGraphRunner.run``."""
        bucket = bucket_for(sum(s.num_new_tokens for s in seqs), self.buckets)
        if bucket is None or bucket not in self.graphs:
            raise ValueError(f"a step of {sum(s.num_new_tokens for s in seqs)} tokens has no captured prefill graph")
        packed, n_logits = prefill_inputs(seqs, bucket, self.max_seqs, self.page_size)
        if self.copy_done is not None:
            self.copy_done.synchronize()  # the previous copy has finished reading the pinned buffer
        n = packed.numel()
        self.host[:n].copy_(packed)
        self.device_inputs[:n].copy_(self.host[:n], non_blocking=self.copy_done is not None)
        if self.copy_done is not None:
            self.copy_done.record()
        if future:
            from pdserve.runtime.model_runner import resolve_future
            resolve_future(self.device_inputs[:bucket], future, tokens)
        batch = ForwardBatch(seqs=seqs, input_ids=self.device_inputs[:0], positions=self.device_inputs[:0],
                             out_loc=self.device_inputs[:0], q_starts=[], logits_idx=self.device_inputs[:0],
                             is_decode=False)
        self.attn.init_batch(batch)  # fills the fixed page table and lengths in place
        if batch.extras["triton"].page_table is not self.attn.buffers.page_table:
            raise RuntimeError("attention metadata left the fixed buffers; the graph would read stale tables")
        graph = self.graphs[bucket]
        if graph is None:  # emulated: the same padded step, eagerly
            return self._step(self._static_batch(bucket))[:n_logits]
        graph.replay()
        return self.out[:n_logits]
