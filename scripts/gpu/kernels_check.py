"""One-shot GPU check of every pdserve kernel, then a benchmark of the attention kernels.

    python scripts/gpu/kernels_check.py            # one GPU: Llama-3.1-8B shapes, bf16 (~2-3 min)
    python scripts/gpu/kernels_check.py --tiny     # CPU (Triton interpreter) or GPU, tiny shapes

Part 1 runs each kernel against its plain-torch reference (and TritonAttention against
TorchAttention through build_forward_batch, and FlashInferAttention if flashinfer imports).
Part 2 (scripts/gpu/kernels_bench.py) times paged decode attention (batch 1/8/64/256 at 2k
context, GB/s vs the copy rate measured on the card) and extend attention (1k/4k tokens, TFLOP/s
vs the measured bf16 matmul rate; both from scripts/gpu/floors.py), plus small
config sweeps so the defaults can be re-tuned from one run. Every step is guarded: a failure is
printed and the script goes on. Exit status 1 if any check mismatched or anything crashed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


@dataclass(frozen=True)
class Shapes:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    hidden: int
    intermediate: int
    decode_lens: tuple[int, ...]
    extend_prefix: tuple[int, ...]
    extend_new: tuple[int, ...]
    gqa_variants: tuple[tuple[int, int], ...]  # extra (Hq, Hkv) pairs checked at small sizes
    bench_batches: tuple[int, ...]
    bench_ctx: int
    bench_extend: tuple[tuple[int, int], ...]  # (new tokens, cached prefix)


REAL = Shapes(32, 8, 128, 16, 4096, 14336,
              decode_lens=(1, 17, 100, 513, 2048, 3000, 4097, 16),
              extend_prefix=(0, 100, 1000, 17, 0), extend_new=(1, 300, 1024, 513, 77),
              gqa_variants=((32, 32), (64, 8)),
              bench_batches=(1, 8, 64, 256), bench_ctx=2048, bench_extend=((1024, 0), (4096, 0), (1024, 3072)))
TINY = Shapes(4, 1, 32, 4, 64, 48,
              decode_lens=(1, 5, 13), extend_prefix=(0, 6, 3), extend_new=(1, 9, 17),
              gqa_variants=((2, 2), (8, 1)),
              bench_batches=(1, 2), bench_ctx=16, bench_extend=((16, 0), (16, 8)))


class Results:
    """Rows of (section, name, value columns..., status); any FAIL/ERROR makes the exit status 1."""

    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, actual, expected, atol: float, rtol: float) -> None:
        import torch
        a, e = actual.float(), expected.float()
        err = (a - e).abs().max().item() if a.numel() else 0.0
        ok = a.shape == e.shape and bool(torch.allclose(a, e, atol=atol, rtol=rtol))
        self.failed += not ok
        print(f"  {name:<58} max|err| {err:9.2e}  (atol {atol:.0e}, rtol {rtol:.0e})  {'ok' if ok else 'FAIL'}",
              flush=True)

    def flag(self, name: str, ok: bool, detail: str) -> None:
        self.failed += not ok
        print(f"  {name:<58} {detail}  {'ok' if ok else 'FAIL'}", flush=True)

    def guard(self, name: str, fn, *args, **kwargs) -> None:
        """Run one step; a crash is reported with its traceback and counted, never fatal."""
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - one broken step must not hide the others' results
            self.failed += 1
            print(f"  {name}: ERROR\n" + "".join("    " + line for line in traceback.format_exc().splitlines(True)),
                  flush=True)


def _tol(dtype):
    import torch
    return (2e-5, 2e-5) if dtype == torch.float32 else (2e-2, 2e-2)


def _pool_views(num_pages: int, hkv: int, sh: Shapes, dtype, device, layers: int = 2):
    import torch
    buf = torch.randn(num_pages, layers, 2, sh.page_size, hkv, sh.head_dim, device=device).to(dtype)
    return buf, buf[:, layers - 1, 0], buf[:, layers - 1, 1]  # strided per-layer views


def _page_table(lens, page_size: int, num_pages: int, device):
    import torch
    need = [-(-n // page_size) for n in lens]
    perm = torch.randperm(num_pages)
    table = torch.zeros(len(lens), max(max(need), 1), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    return table.to(device)


def check_decode(res: Results, sh: Shapes, hq: int, hkv: int, lens, dtype, device, **kw) -> None:
    import torch
    from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
    num_pages = sum(-(-n // sh.page_size) for n in lens) + 8
    _, kp, vp = _pool_views(num_pages, hkv, sh, dtype, device)
    table = _page_table(lens, sh.page_size, num_pages, device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, sh.head_dim, device=device).to(dtype)
    scale = sh.head_dim ** -0.5
    out = decode_attention(q, kp, vp, table, seq_lens, scale, **kw)
    ref = decode_attention_ref(q, kp, vp, table, seq_lens, scale)
    opts = ",".join(f"{k}={v}" for k, v in kw.items())
    res.check(f"decode {str(dtype)[6:]} Hq={hq} Hkv={hkv} B={len(lens)} {opts}", out, ref, *_tol(dtype))


def check_extend(res: Results, sh: Shapes, hq: int, hkv: int, prefix, new, dtype, device) -> None:
    import torch
    from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
    num_pages = sum(-(-n // sh.page_size) for n in prefix) + 8
    _, kp, vp = _pool_views(num_pages, hkv, sh, dtype, device)
    table = _page_table(prefix, sh.page_size, num_pages, device)
    t = sum(new)
    q = torch.randn(t, hq, sh.head_dim, device=device).to(dtype)
    k = torch.randn(t, hkv, sh.head_dim, device=device).to(dtype)
    v = torch.randn(t, hkv, sh.head_dim, device=device).to(dtype)
    q_starts = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=device)
    prefix_lens = torch.tensor(prefix, dtype=torch.int32, device=device)
    scale = sh.head_dim ** -0.5
    out = extend_attention(q, k, v, kp, vp, table, q_starts, prefix_lens, max(new), scale)
    ref = extend_attention_ref(q, k, v, kp, vp, table, q_starts, prefix_lens, scale)
    res.check(f"extend {str(dtype)[6:]} Hq={hq} Hkv={hkv} T={t}", out, ref, *_tol(dtype))
    flat = extend_attention(q, k, v, kp, vp, table, q_starts, prefix_lens, max(new), scale, flat_grid=True)
    res.flag(f"extend flat grid == batch grid, Hq={hq} Hkv={hkv} T={t}", torch.equal(flat, out), "exact")


def check_elementwise(res: Results, sh: Shapes, dtype, device) -> None:
    import torch
    from pdserve.kernels import activation, kv_store, rmsnorm, rotary
    rows = 257 if sh is REAL else 5
    x, r = torch.randn(rows, sh.hidden, device=device).to(dtype), torch.randn(rows, sh.hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(sh.hidden, device=device)).to(dtype)
    res.check("rmsnorm", rmsnorm.rmsnorm(x, w, 1e-5), rmsnorm.rmsnorm_ref(x, w, 1e-5), *_tol(dtype))
    (n, nr), (rn, rr) = rmsnorm.fused_add_rmsnorm(x, r, w, 1e-5), rmsnorm.fused_add_rmsnorm_ref(x, r, w, 1e-5)
    res.check("fused_add_rmsnorm (normed)", n, rn, *_tol(dtype))
    res.check("fused_add_rmsnorm (residual)", nr, rr, *_tol(dtype))
    g = torch.randn(rows, 2 * sh.intermediate, device=device).to(dtype)
    res.check("silu_and_mul", activation.silu_and_mul(g), activation.silu_and_mul_ref(g), *_tol(dtype))
    cache = rotary.build_cos_sin_cache(rotary.rope_inv_freq(sh.head_dim, 500000.0), 8192, device)
    qkv = torch.randn(rows, sh.num_q_heads + 2 * sh.num_kv_heads, sh.head_dim, device=device).to(dtype)
    q, k = qkv[:, :sh.num_q_heads], qkv[:, sh.num_q_heads:sh.num_q_heads + sh.num_kv_heads]
    pos = torch.randint(0, 8192, (rows,), device=device)
    rq, rk = rotary.apply_rotary_ref(q, k, pos, cache)
    rotary.apply_rotary(q, k, pos, cache)
    res.check("rotary q (in place, strided)", q, rq, *_tol(dtype))
    res.check("rotary k (in place, strided)", k, rk, *_tol(dtype))
    buf, kp, vp = _pool_views(64, sh.num_kv_heads, sh, dtype, device)
    ref_buf = buf.clone()
    loc = torch.randperm(64 * sh.page_size, device=device)[:rows]
    loc[0] = -1
    kn, vn = torch.randn(2, rows, sh.num_kv_heads, sh.head_dim, device=device).to(dtype)
    kv_store.store_kv(kp, vp, loc, kn, vn)
    kv_store.store_kv_ref(ref_buf[:, 1, 0], ref_buf[:, 1, 1], loc, kn, vn)
    res.flag("store_kv (strided layer view, slot -1 skipped)", torch.equal(buf, ref_buf), "exact")
    res.flag("rotary == transformers' 16-bit ops", torch.equal(q, rq) and torch.equal(k, rk), "exact")
    res.flag("silu_and_mul == transformers' 16-bit ops",
             torch.equal(activation.silu_and_mul(g), activation.silu_and_mul_ref(g)), "exact")
    check_rope_store(res, sh, dtype, device, cache, rows)


def check_gemv(res: Results, sh: Shapes, dtype, device) -> None:
    """The fused batch-1 GEMV in each form a layer uses, at the model's shapes, against the unfused
    ops (the RMSNorm forms within 2 bf16 ulps of the largest output: the normed row is not rounded,
    and silu(gate) * up compounds a gate and an up that may each differ by one)."""
    import torch
    from pdserve.kernels.gemv import fused_gemv, fused_gemv_ref
    h, i = sh.hidden, sh.intermediate
    x, xi = torch.randn(1, h, device=device).to(dtype), torch.randn(1, i, device=device).to(dtype)
    g = (1 + 0.1 * torch.randn(h, device=device)).to(dtype)
    w_h, w_gu, w_d = ((0.02 * torch.randn(*shape, device=device)).to(dtype) for shape in ((h, h), (2 * i, h), (h, i)))
    res.check("fused_gemv (plain, O-sized)", fused_gemv(x, w_h), fused_gemv_ref(x, w_h), *_tol(dtype))
    r = torch.randn(1, h, device=device).to(dtype)
    res.check("fused_gemv + residual (down)", fused_gemv(xi, w_d, residual=r.clone()),
              fused_gemv_ref(xi, w_d, residual=r), *_tol(dtype))
    for name, w, kw in (("RMSNorm + QKV-like", w_h, {}), ("RMSNorm + gate/up + SiLU-mul", w_gu, {"silu_out": True})):
        ref = fused_gemv_ref(x, w, norm_weight=g, eps=1e-5, **kw)
        res.check(f"fused_gemv ({name})", fused_gemv(x, w, norm_weight=g, eps=1e-5, **kw), ref,
                  ref.float().abs().max().item() * 2**-6, 0.0)
    logits = torch.empty(1, h, dtype=torch.float32, device=device)
    res.flag("fused_gemv fp32 out == its 16-bit out, widened",
             torch.equal(fused_gemv(x, w_h, out=logits), fused_gemv(x, w_h).float()), "exact")


def check_rope_store(res: Results, sh: Shapes, dtype, device, cache, rows: int) -> None:
    """The fused rotary + store launch against the two kernels it replaces: bit for bit."""
    import torch
    from pdserve.kernels import kv_store, rope_store, rotary
    hq, hkv = sh.num_q_heads, sh.num_kv_heads
    qkv = torch.randn(rows, hq + 2 * hkv, sh.head_dim, device=device).to(dtype)
    pos = torch.randint(0, 8192, (rows,), device=device)
    loc = torch.randperm(64 * sh.page_size, device=device)[:rows]
    loc[0] = -1
    outs = []
    for fused in (True, False):
        torch.manual_seed(11)  # the same starting pool for both
        buf, kp, vp = _pool_views(64, hkv, sh, dtype, device)
        x = qkv.clone()
        q, k, v = x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
        if fused:
            rope_store.rope_store_kv(q, k, v, pos, cache, kp, vp, loc)
        else:
            rotary.apply_rotary(q, k, pos, cache)
            kv_store.store_kv(kp, vp, loc, k, v)
        outs.append((x, buf))
    res.flag("rope_store_kv == apply_rotary + store_kv",
             torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), "exact")


def check_decode_rope(res: Results, sh: Shapes, dtype, device) -> None:
    """Decode attention with rotary + K/V store inside (``DecodeRope``) against ``rope_store_kv``
    then decode attention: the pages bit for bit, the output within tolerance (the fused variant
    is compiled without FMA contraction, as the rotary kernels are)."""
    import torch
    from pdserve.kernels.decode_attention import DecodeRope, decode_attention
    from pdserve.kernels.rope_store import rope_store_kv
    from pdserve.kernels.rotary import build_cos_sin_cache, rope_inv_freq
    hq, hkv, lens = sh.num_q_heads, sh.num_kv_heads, list(sh.decode_lens[:4]) + [0]
    num_pages = sum(-(-n // sh.page_size) for n in lens) + 8
    table = _page_table(lens, sh.page_size, num_pages, device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    loc = torch.tensor([int(table[i, (n - 1) // sh.page_size]) * sh.page_size + (n - 1) % sh.page_size if n else -1
                        for i, n in enumerate(lens)], device=device)
    pos = (seq_lens.long() - 1).clamp(min=0)
    cache = build_cos_sin_cache(rope_inv_freq(sh.head_dim, 500000.0), max(lens), device)
    qkv = torch.randn(len(lens), hq + 2 * hkv, sh.head_dim, device=device).to(dtype)
    results = []
    for fused in (True, False):
        torch.manual_seed(13)  # the same starting pool for both
        buf, kp, vp = _pool_views(num_pages, hkv, sh, dtype, device)
        x = qkv.clone()
        q, k, v = x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
        if not fused:
            rope_store_kv(q, k, v, pos, cache, kp, vp, loc)
        out = decode_attention(q, kp, vp, table, seq_lens, sh.head_dim ** -0.5, num_kv_splits=8,
                               rope=DecodeRope(k, v, pos, cache, loc) if fused else None)
        results.append((out, buf))
    res.flag("decode with DecodeRope: pages == rope_store_kv's", torch.equal(results[0][1], results[1][1]), "exact")
    res.check("decode with DecodeRope vs rope_store_kv + decode", results[0][0], results[1][0], *_tol(dtype))


def check_backends(res: Results, sh: Shapes, dtype, device) -> None:
    import torch
    from pdserve.runtime.attention import TorchAttention, make_attention_backend
    from pdserve.runtime.forward import SeqChunk, build_forward_batch
    from pdserve.runtime.kv_pool import KVLayout, KVPool
    layout = KVLayout(2, sh.num_kv_heads, sh.head_dim, sh.page_size, str(dtype)[6:])
    lens = [(0, 37), (50, 1), (3 * sh.page_size, 2 * sh.page_size + 3), (7, 1)]  # (cached, new)
    pages = iter(torch.randperm(256).tolist())
    mixed = [SeqChunk(f"m{i}", [1] * n, p, [next(pages) for _ in range(-(-(p + n) // sh.page_size))])
             for i, (p, n) in enumerate(lens)]
    decode = [SeqChunk(f"d{i}", [1], p + n, [next(pages) for _ in range(-(-(p + n + 1) // sh.page_size))])
              for i, (p, n) in enumerate(lens)]
    names = ["triton"]
    try:
        import flashinfer  # noqa: F401
        names.append("flashinfer")
    except ImportError:
        print("  flashinfer not installed: FlashInferAttention not checked")
    for name in names:
        for label, seqs in (("mixed", mixed), ("decode", decode)):
            pools = [KVPool(256, layout, device) for _ in range(2)]
            pools[0].buffer.normal_()
            pools[1].buffer.copy_(pools[0].buffer)
            ref, other = TorchAttention(pools[0]), make_attention_backend(name, pools[1])
            batch = build_forward_batch(seqs, sh.page_size, device)
            ref.init_batch(batch)
            other.init_batch(batch)
            t = batch.num_tokens
            for layer in (0, 1):
                q = torch.randn(t, sh.num_q_heads, sh.head_dim, device=device).to(dtype)
                k, v = torch.randn(2, t, sh.num_kv_heads, sh.head_dim, device=device).to(dtype)
                out = other.forward(layer, q, k, v, batch, sh.head_dim ** -0.5)
                expected = ref.forward(layer, q, k, v, batch, sh.head_dim ** -0.5)
                res.check(f"{name} backend vs torch, {label} batch, layer {layer}", out, expected, *_tol(dtype))
            res.flag(f"{name} backend pool writes == torch's ({label})", torch.equal(pools[0].buffer, pools[1].buffer),
                     "exact")


def run_checks(res: Results, sh: Shapes, device) -> None:
    import torch
    bf16 = torch.bfloat16
    print("\n== correctness (kernel vs plain-torch reference) ==", flush=True)
    res.guard("decode", check_decode, res, sh, sh.num_q_heads, sh.num_kv_heads, sh.decode_lens, bf16, device)
    res.guard("decode fp32 reduce", check_decode, res, sh, sh.num_q_heads, sh.num_kv_heads, sh.decode_lens, bf16,
              device, reduce_in_fp32=True, num_kv_splits=16)
    res.guard("decode 1 split", check_decode, res, sh, sh.num_q_heads, sh.num_kv_heads, sh.decode_lens[:4], bf16,
              device, num_kv_splits=1)
    res.guard("extend", check_extend, res, sh, sh.num_q_heads, sh.num_kv_heads, sh.extend_prefix, sh.extend_new,
              bf16, device)
    for hq, hkv in sh.gqa_variants:
        res.guard("decode gqa", check_decode, res, sh, hq, hkv, sh.decode_lens[:4], bf16, device)
        res.guard("extend gqa", check_extend, res, sh, hq, hkv, sh.extend_prefix[:3], sh.extend_new[:3], bf16, device)
    res.guard("decode fp32", check_decode, res, sh, sh.num_q_heads, sh.num_kv_heads, sh.decode_lens[:4],
              torch.float32, device)
    res.guard("extend fp32", check_extend, res, sh, sh.num_q_heads, sh.num_kv_heads, sh.extend_prefix[:3],
              sh.extend_new[:3], torch.float32, device)
    res.guard("elementwise", check_elementwise, res, sh, bf16, device)
    res.guard("gemv", check_gemv, res, sh, bf16, device)
    res.guard("decode rope", check_decode_rope, res, sh, bf16, device)
    res.guard("backends", check_backends, res, sh, bf16, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU via the Triton interpreter)")
    parser.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        if not args.tiny:
            print("no CUDA device: run with --tiny (Triton interpreter) on CPU")
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"pdserve kernels_check: {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{'tiny' if args.tiny else 'Llama-3.1-8B'} shapes", flush=True)
    started = time.perf_counter()
    sh = TINY if args.tiny else REAL
    torch.manual_seed(0)
    res = Results()
    run_checks(res, sh, device)
    if not args.skip_bench:
        import kernels_bench
        kernels_bench.run_benchmarks(res, sh, device)
    print(f"\n{'FAILED' if res.failed else 'all ok'}: {res.failed} failure(s), "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
