"""Decode GEMMs of Llama-3.1-8B at small batch: cuBLAS (what the engine runs) against
torch.compile's max-autotune choice, as weight bandwidth (the decode floor's assumption).

    python scripts/gpu/gemv_bench.py [--batches 1,8] [--skip-compile]
    python scripts/gpu/gemv_bench.py --fused     # batch 1: pdserve's fused GEMV, sweep + layer chain

Answers: can --enable-torch-compile (inductor's max-autotune GEMM choice) make the batch-1 step,
87% weight GEMMs, faster? Timed inside a CUDA graph (as the engine decodes), cycling through
weight copies so no call finds its weight in L2. (A split-K Triton GEMV measured the same way was
at parity with cuBLAS except the LM head, +3.5%: commit "split-K decode GEMV", removed after.)
Each rate is also given as a fraction of the copy rate measured on the card at the start
(scripts/gpu/floors.py), the floor a weight-streaming GEMV can reach.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from floors import floors_for  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}


def gpu_us(fn, ws: list[torch.Tensor], reps: int = 48) -> float:
    """GPU time per ``fn(w)`` call, from ``reps`` calls captured in one CUDA graph (as the engine
    runs decode: host launch overhead, which would dominate a 15 us kernel, is not measured),
    cycling through the weight copies ``ws`` so that no call finds its weight in L2."""
    for w in ws[:3]:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(ws[i % len(ws)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--blas-variants", action="store_true",
                    help="F.linear through cuBLAS and cuBLASLt, and W @ x (the other operand order) instead")
    ap.add_argument("--fused", action="store_true",
                    help="pdserve.kernels.gemv: tiling sweep per shape, then a layer's GEMM chain fused vs unfused")
    args = ap.parse_args()
    copy_tb_s = floors_for("cuda").copy_tb_s  # printed once: "floors: ..."
    if args.fused:
        from gemv_fused_bench import fused_main
        return fused_main(SHAPES, gpu_us)
    if args.blas_variants:
        return blas_variants([int(x) for x in args.batches.split(",")], copy_tb_s)
    print(f"{'shape':<8} {'batch':>5} {'cuBLAS us':>10} {'TB/s':>6} {'of copy':>7} {'compiled us':>12} {'TB/s':>6}")
    for b in (int(x) for x in args.batches.split(",")):
        for name, (k, n) in SHAPES.items():
            nbytes = n * k * 2
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, -(-400 << 20) // nbytes))]
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            eager = gpu_us(lambda w: F.linear(x, w), ws)
            comp = float("nan")
            if not args.skip_compile:
                torch._dynamo.reset()
                f = torch.compile(lambda a, bw: F.linear(a, bw), mode="max-autotune-no-cudagraphs", dynamic=False)
                try:
                    comp = gpu_us(lambda w: f(x, w), ws)
                except Exception as e:  # noqa: BLE001
                    print(f"  compile failed for {name}: {type(e).__name__}: {e}", file=sys.stderr)
            print(f"{name:<8} {b:>5} {eager:>10.1f} {nbytes / eager / 1e6:>6.2f} "
                  f"{nbytes / eager / 1e6 / copy_tb_s:>7.1%} {comp:>12.1f} {nbytes / comp / 1e6:>6.2f}", flush=True)
            del ws
    return 0


def blas_variants(batches: list[int], copy_tb_s: float) -> int:
    """The same GEMMs through the library paths torch offers: is any faster at batch 1 than the
    engine's ``F.linear`` (cuBLAS, x W^T)?"""
    print(f"{'shape':<8} {'batch':>5} {'cuBLAS':>8} {'cuBLASLt':>9} {'W @ x^T':>8}  (us; TB/s; of the measured "
          f"{copy_tb_s:.2f} TB/s copy)")
    for b in batches:
        for name, (k, n) in SHAPES.items():
            nbytes = n * k * 2
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, -(-400 << 20) // nbytes))]
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            times = []
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                times.append(gpu_us(lambda w: F.linear(x, w), ws))
            torch.backends.cuda.preferred_blas_library("cublas")
            xt = x.t().contiguous()
            times.append(gpu_us(lambda w: torch.mm(w, xt), ws))
            cells = "  ".join(f"{t:6.1f} {nbytes / t / 1e6:4.2f} {nbytes / t / 1e6 / copy_tb_s:4.0%}" for t in times)
            print(f"{name:<8} {b:>5}  {cells}", flush=True)
            del ws
    return 0


if __name__ == "__main__":
    sys.exit(main())
