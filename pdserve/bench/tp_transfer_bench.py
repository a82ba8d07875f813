"""KV transfer between tensor-parallel layouts: prefill TP a -> decode TP b, against torch's copy.

    python -m pdserve.bench.tp_transfer_bench --src-tp 1 --dst-tp 2            # DRAM on CPU
    python -m pdserve.bench.tp_transfer_bench --device cuda --src-tp 1 --dst-tp 2   # needs a + b GPUs

Two processes, as two nodes' rank 0s: each holds one KV pool per rank of its node (every rank's
pool registered with its one NIXL agent, as a TP node's rank 0 does) and runs the real
``KVSender`` / ``KVReceiver`` (bootstrap handshake, KVDest, writes, completion). One request of
``--tokens`` tokens (Llama-3.1-8B shape by default: 32 layers, 8 KV heads x 128, bf16, page 16)
moves per repetition; the decode side checks every page of every rank against the prefill KV it
regenerates from the same seed. Reported: end-to-end ms (write() -> TransferSent: staging
relayout + NIXL writes + completion), GB/s on the bytes moved, descriptors, and torch's
``copy_`` of the same bytes between the same devices (the ceiling), all in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

SEED = 1234


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src-tp", type=int, default=1)
    p.add_argument("--dst-tp", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: prefill ranks on GPUs 0..a-1, decode ranks on the next b (modulo --gpus)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to spread the ranks over (default: all visible; 1 puts every rank on cuda:0, "
                        "which measures the relayout and NIXL path on one card, not NVLink)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def full_kv(a, device: str) -> torch.Tensor:
    """The request's KV, every head: [pages, layers, 2, page_size, kv_heads, head_dim]."""
    g = torch.Generator().manual_seed(SEED)
    pages = -(-a.tokens // a.page_size)
    t = torch.randn(pages, a.layers, 2, a.page_size, a.kv_heads, a.head_dim, generator=g)
    return t.to(getattr(torch, a.dtype)).to(device)


def pool_set(a, tp: int, first_gpu: int, fill: torch.Tensor | None):
    """One pool per rank (heads split as a TP node splits them), filled from ``fill`` if given."""
    from pdserve.models.layers import head_shard
    from pdserve.runtime.kv_pool import KVLayout, KVPool
    from pdserve.transfer.pools import PoolSet, RankPool

    pages = -(-a.tokens // a.page_size) + 8
    ranks = []
    for r in range(tp):
        h = head_shard(a.kv_heads, a.kv_heads, tp, r)
        dev = f"cuda:{(first_gpu + r) % _num_gpus(a)}" if a.device == "cuda" else "cpu"
        pool = KVPool(pages, KVLayout(a.layers, h.kv_count, a.head_dim, a.page_size, a.dtype), dev)
        if fill is not None:
            pool.buffer[:fill.shape[0]].copy_(fill[..., h.kv_start:h.kv_start + h.kv_count, :])
        ranks.append(RankPool(r, pool, h.kv_start, h.kv_count))
    return PoolSet(ranks, a.kv_heads)


def decode_side(a, commands, events) -> None:
    from pdserve.config import TransferConfig
    from pdserve.transfer import KVReceiver, TransferDone

    pools = pool_set(a, a.dst_tp, a.src_tp, None)
    recv = KVReceiver(pools, "bench", TransferConfig(), "127.0.0.1")
    expected = full_kv(a, "cpu")
    pages = list(range(8, 8 + expected.shape[0]))          # not the prefill's page ids: mapping is checked
    events.put(("ready", recv.bootstrap_endpoint))
    while True:
        cmd = commands.get()
        if cmd[0] == "stop":
            recv.close()
            return
        tid, bootstrap = cmd[1], cmd[2]
        recv.expect(tid, bootstrap, pages)
        done = None
        while done is None:
            done = next(iter(recv.poll()), None)
        ok = isinstance(done, TransferDone) and all(
            torch.equal(rp.pool.buffer[pages].cpu(), expected[..., rp.kv_start:rp.kv_start + rp.kv_count, :])
            for rp in pools.ranks)
        recv.forget(tid)
        events.put(("done", tid, ok, getattr(done, "reason", "")))


def copy_baseline_ms(a, nbytes: int) -> float:
    """torch copy_ of ``nbytes`` from the first prefill device to the first decode device."""
    src_dev = "cuda:0" if a.device == "cuda" else "cpu"
    dst_dev = f"cuda:{a.src_tp % _num_gpus(a)}" if a.device == "cuda" else "cpu"
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_dev).random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)
    times = []
    for _ in range(a.reps + 1):
        _sync(a)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(a)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def _num_gpus(a) -> int:
    return a.gpus or torch.cuda.device_count()


def _sync(a) -> None:
    if a.device == "cuda":
        torch.cuda.synchronize()


def run(a) -> dict:
    from pdserve.config import TransferConfig
    from pdserve.transfer import KVSender, TransferSent

    ctx = mp.get_context("spawn")
    commands, events = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=decode_side, args=(a, commands, events), daemon=True)
    proc.start()
    try:
        full = full_kv(a, "cpu")
        pools = pool_set(a, a.src_tp, 0, full)
        sender = KVSender(pools, "bench", TransferConfig(), "127.0.0.1", staging_nbytes=full.numel() * full.element_size())
        _, bootstrap = events.get(timeout=120)
        rows = []
        for rep in range(a.reps + 1):                        # rep 0: handshake + staging registration (warm-up)
            tid = f"t{rep}"
            sender.expect(tid)
            commands.put(("expect", tid, sender.bootstrap_endpoint))
            while not any(e.transfer_id == tid for e in sender.poll()):
                pass
            t0 = time.perf_counter()
            sender.write(tid, list(range(full.shape[0])), 0)
            sender.finish(tid, b"")
            sent = None
            while sent is None:
                sent = next((e for e in sender.poll() if e.transfer_id == tid), None)
            ms = (time.perf_counter() - t0) * 1e3
            _, _, ok, reason = events.get(timeout=120)
            if not (isinstance(sent, TransferSent) and ok):
                raise RuntimeError(f"rep {rep}: transfer failed or KV differs ({reason or sent})")
            sender.forget(tid)
            if rep:
                rows.append((ms, sent.metrics))
        sender.close()
    finally:
        commands.put(("stop",))
        proc.join(timeout=30)
    nbytes = rows[0][1].kv_bytes
    e2e = statistics.median(r[0] for r in rows)
    copy_ms = copy_baseline_ms(a, nbytes)
    return {"src_tp": a.src_tp, "dst_tp": a.dst_tp, "device": _device_name(a), "tokens": a.tokens,
            "kv_bytes": nbytes, "descriptors": rows[0][1].num_descriptors, "e2e_ms": round(e2e, 3),
            "e2e_gbps": round(nbytes / e2e / 1e6, 2), "copy_ms": round(copy_ms, 3),
            "copy_gbps": round(nbytes / copy_ms / 1e6, 2), "fraction_of_copy": round(copy_ms / e2e, 3)}


def _device_name(a) -> str:
    if a.device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> None:
    a = parse_args(argv)
    out = run(a)
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
