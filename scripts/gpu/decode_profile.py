"""Where a decode step's GPU time goes, by kernel class, against the HBM floor.

    python scripts/gpu/decode_profile.py --model llama-3.1-8b --batches 1,256

One eager decode step (same kernels as the captured graph) under torch.profiler, after warm-up:
CUDA kernel time summed per class (GEMM, attention, norm, rotary, KV store, activation, other),
the GEMMs' achieved bandwidth (weight bytes / GEMM time), and the replayed graph's step time.
The gap between the graph step and the kernel sum is launch and inter-kernel idle time.
Floors are measured on the card first (scripts/gpu/floors.py: copy rate, bf16 matmul rate);
batches whose KV pool does not fit the card's memory run at the largest graph bucket that does,
and an out-of-memory is printed as such; ``--budget-s`` bounds the whole run.
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

from engine_bench import ARCHS, write_model_dir  # noqa: E402
from floors import (Deadline, alarm, decode_floor_ms, failure_note, floors_for, plan_batches,  # noqa: E402
                    prefill_floor_ms, step_weight_bytes)
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


def print_decode(runner, cfg: dict, name: str, b: int, ctx: int, floors, note: str) -> None:
    us, count = profile_step(runner, b, ctx)
    total_us = sum(us.values())
    graph_ms = graph_step_ms(runner, b, ctx)
    floor = decode_floor_ms(cfg, 2, b, ctx, floors)
    print(f"\n{name} decode bs={b} ctx={ctx}: graph step {graph_ms:.3f} ms, floor {floor:.3f} ms "
          f"({floor / graph_ms:.1%} of the measured floor, {graph_ms / floor:.3f}x), kernels sum "
          f"{total_us / 1e3:.3f} ms, idle/launch {graph_ms - total_us / 1e3:.3f} ms" + (f" [{note}]" if note else ""))
    print(f"  {'class':<11} {'ms':>7} {'share':>6} {'kernels':>7}")
    for cls, t in sorted(us.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:<11} {t / 1e3:7.3f} {t / total_us:6.1%} {count[cls]:7d}")
    if us.get("gemm"):
        rate = step_weight_bytes(cfg, 2) / (us["gemm"] * 1e-6)
        print(f"  GEMM weight bandwidth: {rate / 1e12:.2f} TB/s ({rate / floors.copy_bytes_per_s:.0%} of the "
              f"measured {floors.copy_tb_s:.2f} TB/s)")


def print_prefill(runner, cfg: dict, name: str, n: int, graph: bool, floors) -> None:
    us, count, wall = profile_prefill(runner, n, graph)
    total_us = sum(us.values())
    floor = prefill_floor_ms(cfg, n, floors)
    print(f"\n{name} prefill {n} ({'graph' if graph else 'eager'}): {wall:.2f} ms (median of 5) = {floor / wall:.1%} "
          f"MFU of the measured {floors.matmul_tflops:.0f} TFLOP/s, kernels sum {total_us / 1e3:.2f} ms, "
          f"idle/host {wall - total_us / 1e3:.2f} ms")
    for cls, t in sorted(us.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:<11} {t / 1e3:7.3f} {t / total_us:6.1%} {count[cls]:7d}")


def run(args) -> int:
    cfg = ARCHS[args.model]
    floors = floors_for("cuda")
    prefills = [int(p) for p in args.prefill.split(",") if p]
    plans = plan_batches(cfg, 2, [int(b) for b in args.batches.split(",")], args.ctx + 32, floors.total_bytes)
    for plan in plans:
        if plan.note:
            print(f"sizing: {plan.note}")
    batches = [(p.batch, p.note) for p in plans if p.batch]
    if not batches:
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp), args.model)
        total = max(max(b for b, _ in batches) * (args.ctx + 32), max(prefills, default=0) + 64)
        runner = make_runner(model_dir, "cuda", "bfloat16", total, max([args.ctx, *prefills]) + 64,
                             max(b for b, _ in batches), disable_fused_gemv=args.disable_fused_gemv)
        for b, note in batches:
            print_decode(runner, cfg, args.model, b, args.ctx, floors, note)
        for n, graph in ((n, g) for n in prefills for g in ((True, False) if runner.prefill_graphs else (False,))):
            print_prefill(runner, cfg, args.model, n, graph, floors)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--disable-fused-gemv", action="store_true", help="batch 1 through cuBLAS + separate kernels")
    ap.add_argument("--prefill", default="", help="also profile prefills of these lengths, e.g. 1024,4096")
    ap.add_argument("--budget-s", type=int, default=300, help="the whole run; past it, what is left is not run")
    args = ap.parse_args()
    try:
        with alarm(args.budget_s):
            return run(args)
    except Deadline:
        print(f"\nTIMEOUT: over --budget-s {args.budget_s}; the sections above finished")
        return 1
    except Exception as e:
        print(f"\n{failure_note(e)}")
        raise


if __name__ == "__main__":
    sys.exit(main())
