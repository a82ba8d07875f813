"""Attention kernel benchmarks for scripts/gpu/kernels_check.py (imported from there).

Timing: each function is captured ``reps`` times in one CUDA graph and replayed, so host
overhead (Python checks, launches) is excluded, as it is when the decode step runs under a
CUDA graph in the server. Decode cycles through disjoint page tables covering a 2 GiB pool
layer, so K/V always stream from HBM, never from the 50 MB L2. On CPU (``--tiny``) one eager
call is timed by wall clock: those numbers only prove the code path runs.
Peaks: the copy rate and bf16 matmul rate measured on this card at the first benchmark
(scripts/gpu/floors.py), not a datasheet's or another card's.
"""

from __future__ import annotations

import statistics
import time

import torch

from floors import floors_for
from kernels_check import Results, Shapes, _page_table, _pool_views


def peak_gbps() -> float:
    """The copy rate measured on this device (read + write), GB/s."""
    return floors_for(torch.device("cuda" if torch.cuda.is_available() else "cpu")).copy_bytes_per_s / 1e9


def peak_tflops() -> float:
    """The matmul rate measured on this device (bf16 on a GPU), TFLOP/s."""
    return floors_for(torch.device("cuda" if torch.cuda.is_available() else "cpu")).matmul_tflops


def gpu_time_us(fn, reps: int = 8, replays: int = 5) -> float:
    """Median time of one ``fn()`` in microseconds (CUDA graph; eager wall clock on CPU)."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(times)


class DecodeBench:
    """A pool for ``max_batch x ctx`` tokens; a batch of B runs ``max_batch / B`` disjoint tables."""

    def __init__(self, sh: Shapes, max_batch: int, device) -> None:
        self.sh, self.ctx = sh, sh.bench_ctx
        self.max_batch = max_batch
        pages_per_seq = -(-self.ctx // sh.page_size)
        num_pages = max_batch * pages_per_seq
        _, self.kp, self.vp = _pool_views(num_pages, sh.num_kv_heads, sh, torch.bfloat16, device)
        self.table = _page_table([self.ctx] * max_batch, sh.page_size, num_pages, device)  # [max_batch, W]
        self.seq_lens = torch.full((max_batch,), self.ctx, dtype=torch.int32, device=device)
        self.q = torch.randn(max_batch, sh.num_q_heads, sh.head_dim, device=device).to(torch.bfloat16)
        self.out = torch.empty_like(self.q)

    def fn(self, batch: int, num_kv_splits: int, **kw):
        from pdserve.kernels.decode_attention import DecodeWorkspace, decode_attention
        sh = self.sh
        ws = DecodeWorkspace.allocate(batch, sh.num_q_heads, sh.head_dim, num_kv_splits, torch.bfloat16,
                                      self.q.device, kw.pop("reduce_in_fp32", False))
        chunks = [slice(i, i + batch) for i in range(0, self.max_batch - batch + 1, batch)]
        # own tensor per chunk: a slice at an odd int32 offset would be a new (unaligned) specialisation
        lens = [self.seq_lens[c].clone() for c in chunks]

        def run():
            for c, seq_lens in zip(chunks, lens):
                decode_attention(self.q[c], self.kp, self.vp, self.table[c], seq_lens, sh.head_dim ** -0.5,
                                 num_kv_splits=num_kv_splits, out=self.out[c], workspace=ws, **kw)
        return run, len(chunks)

    def fn_rope(self, batch: int, num_kv_splits: int, fused: bool):
        """Decode with the step's rotary + K/V store: inside the split kernel (``DecodeRope``), or
        ``rope_store_kv`` then decode attention (the path before), per chunk of the pool."""
        from pdserve.kernels.decode_attention import DecodeRope, DecodeWorkspace, decode_attention
        from pdserve.kernels.rope_store import rope_store_kv
        from pdserve.kernels.rotary import build_cos_sin_cache, rope_inv_freq
        sh, dev = self.sh, self.q.device
        ws = DecodeWorkspace.allocate(batch, sh.num_q_heads, sh.head_dim, num_kv_splits, torch.bfloat16, dev)
        cache = build_cos_sin_cache(rope_inv_freq(sh.head_dim, 500000.0), self.ctx, dev)
        chunks = [slice(i, i + batch) for i in range(0, self.max_batch - batch + 1, batch)]
        kv = torch.randn(self.max_batch, 2, sh.num_kv_heads, sh.head_dim, device=dev).to(torch.bfloat16)
        last = self.ctx - 1
        loc = (self.table[:, last // sh.page_size].long() * sh.page_size + last % sh.page_size)
        pos = torch.full((self.max_batch,), last, dtype=torch.int64, device=dev)
        args = [(self.q[c], kv[c, 0], kv[c, 1], pos[c].clone(), loc[c].clone(), self.table[c], self.seq_lens[c].clone())
                for c in chunks]

        def run():
            for c, (q, k, v, p, slots, table, lens) in zip(chunks, args):
                rope = DecodeRope(k, v, p, cache, slots) if fused else None
                if not fused:
                    rope_store_kv(q, k, v, p, cache, self.kp, self.vp, slots)
                decode_attention(q, self.kp, self.vp, table, lens, sh.head_dim ** -0.5, num_kv_splits=num_kv_splits,
                                 out=self.out[c], workspace=ws, rope=rope)
        return run, len(chunks)

    def measure(self, batch: int, num_kv_splits: int, **kw) -> tuple[float, float]:
        """-> (us per decode call, GB/s of K/V + q + out traffic)."""
        run, calls = self.fn(batch, num_kv_splits, **kw)
        us = gpu_time_us(run, reps=2 if calls > 16 else 8) / calls
        sh = self.sh
        nbytes = 2 * (batch * self.ctx * sh.num_kv_heads * sh.head_dim * 2 + 2 * batch * sh.num_q_heads * sh.head_dim)
        return us, nbytes / us / 1e3


def _compiled_variants(kernel) -> int | None:
    """How many specialisations Triton compiled for ``kernel`` on this GPU (None if unknown)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches or not torch.cuda.is_available():
        return None
    entry = caches.get(torch.cuda.current_device())
    return len(entry[0]) if entry else None


