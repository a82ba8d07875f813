"""Decode GEMMs of Llama-3.1-8B at small batch: cuBLAS (what the engine runs) against
torch.compile's max-autotune choice, as weight bandwidth (the decode floor's assumption).

    python scripts/gpu/gemv_bench.py [--batches 1,8] [--skip-compile]

Two questions: can --enable-torch-compile make the batch-1 step (87% GEMM time) faster, and does
pdserve's skinny Triton GEMM (pdserve/kernels/skinny_gemm.py) beat cuBLAS, per shape? The skinny
kernel is swept over (block_n, block_k, warps, stages); the best is printed, and checked against
cuBLAS's output.
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
    from pdserve.kernels.skinny_gemm import pick_block_n, skinny_gemm
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'shape':<8} {'batch':>5} {'cuBLAS us':>10} {'TB/s':>6} {'compiled us':>12} {'TB/s':>6} "
          f"{'skinny us':>10} {'TB/s':>6}  best skinny config (block_n/block_k/warps/stages); default")
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
            ref = F.linear(x, w)
            best, cfg = float("inf"), None
            auto = pick_block_n(n, sms)
            for bn in sorted({auto, 16, 32, 64}):
                for bk, warps, stages in ((256, 4, 4), (128, 4, 4), (512, 4, 3), (256, 8, 4), (256, 4, 6)):
                    try:
                        out = skinny_gemm(x, w, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                        torch.testing.assert_close(out, ref, atol=0.5, rtol=0.05)
                        t = gpu_us(lambda: skinny_gemm(x, w, out, block_n=bn, block_k=bk, num_warps=warps,
                                                       num_stages=stages))
                    except Exception as e:  # noqa: BLE001
                        print(f"  skinny {bn}/{bk}/{warps}/{stages} failed: {type(e).__name__}: {e}"[:200],
                              file=sys.stderr)
                        continue
                    if t < best:
                        best, cfg = t, (bn, bk, warps, stages)
            default = gpu_us(lambda: skinny_gemm(x, w))
            print(f"{name:<8} {b:>5} {eager:>10.1f} {nbytes / eager / 1e6:>6.2f} {comp:>12.1f} "
                  f"{nbytes / comp / 1e6:>6.2f} {best:>10.1f} {nbytes / best / 1e6:>6.2f}  {cfg}; "
                  f"default {default:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
