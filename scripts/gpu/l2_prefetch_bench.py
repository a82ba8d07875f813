"""Can the next GEMM's weight be pulled into L2 while the small kernels run? (H200, batch-1 decode)

    python scripts/gpu/l2_prefetch_bench.py

At batch 1 a Llama-3.1-8B layer runs rotary/store + decode attention (~9 us, reading ~8 MB of KV)
between the QKV and O GEMMs, and the O GEMM (4096 x 4096, 33.5 MB) reads its weight at only
~2.6 TB/s. If the attention window fetched W_o into L2 (50 MB) with idle HBM bandwidth, the O
GEMM would read it from L2. Everything below is timed inside CUDA graphs; eight weight copies
are cycled so nothing is left in L2 from the previous iteration:

    baseline:  attention, O GEMM
    prefetch:  prefetch(W_o) [bulk L2 prefetch, or plain loads], attention, O GEMM

and the O GEMM alone after a prefetch (the best case). Prints us per (attention + GEMM) pair.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

COPIES = 8


@triton.jit
def _bulk_prefetch_kernel(base_ptr, nbytes, CHUNK: tl.constexpr, PER_PROG: tl.constexpr):
    """Each lane asks the TMA unit to bring one CHUNK-byte piece into L2 (fire and forget)."""
    offs = (tl.program_id(0) * PER_PROG + tl.arange(0, PER_PROG)).to(tl.int64) * CHUNK
    size = tl.minimum(nbytes - offs, CHUNK).to(tl.int32)
    size = tl.where(offs < nbytes, size, 0)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [(base_ptr + offs).to(tl.int64), size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _touch_kernel(ptr, n, sink_ptr, BLOCK: tl.constexpr):
    """Plain loads (kept in L2: evict_last), summed so they are not optimised away."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")  # (.cg with it: ptxas refuses)
    total = tl.sum(x.to(tl.float32), 0)
    if total == 1.2345e30:
        tl.store(sink_ptr, total)


def bulk_prefetch(w: torch.Tensor, chunk: int = 64 * 1024, per_prog: int = 32) -> None:
    nbytes = w.numel() * w.element_size()
    grid = (triton.cdiv(triton.cdiv(nbytes, chunk), per_prog),)
    _bulk_prefetch_kernel[grid](w.view(torch.uint8), nbytes, CHUNK=chunk, PER_PROG=per_prog, num_warps=1)


def touch(w: torch.Tensor, sink: torch.Tensor, block: int = 8192) -> None:
    flat = w.view(-1)
    _touch_kernel[(triton.cdiv(flat.numel(), block),)](flat, flat.numel(), sink, BLOCK=block, num_warps=8)


def graph_us(fn, reps: int = 20) -> float:
    """us per call of ``fn`` (which runs COPIES pairs), captured once, replayed ``reps`` times."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / COPIES


def batch1_attention(dev: torch.device, dt: torch.dtype):
    """Batch-1 decode attention over 2k tokens, 32 q / 8 kv heads, page 16, its own KV per copy:
    -> ``attn(i)`` running it on copy i."""
    from pdserve.kernels.decode_attention import DecodeWorkspace, decode_attention
    pages = 128
    kv = [torch.randn(2, pages, 16, 8, 128, device=dev, dtype=dt) for _ in range(COPIES)]
    table = torch.arange(pages, device=dev, dtype=torch.int32)[None]
    lens = torch.tensor([2048], device=dev, dtype=torch.int32)
    q = torch.randn(1, 32, 128, device=dev, dtype=dt)
    work = DecodeWorkspace.allocate(1, 32, 128, 32, dt, dev)
    return lambda i: decode_attention(q, kv[i][0], kv[i][1], table, lens, 0.088, num_kv_splits=32, workspace=work)


def main() -> int:
    from pdserve.kernels.gemv import fused_gemv

    dev, dt = torch.device("cuda"), torch.bfloat16
    ws = [torch.randn(4096, 4096, device=dev, dtype=dt) for _ in range(COPIES)]
    x = torch.randn(1, 4096, device=dev, dtype=dt)
    sink = torch.zeros(1, device=dev)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    attn, side = batch1_attention(dev, dt), torch.cuda.Stream()
    matmuls = {"gemm": lambda w: torch.nn.functional.linear(x, w), "gemv": lambda w: fused_gemv(x, w), None: None}

    def run(prefetch=None, with_attn=True, matmul="gemm", concurrent=False):
        def fn():
            flush.zero_()  # evicts everything from L2 once per replay
            main = torch.cuda.current_stream()
            for i in range(COPIES):
                if prefetch is not None and concurrent:  # beside the attention, on idle bandwidth
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        prefetch(ws[i])
                elif prefetch is not None:
                    prefetch(ws[i])
                if with_attn:
                    attn(i)
                if concurrent:
                    main.wait_stream(side)
                if matmuls[matmul] is not None:
                    matmuls[matmul](ws[i])
        return fn

    touch_w = lambda w: touch(w, sink)  # noqa: E731
    rows = [("attention + O GEMM", run()),
            ("bulk L2 prefetch, attention, O GEMM", run(bulk_prefetch)),
            ("plain-load prefetch, attention, O GEMM", run(touch_w)),
            ("O GEMM alone", run(with_attn=False)),
            ("bulk L2 prefetch, O GEMM (no attention)", run(bulk_prefetch, with_attn=False)),
            ("attention + O GEMV (pdserve)", run(matmul="gemv")),
            ("O GEMV alone", run(with_attn=False, matmul="gemv")),
            ("bulk L2 prefetch, O GEMV (no attention)", run(bulk_prefetch, with_attn=False, matmul="gemv")),
            ("plain-load prefetch, O GEMV (no attention)", run(touch_w, with_attn=False, matmul="gemv")),
            ("bulk prefetch || attention, O GEMV", run(bulk_prefetch, matmul="gemv", concurrent=True)),
            ("plain-load prefetch || attention, O GEMV", run(touch_w, matmul="gemv", concurrent=True)),
            ("attention alone", run(matmul=None))]
    print(f"{torch.cuda.get_device_name()}: us per pair, {COPIES} weight copies cycled, L2 flushed per replay "
          f"(flush {graph_us(lambda: flush.zero_()):.1f} us per pair is included in every row)")
    for name, fn in rows:
        try:
            print(f"  {name:45s} {graph_us(fn):8.2f} us", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on (inline PTX may not assemble)
            print(f"  {name:45s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