def bench_decode(res: Results, sh: Shapes, device) -> None:
    from pdserve.kernels import decode_attention as mod
    from pdserve.kernels.backend import kv_splits_for
    bench = DecodeBench(sh, max(sh.bench_batches), device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else None
    print(f"\n== paged decode attention: {sh.num_q_heads}q/{sh.num_kv_heads}kv heads, D={sh.head_dim}, "
          f"page {sh.page_size}, ctx {sh.bench_ctx}, bf16, splits as the engine picks them (max 32) ==")
    print(f"  {'batch':>5} {'splits':>6} {'us/layer':>10} {'GB/s':>8} {'% of copy':>10}  (copy measured: "
          f"{peak_gbps():.0f} GB/s)")
    before = None
    for b in sh.bench_batches:
        splits = kv_splits_for(b, sh.num_kv_heads, 32, sms)
        us, gbps = bench.measure(b, splits)
        before = _compiled_variants(mod._decode_split_kernel) if before is None else before
        print(f"  {b:>5} {splits:>6} {us:>10.1f} {gbps:>8.0f} {100 * gbps / peak_gbps():>9.1f}%", flush=True)
    after = _compiled_variants(mod._decode_split_kernel)
    if after is not None:
        res.flag("decode: no recompile across batch sizes (one variant per split count)", after <= before + 3,
                 f"{after} variant(s)")
    print("  with the step's rotary + K/V store, us/layer (rope_store_kv + decode -> decode with DecodeRope):")
    for b in sh.bench_batches:
        splits = kv_splits_for(b, sh.num_kv_heads, 32, sms)
        times = []
        for fused in (False, True):
            run, calls = bench.fn_rope(b, splits, fused)
            times.append(gpu_time_us(run, reps=2 if calls > 16 else 8) / calls)
        print(f"  {b:>5} {splits:>6} {times[0]:>10.1f} -> {times[1]:.1f}", flush=True)
    print("  sweep (batch: splits/block_n/warps/stages -> us, GB/s):")
    middle = sh.bench_batches[1:-1]  # the real shapes: batch 8 and 64
    sweeps = {sh.bench_batches[0]: [(8, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2), (64, 32, 2, 2),
                                    (32, 64, 4, 3), (32, 128, 4, 2)],
              **({middle[0]: [(4, 64, 4, 2), (8, 64, 4, 2), (16, 64, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2),
                              (16, 64, 4, 3)],
                  middle[-1]: [(1, 64, 4, 2), (2, 64, 4, 2), (4, 64, 4, 2), (8, 64, 4, 2)]} if middle else {}),
              sh.bench_batches[-1]: [(8, 64, 4, 2), (8, 64, 4, 3), (8, 128, 4, 2), (8, 128, 8, 3), (4, 64, 4, 2),
                                     (2, 64, 4, 2), (1, 64, 4, 2), (2, 128, 4, 3), (4, 128, 8, 2), (8, 32, 4, 3)]}
    for b, configs in sweeps.items():
        cells = []
        for splits, block_n, warps, stages in configs if torch.cuda.is_available() else configs[:2]:
            try:
                us, gbps = bench.measure(b, splits, block_n=block_n, num_warps=warps, num_stages=stages)
                cells.append(f"{splits}/{block_n}/{warps}/{stages}: {us:.1f}us {gbps:.0f}")
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for one config
                cells.append(f"{splits}/{block_n}/{warps}/{stages}: {type(e).__name__}")
        print(f"  B={b}: " + " | ".join(cells), flush=True)


def _extend_inputs(sh: Shapes, new: int, prefix: int, device):
    num_pages = -(-prefix // sh.page_size) + 1
    _, kp, vp = _pool_views(num_pages, sh.num_kv_heads, sh, torch.bfloat16, device)
    table = _page_table([prefix], sh.page_size, num_pages, device)
    q = torch.randn(new, sh.num_q_heads, sh.head_dim, device=device).to(torch.bfloat16)
    k, v = torch.randn(2, new, sh.num_kv_heads, sh.head_dim, device=device).to(torch.bfloat16)
    q_starts = torch.tensor([0, new], dtype=torch.int32, device=device)
    prefix_lens = torch.tensor([prefix], dtype=torch.int32, device=device)
    return q, k, v, kp, vp, table, q_starts, prefix_lens


def _extend_tflops(sh: Shapes, new: int, prefix: int, us: float) -> float:
    pairs = new * prefix + new * (new + 1) / 2  # causal (query, key) pairs
    return 4 * sh.num_q_heads * sh.head_dim * pairs / us / 1e6


def _sdpa_us(q, k, v) -> str:
    """torch's own causal SDPA (FlashAttention on H200) on the same no-prefix problem, for scale."""
    try:
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, N, D]
        us = gpu_time_us(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                                  enable_gqa=True))
        return f"{us:.1f}"
    except Exception as e:  # noqa: BLE001 - a reference number only
        return type(e).__name__


