"""Where a decode step's GPU time goes, by kernel class, against the HBM floor.

    python scripts/gpu/decode_profile.py --model llama-3.1-8b --batches 1,256

One eager decode step (same kernels as the captured graph) under torch.profiler, after warm-up:
CUDA kernel time summed per class (GEMM, attention, norm, rotary, KV store, activation, other),
the GEMMs' achieved bandwidth (weight bytes / GEMM time), and the replayed graph's step time.
The gap between the graph step and the kernel sum is launch and inter-kernel idle time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine_bench import (ARCHS, HBM_BYTES_PER_S, decode_floor_ms, param_counts, prefill_floor_ms,  # noqa: E402
                          write_model_dir)
from pdserve_timing import make_runner, page_tables  # noqa: E402

CLASSES = (("attention", ("decode_split", "decode_reduce", "extend")), ("kv store", ("store_kv", "kv_store")),
           ("norm", ("rmsnorm",)), ("rotary", ("rotary", "rope_store")), ("activation", ("silu",)),
           ("gemm", ("gemm", "gemv", "sm90", "cutlass", "cublas", "nvjet", "splitk")))


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_step(runner, batch: int, ctx: int) -> tuple[dict[str, float], dict[str, int]]:
    from pdserve.runtime.forward import SeqChunk
    page = runner.layout.page_size
    tables = page_tables(batch, -(-(ctx + 8) // page))
    seqs = [SeqChunk(f"r{i}", [1], ctx, tables[i]) for i in range(batch)]
    graphs, runner.graphs = runner.graphs, None
    for _ in range(3):
        runner.forward(seqs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.forward(seqs)
        torch.cuda.synchronize()
    runner.graphs = graphs
    us, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[classify(ev.name)] += ev.device_time_total
            count[classify(ev.name)] += 1
    return dict(us), dict(count)


def profile_prefill(runner, tokens: int, graph: bool) -> tuple[dict[str, float], dict[str, int], float]:
    """Kernel time by class of one prefill of ``tokens`` tokens, replayed from a prefill graph or
    eager (then the host's share shows as idle), and its wall ms (median of 5)."""
    from pdserve.runtime.forward import SeqChunk
    seq = [SeqChunk("p", torch.randint(0, runner.vocab_size, (tokens,)).tolist(), 0,
                    list(range(-(-tokens // runner.layout.page_size))))]
    prefill_graphs = runner.prefill_graphs
    if not graph:
        runner.prefill_graphs = None
    for _ in range(2):
        runner.forward(seq)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        runner.forward(seq)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.forward(seq)
        torch.cuda.synchronize()
    us, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[classify(ev.name)] += ev.device_time_total
            count[classify(ev.name)] += 1
    runner.prefill_graphs = prefill_graphs
    return dict(us), dict(count), sorted(times)[2]


def graph_step_ms(runner, batch: int, ctx: int, steps: int = 30) -> float:
    from pdserve.runtime.forward import SeqChunk
    page = runner.layout.page_size
    tables = page_tables(batch, -(-(ctx + 8) // page))
    seqs = [SeqChunk(f"r{i}", [1], ctx, tables[i]) for i in range(batch)]
    for _ in range(3):
        runner.forward(seqs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        runner.forward(seqs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--disable-fused-gemv", action="store_true", help="batch 1 through cuBLAS + separate kernels")
    ap.add_argument("--prefill", default="", help="also profile prefills of these lengths, e.g. 1024,4096")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = ARCHS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp), args.model)
        prefills = [int(p) for p in args.prefill.split(",") if p]
        total = max(max(batches) * (args.ctx + 32), max(prefills, default=0) + 64)
        runner = make_runner(model_dir, "cuda", "bfloat16", total, max([args.ctx, *prefills]) + 64, max(batches),
                             disable_fused_gemv=args.disable_fused_gemv)
        layers, embed, head = param_counts(cfg)
        weight_bytes = (layers + (head or embed)) * 2  # bf16 layer weights + LM head
        for b in batches:
            us, count = profile_step(runner, b, args.ctx)
            total_us = sum(us.values())
            graph_ms = graph_step_ms(runner, b, args.ctx)
            floor = decode_floor_ms(cfg, torch.bfloat16, b, args.ctx)
            print(f"\n{args.model} decode bs={b} ctx={args.ctx}: graph step {graph_ms:.3f} ms, floor {floor:.3f} ms "
                  f"({floor / graph_ms:.1%}), kernels sum {total_us / 1e3:.3f} ms, "
                  f"idle/launch {graph_ms - total_us / 1e3:.3f} ms")
            print(f"  {'class':<11} {'ms':>7} {'share':>6} {'kernels':>7}")
            for cls, t in sorted(us.items(), key=lambda kv: -kv[1]):
                print(f"  {cls:<11} {t / 1e3:7.3f} {t / total_us:6.1%} {count[cls]:7d}")
            if us.get("gemm"):
                print(f"  GEMM weight bandwidth: {weight_bytes / (us['gemm'] * 1e-6) / 1e12:.2f} TB/s "
                      f"({weight_bytes / (us['gemm'] * 1e-6) / HBM_BYTES_PER_S:.0%} of {HBM_BYTES_PER_S / 1e12} TB/s)")
        for n, graph in ((n, g) for n in prefills for g in ((True, False) if runner.prefill_graphs else (False,))):
            us, count, wall = profile_prefill(runner, n, graph)
            total_us = sum(us.values())
            floor = prefill_floor_ms(cfg, n)
            print(f"\n{args.model} prefill {n} ({'graph' if graph else 'eager'}): {wall:.2f} ms (median of 5) = {floor / wall:.1%} MFU, kernels sum "
                  f"{total_us / 1e3:.2f} ms, idle/host {wall - total_us / 1e3:.2f} ms")
            for cls, t in sorted(us.items(), key=lambda kv: -kv[1]):
                print(f"  {cls:<11} {t / 1e3:7.3f} {t / total_us:6.1%} {count[cls]:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
