"""Host-side (Python) cost of one eager forward: cProfile of ``runner.forward`` for a prefill.

    python scripts/gpu/host_profile.py --tokens 1024

The GPU idles whenever the host launches kernels slower than they run (prefill of 1k tokens on
an H200: ~21 ms of kernels in ~36 ms, scripts/gpu/decode_profile.py); this shows where.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine_bench import write_model_dir  # noqa: E402
from pdserve_timing import make_runner  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    from pdserve.runtime.forward import SeqChunk
    with tempfile.TemporaryDirectory() as tmp:
        runner = make_runner(write_model_dir(Path(tmp), args.model), "cuda", "bfloat16", args.tokens + 64,
                             args.tokens + 64, 1)
        seq = [SeqChunk("p", list(range(1, args.tokens + 1)), 0, list(range(-(-args.tokens // 16))))]
        for _ in range(3):
            runner.forward(seq)
        torch.cuda.synchronize()
        enqueue_vs_gpu(runner, seq)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            runner.forward(seq)
        torch.cuda.synchronize()
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"total per forward: {stats.total_tt / 5 * 1e3:.1f} ms host")
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


def enqueue_vs_gpu(runner, seq, reps: int = 7) -> None:
    """Host time to queue one forward (no profiler; the queue starts empty) beside its GPU time
    (events around it): host-bound when the first is not well below the second."""
    import statistics
    import time
    host, gpu = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        runner.forward(seq)
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    print(f"one forward: host enqueue {statistics.median(host):.2f} ms (min {min(host):.2f}), "
          f"GPU start-to-end {statistics.median(gpu):.2f} ms (min {min(gpu):.2f}), median of {reps}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
