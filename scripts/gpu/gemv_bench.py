"""Decode GEMMs of Llama-3.1-8B at small batch: cuBLAS (what the engine runs) against
torch.compile's max-autotune choice, as weight bandwidth (the decode floor's assumption).

    python scripts/gpu/gemv_bench.py [--batches 1,8] [--skip-compile]

Answers: can --enable-torch-compile (inductor's max-autotune GEMM choice) make the batch-1 step,
87% weight GEMMs, faster? (A skinny Triton GEMM without split-K was also tried: 2x slower than
cuBLAS on QKV/O/down; see docs/benchmarks.md and the commit that removed it.)
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HBM = 4.3e12
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}


def gpu_us(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    print(f"{'shape':<8} {'batch':>5} {'cuBLAS us':>10} {'TB/s':>6} {'compiled us':>12} {'TB/s':>6}")
    for b in (int(x) for x in args.batches.split(",")):
        for name, (k, n) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            nbytes = w.numel() * 2
            eager = gpu_us(lambda: F.linear(x, w))
            comp = float("nan")
            if not args.skip_compile:
                torch._dynamo.reset()
                f = torch.compile(lambda a, bw: F.linear(a, bw), mode="max-autotune-no-cudagraphs", dynamic=False)
                try:
                    comp = gpu_us(lambda: f(x, w))
                except Exception as e:  # noqa: BLE001
                    print(f"  compile failed for {name}: {type(e).__name__}: {e}", file=sys.stderr)
            print(f"{name:<8} {b:>5} {eager:>10.1f} {nbytes / eager / 1e6:>6.2f} {comp:>12.1f} "
                  f"{nbytes / comp / 1e6:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
