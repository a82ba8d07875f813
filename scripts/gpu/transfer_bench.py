"""KV transfer benchmark: KVSender -> KVReceiver between two processes, against torch copy_.

    python scripts/gpu/transfer_bench.py                    # 2 GPUs: prefill on cuda:0, decode on cuda:1
    python scripts/gpu/transfer_bench.py --device cpu       # same code path, DRAM to DRAM

Default shape: Llama-3.1-8B KV (32 layers, 8 kv heads, head_dim 128, bf16, page 16), 2,048
tokens = 128 pages of 2 MiB = 256 MiB per transfer. Destination patterns show coalescing:
``contiguous`` (1 run), ``runs8`` (runs of 8 pages, 16 runs), ``scattered`` (every other page,
one run per page). Each (pattern, xfer mode) gets warm-up reps, then --reps timed reps; the first
timed rep of each is checked page by page (sha1 of the decode pages == the prefill pages).
Timing is the sender's busy time (first write posted -> NIXL reports DONE, polled in a tight
loop); e2e adds the ZMQ KVDest hop and the completion notification. copy_ is one contiguous
copy of the same bytes from the prefill device to the decode device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time

import torch

PATTERNS = ("contiguous", "runs8", "scattered")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--src-gpu", type=int, default=0, help="prefill GPU (cuda)")
    p.add_argument("--dst-gpu", type=int, default=1, help="decode GPU (cuda)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--modes", default="prepped,descs", help="NIXL request modes (see nixl_backend.py)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up on the whole run after this")
    return p.parse_args(argv)


def layout_of(a):
    from pdserve.runtime.kv_pool import KVLayout
    return KVLayout(num_layers=a.layers, num_kv_heads=a.kv_heads, head_dim=a.head_dim,
                    page_size=a.page_size, dtype=a.dtype)


def num_pages(a) -> int:
    return -(-a.tokens // a.page_size)


def dst_pattern(name: str, n: int) -> list[int]:
    """Decode pages for n prefill pages (prefill side is always pages 0..n-1, one run)."""
    if name == "contiguous":
        return list(range(n))
    if name == "runs8":
        return [(i // 8) * 16 + i % 8 for i in range(n)]     # 8 pages, a gap of 8, ...
    if name == "scattered":
        return list(range(0, 2 * n, 2))
    raise ValueError(name)


def device_for(a, role: str) -> torch.device:
    if a.device == "cpu":
        return torch.device("cpu")
    gpu = a.src_gpu if role == "prefill" else a.dst_gpu
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def page_sha(pool, pages) -> list[str]:
    return [hashlib.sha1(pool.page_view(p).cpu().numpy().tobytes()).hexdigest() for p in pages]


def transfer_config():
    from pdserve.config import TransferConfig
    return TransferConfig(heartbeat_interval_s=0.5, peer_timeout_s=10.0, transfer_timeout_s=600.0)


# -- prefill process: answer every DestReady with one write of pages 0..n-1 and finish() ---------
def prefill_proc(a, plan: dict, out: mp.Queue, stop: mp.Event) -> None:
    try:
        from pdserve.runtime.kv_pool import KVPool
        from pdserve.transfer import DestReady, KVSender
        dev = device_for(a, "prefill")
        n = num_pages(a)
        pool = KVPool(n + 1, layout_of(a), device=dev)
        torch.manual_seed(0)
        pool.buffer.normal_()
        sender = KVSender(pool, "bench", transfer_config(), "127.0.0.1", capture_telemetry=True)
        out.put(("ready", sender.bootstrap_endpoint, page_sha(pool, range(n))))
        src = list(range(n))
        while not stop.is_set():
            events = sender.poll()
            for e in events:
                if isinstance(e, DestReady):
                    sender.xfer_mode = plan[e.transfer_id]
                    sender.write(e.transfer_id, src, 0)
                    sender.finish(e.transfer_id, b"tok")
            if not events:
                time.sleep(0.0001 if a.device == "cpu" else 0)   # yield the GIL to the I/O thread
        sender.close()
    except BaseException as exc:  # report, don't hang the parent
        out.put(("error", "prefill", repr(exc)))
        raise


# -- decode process: one transfer at a time, verify, collect the sender's metrics --------------------
def decode_proc(a, endpoint: str, expected_sha: list[str], runs: list, out: mp.Queue) -> None:
    try:
        from pdserve.runtime.kv_pool import KVPool
        from pdserve.transfer import KVReceiver, TransferDone
        dev = device_for(a, "decode")
        n = num_pages(a)
        pool = KVPool(2 * n + 16, layout_of(a), device=dev)
        receiver = KVReceiver(pool, "bench", transfer_config(), "127.0.0.1")
        for tid, pattern, mode, verify in runs:
            dst = dst_pattern(pattern, n)
            if verify:
                pool.buffer.zero_()
                if dev.type == "cuda":
                    torch.cuda.synchronize()   # the zeros must land before the peer's copies do
            t0 = time.perf_counter()
            receiver.expect(tid, endpoint, dst)
            events = []
            while not events:
                events = receiver.poll()
                time.sleep(0)   # yield the GIL to the I/O thread
            e2e_ms = (time.perf_counter() - t0) * 1e3
            (ev,) = events
            if not isinstance(ev, TransferDone):
                raise RuntimeError(f"{tid}: {ev}")
            ok = None
            if verify:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ok = page_sha(pool, dst) == expected_sha
            m = ev.metrics
            out.put(("result", dict(tid=tid, pattern=pattern, mode=mode, e2e_ms=e2e_ms, verified=ok,
                                    kv_bytes=m.kv_bytes, descs=m.num_descriptors, nixl_descs=m.nixl_desc_count,
                                    busy_ms=m.busy_ms, setup_us=m.setup_us)))
        receiver.close()
        out.put(("done",))
    except BaseException as exc:
        out.put(("error", "decode", repr(exc)))
        raise


def torch_copy(a, nbytes: int) -> list[float]:
    """Seconds per copy_ of nbytes from the prefill device to the decode device."""
    src_dev, dst_dev = device_for(a, "prefill"), device_for(a, "decode")
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=src_dev)
    y = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize(src_dev)
            torch.cuda.synchronize(dst_dev)

    times = []
    for i in range(a.warmup + a.reps):
        sync()
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    if not torch.equal(x[:4096].cpu(), y[:4096].cpu()):
        raise RuntimeError("torch copy_ produced wrong bytes")
    return times


def make_runs(a, patterns, modes) -> list[tuple]:
    runs = []
    for pattern in patterns:
        for mode in modes:
            for i in range(a.warmup + a.reps):
                kind = "warm" if i < a.warmup else "rep"
                runs.append((f"{pattern}-{mode}-{kind}{i}", pattern, mode, i == a.warmup))
    return runs


def collect(a, runs) -> list[dict]:
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    plan = {tid: mode for tid, _, mode, _ in runs}
    prefill = ctx.Process(target=prefill_proc, args=(a, plan, out, stop), daemon=True)
    prefill.start()
    deadline = time.monotonic() + a.timeout_s
    results, decode = [], None
    try:
        msg = out.get(timeout=a.timeout_s)
        if msg[0] != "ready":
            raise RuntimeError(f"prefill process: {msg}")
        decode = ctx.Process(target=decode_proc, args=(a, msg[1], msg[2], runs, out), daemon=True)
        decode.start()
        while True:
            try:
                msg = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"timed out after {a.timeout_s:g} s with {len(results)} results") from None
            if msg[0] == "done":
                return results
            if msg[0] == "error":
                raise RuntimeError(f"{msg[1]} process failed: {msg[2]}")
            results.append(msg[1])
    finally:
        stop.set()
        for proc in (decode, prefill):
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()


def summarize(results: list[dict], copy_times: list[float], nbytes: int) -> list[dict]:
    copy_best = nbytes / min(copy_times) / 1e9
    rows = [dict(what="torch copy_", descs=1, nixl_descs=1, best_ms=min(copy_times) * 1e3,
                 median_ms=statistics.median(copy_times) * 1e3, best_gbps=copy_best,
                 median_gbps=nbytes / statistics.median(copy_times) / 1e9, ratio=1.0,
                 setup_us=0.0, e2e_ms=float("nan"), verified=True)]
    keys = sorted({(r["pattern"], r["mode"]) for r in results}, key=lambda k: (PATTERNS.index(k[0]), k[1]))
    for pattern, mode in keys:
        reps = [r for r in results if r["pattern"] == pattern and r["mode"] == mode and "-rep" in r["tid"]]
        ms = [r["busy_ms"] for r in reps]
        best, med = min(ms), statistics.median(ms)
        rows.append(dict(what=f"nixl {pattern} {mode}", descs=reps[0]["descs"], nixl_descs=reps[0]["nixl_descs"],
                         best_ms=best, median_ms=med, best_gbps=nbytes / best / 1e6,
                         median_gbps=nbytes / med / 1e6, ratio=nbytes / best / 1e6 / copy_best,
                         setup_us=statistics.median(r["setup_us"] for r in reps),
                         e2e_ms=statistics.median(r["e2e_ms"] for r in reps),
                         verified=all(r["verified"] is not False for r in reps)))
    return rows


def print_table(a, rows: list[dict], nbytes: int) -> None:
    print(f"device={a.device} tokens={a.tokens} layers={a.layers} kv_heads={a.kv_heads} head_dim={a.head_dim} "
          f"dtype={a.dtype} page={a.page_size} -> {nbytes} bytes ({nbytes / 2**20:.0f} MiB) per transfer, "
          f"{a.reps} reps (+{a.warmup} warm-up)")
    ucx = {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "NIXL_"))}
    print(f"env: {ucx or 'no UCX_/NIXL_ variables'}")
    head = f"{'what':<28}{'descs':>7}{'nixl':>6}{'best ms':>10}{'med ms':>10}{'best GB/s':>11}" \
           f"{'med GB/s':>10}{'x copy_':>9}{'setup us':>10}{'e2e ms':>9}  ok"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['what']:<28}{r['descs']:>7}{r['nixl_descs']:>6}{r['best_ms']:>10.3f}{r['median_ms']:>10.3f}"
              f"{r['best_gbps']:>11.1f}{r['median_gbps']:>10.1f}{r['ratio']:>9.2f}{r['setup_us']:>10.0f}"
              f"{r['e2e_ms']:>9.2f}  {'yes' if r['verified'] else 'NO'}")
    print("descs = runs posted after coalescing; nixl = descriptors NIXL reports after its own merging;"
          " GB/s = bytes / sender busy time; e2e = decode expect() -> TransferDone")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"--device cuda needs 2 GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    patterns = [p for p in a.patterns.split(",") if p]
    modes = [m for m in a.modes.split(",") if m]
    nbytes = num_pages(a) * layout_of(a).page_nbytes
    results = collect(a, make_runs(a, patterns, modes))
    rows = summarize(results, torch_copy(a, nbytes), nbytes)
    print_table(a, rows, nbytes)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), rows=rows, results=results), f, indent=1)
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