def bench_extend(res: Results, sh: Shapes, device) -> None:
    from pdserve.kernels.extend_attention import extend_attention
    print("\n== extend attention (one sequence, causal), bf16, default blocks ==")
    print(f"  {'new':>5} {'prefix':>6} {'us':>9} {'TFLOP/s':>8} {'% of peak':>9} {'torch sdpa us':>14}  (matmul "
          f"measured: {peak_tflops():.0f} TFLOP/s)")
    for new, prefix in sh.bench_extend:
        args = _extend_inputs(sh, new, prefix, device)
        out = torch.empty_like(args[0])
        us = gpu_time_us(lambda: extend_attention(*args, new, sh.head_dim ** -0.5, out=out))
        tf = _extend_tflops(sh, new, prefix, us)
        sdpa = _sdpa_us(*args[:3]) if prefix == 0 else "-"
        print(f"  {new:>5} {prefix:>6} {us:>9.1f} {tf:>8.1f} {100 * tf / peak_tflops():>8.1f}% {sdpa:>14}", flush=True)
    new, prefix = max(sh.bench_extend)
    args = _extend_inputs(sh, new, prefix, device)
    out = torch.empty_like(args[0])
    configs = [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
    cells = []
    for bm, bn, warps, stages in configs if torch.cuda.is_available() else [(16, 16, 4, 1)]:
        try:
            us = gpu_time_us(lambda: extend_attention(*args, new, sh.head_dim ** -0.5, out=out, block_m=bm,
                                                      block_n=bn, num_warps=warps, num_stages=stages))
            cells.append(f"{bm}/{bn}/{warps}/{stages}: {_extend_tflops(sh, new, prefix, us):.0f}")
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for one config
            cells.append(f"{bm}/{bn}/{warps}/{stages}: {type(e).__name__}")
    print(f"  sweep at {new} new (block_m/block_n/warps/stages -> TFLOP/s): " + " | ".join(cells), flush=True)


def run_benchmarks(res: Results, sh: Shapes, device) -> None:
    res.guard("decode benchmark", bench_decode, res, sh, device)
    res.guard("extend benchmark", bench_extend, res, sh, device)
