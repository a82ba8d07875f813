"""FP8 KV cache on the GPU: compiled kernels against their references, decode attention time by
page dtype, and the engine's pool size and decode step with --kv-cache-dtype.

    python scripts/gpu/fp8_kv_check.py            # H200: Llama-3.1-8B shapes (~3 min)
    python scripts/gpu/fp8_kv_check.py --tiny     # CPU smoke test (Triton interpreter, tiny shapes)

1. store_kv bit for bit against torch's cast (both formats, scales 1 and not, outliers that must
   saturate, subnormals); decode and extend attention over fp8 pages against the fp32 references.
2. decode attention, bf16 vs fp8 pages: microseconds per call and effective GB/s of K/V read.
3. ModelRunner (dummy weights, CUDA graphs): KV pool tokens at the same --mem-fraction-static and
   ms per decode step, auto vs fp8_e4m3.
Prints one line per result; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def close(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    """bf16 outputs: within 3e-2 + 2e-2 |ref| (the kernel tests' bf16 tolerance)."""
    err = (out.float() - ref.float()).abs()
    ok = bool((err <= 3e-2 + 2e-2 * ref.float().abs()).all())
    return ok, f"max err {err.max().item():.2e}, max |ref| {ref.float().abs().max().item():.2f} (bf16 output)"


def pool_fp8(pages: int, ps: int, hkv: int, d: int, fp8: torch.dtype, scale: float, dev: str) -> torch.Tensor:
    """[pages, ps, hkv, d] fp8 holding N(0, 3^2) / scale."""
    from pdserve.runtime.kv_pool import quantize_kv
    return quantize_kv(torch.randn(pages, ps, hkv, d, device=dev) * 3, fp8, scale)


def check_kernels(hq: int, hkv: int, d: int, ps: int, lens: list[int], dev: str) -> None:
    from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
    from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
    from pdserve.kernels.kv_store import store_kv, store_kv_ref

    torch.manual_seed(0)
    for fp8 in FP8:
        for ks, vs in ((1.0, 1.0), (0.37, 1.9)):
            tag = f"{str(fp8)[6:]} k_scale={ks} v_scale={vs}"
            t = 257
            k = (torch.randn(t, hkv, d, device=dev) * torch.logspace(-7, 3, d, device=dev)).bfloat16()
            v = (torch.randn(t, hkv, d, device=dev) * torch.logspace(3, -7, d, device=dev)).bfloat16()
            k[0, 0, :2] = torch.tensor([1e6, -1e6], device=dev)
            pages = -(-t // ps) + 1
            ka, va, kb, vb = (torch.zeros(pages, ps, hkv, d, dtype=fp8, device=dev) for _ in range(4))
            loc = torch.randperm(pages * ps, device=dev)[:t]
            store_kv(ka, va, loc, k, v, ks, vs)
            store_kv_ref(kb, vb, loc, k, v, ks, vs)
            same = torch.equal(ka.view(torch.uint8), kb.view(torch.uint8)) and \
                torch.equal(va.view(torch.uint8), vb.view(torch.uint8))
            check(f"store_kv {tag}", same and ka.float().isfinite().all().item(),
                  f"bit-exact={same}, max |k| {ka.float().abs().max().item()}")

            n_pages = sum(-(-n // ps) for n in lens) + 1
            kp, vp = pool_fp8(n_pages, ps, hkv, d, fp8, ks, dev), pool_fp8(n_pages, ps, hkv, d, fp8, vs, dev)
            width = max(-(-n // ps) for n in lens)
            table = torch.zeros(len(lens), width, dtype=torch.int32, device=dev)
            perm, used = torch.randperm(n_pages, device=dev).to(torch.int32), 0
            for i, n in enumerate(lens):
                table[i, :-(-n // ps)] = perm[used:used + -(-n // ps)]
                used += -(-n // ps)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            q = torch.randn(len(lens), hq, d, device=dev).bfloat16()
            out = decode_attention(q, kp, vp, table, seq_lens, d ** -0.5, k_scale=ks, v_scale=vs)
            ref = decode_attention_ref(q, kp, vp, table, seq_lens, d ** -0.5, ks, vs)
            check(f"decode {tag}", *close(out, ref))

            new = [min(n, 67) for n in lens]
            prefix = [n - m for n, m in zip(lens, new)]
            tq = sum(new)
            qe = torch.randn(tq, hq, d, device=dev).bfloat16()
            ke, ve = (torch.randn(tq, hkv, d, device=dev).bfloat16() for _ in range(2))
            q_starts = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=dev)
            pl = torch.tensor(prefix, dtype=torch.int32, device=dev)
            out = extend_attention(qe, ke, ve, kp, vp, table, q_starts, pl, max(new), d ** -0.5, k_scale=ks, v_scale=vs)
            ref = extend_attention_ref(qe, ke, ve, kp, vp, table, q_starts, pl, d ** -0.5, ks, vs)
            check(f"extend {tag}", *close(out, ref))


def time_decode(hq: int, hkv: int, d: int, ps: int, batch: int, ctx: int, dev: str, iters: int) -> None:
    from pdserve.kernels.decode_attention import DecodeWorkspace, decode_attention

    pages_per_seq = -(-ctx // ps)
    table = torch.arange(batch * pages_per_seq, dtype=torch.int32, device=dev).view(batch, pages_per_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, hq, d, device=dev).bfloat16()
    ws = DecodeWorkspace.allocate(batch, hq, d, 8, q.dtype, dev)
    base = None
    for dtype in (torch.bfloat16, *FP8):
        kp = torch.randn(batch * pages_per_seq, ps, hkv, d, device=dev).to(dtype)
        vp = torch.randn_like(kp, dtype=torch.float32).to(dtype)
        call = lambda: decode_attention(q, kp, vp, table, seq_lens, 0.1, workspace=ws)  # noqa: E731
        for _ in range(3):
            call()
        if dev == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            call()
        if dev == "cuda":
            torch.cuda.synchronize()
        us = (time.perf_counter() - start) / iters * 1e6
        kv_bytes = 2 * batch * ctx * hkv * d * kp.element_size()
        base = base or us
        print(f"time decode B={batch} ctx={ctx} pages={str(dtype)[6:]}: {us:.1f} us, "
              f"{kv_bytes / us / 1e3:.0f} GB/s of K/V, x{base / us:.2f} vs bf16", flush=True)


def engine_rows(arch: str, dev: str, batch: int, ctx: int, mem_fraction: float | None) -> None:
    import engine_bench as eb
    from pdserve.config import CacheConfig, EngineConfig, KernelConfig, ModelConfig
    from pdserve.runtime.model_runner import ModelRunner

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = eb.write_model_dir(Path(tmp), arch)
        tokens = {}
        for kv in ("auto", "fp8_e4m3"):
            cache = CacheConfig(mem_fraction_static=mem_fraction, kv_cache_dtype=kv) if dev == "cuda" else \
                CacheConfig(max_total_tokens=batch * (ctx + 64), kv_cache_dtype=kv)
            cfg = EngineConfig(model=ModelConfig(model_path=str(model_dir), load_format="dummy", device=dev,
                                                 context_length=ctx + 256),
                               cache=cache, kernel=KernelConfig(cuda_graph_max_bs=batch, disable_cuda_graph=dev == "cpu"))
            runner = ModelRunner(cfg)
            tokens[kv] = runner.pool.capacity_tokens
            ms = eb.pdserve_decode_ms(runner, batch, ctx, steps=20 if dev == "cuda" else 2, warmup=3 if dev == "cuda" else 1)
            print(f"engine {arch} kv={kv}: pool {runner.pool.buffer.dtype} {tokens[kv]} tokens "
                  f"({runner.layout.token_nbytes} B/token), decode B={batch} ctx={ctx}: {ms:.2f} ms/step", flush=True)
            del runner
            gc.collect()  # the CUDA graph runner and the runner reference each other
            if dev == "cuda":
                torch.cuda.empty_cache()
        if dev == "cuda":
            check("pool tokens fp8 / auto", 1.9 < tokens["fp8_e4m3"] / tokens["auto"] < 2.2,
                  f"{tokens['fp8_e4m3'] / tokens['auto']:.3f}x at --mem-fraction-static {mem_fraction}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        check_kernels(8, 2, 32, 4, [1, 7, 13, 37], dev)
        time_decode(8, 2, 32, 4, 2, 64, dev, 2)
        engine_rows("tiny", dev, 2, 32, None)
    else:
        check_kernels(32, 8, 128, 16, [1, 17, 555, 2048, 4001], dev)
        for batch, ctx in ((1, 8192), (64, 2048), (256, 2048)):
            time_decode(32, 8, 128, 16, batch, ctx, dev, 50)
        engine_rows("llama-3.1-8b", dev, 64, 2048, 0.5)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all fp8 checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
