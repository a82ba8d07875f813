"""``gemv_bench.py --fused``: pdserve's fused decode GEMV (pdserve/kernels/gemv.py) on the H200.

1. Tiling sweep per Llama-3.1-8B shape and fused variant at batch 1, against cuBLAS,
   timed as gemv_bench times cuBLAS (CUDA graph, weight copies cycled so none is read from L2).
2. A layer's GEMM chain, as the decode step runs it, with the best tilings:
   unfused  O -> add+RMSNorm -> gate/up -> SiLU-mul -> down -> add+RMSNorm -> QKV  (cuBLAS + 3 kernels)
   fused    O+residual -> RMSNorm+gate/up+SiLU-mul -> down+residual -> RMSNorm+QKV  (4 kernels)
   over 8 layers' weights in turn; per layer us and the saving per 32-layer step.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.gemv import GemvConfig, fused_gemv
from pdserve.kernels.rmsnorm import fused_add_rmsnorm
from pdserve.models.layers import GATE_UP_BLOCK

TILINGS = [(8, 512), (16, 256), (16, 512), (32, 256), (8, 1024), (32, 128), (64, 128)]
# (shape, variant): the fused form each GEMM takes in a layer, and the plain one
VARIANTS = {"qkv": ("plain", "norm"), "o": ("plain", "res"),
            "gate_up": ("plain", "norm", "norm_silu"),
            "down": ("plain", "res"), "lm_head": ("plain",)}


def _call(variant: str, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, g: torch.Tensor, cfg: GemvConfig):
    if variant == "plain":
        return fused_gemv(x, w, out=out, config=cfg)
    if variant == "norm":
        return fused_gemv(x, w, norm_weight=g, out=out, config=cfg)
    if variant == "res":
        return fused_gemv(x, w, residual=out, config=cfg)
    return fused_gemv(x, w, norm_weight=g, silu_out=True, out=out[:, :w.shape[0] // 2], config=cfg)


def sweep(shapes: dict, gpu_us) -> dict[tuple[str, str], GemvConfig]:
    """Best tiling per (shape, fused variant), printed beside cuBLAS (batch 1)."""
    best: dict[tuple[str, str], GemvConfig] = {}
    print("\n## batch 1: best tilings per shape and fused variant (us; TB/s)")
    print(f"{'shape':<8} {'variant':<10} {'cuBLAS':>13} {'pdserve best':>13}  (block_n, block_k, warps, stages)  top-3")
    for name, (k, n) in shapes.items():
        nbytes = n * k * 2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, -(-400 << 20) // nbytes))]
        g = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
        out = torch.zeros(1, n, device="cuda", dtype=torch.bfloat16)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = gpu_us(lambda w: F.linear(x1, w), ws)
        for variant in VARIANTS[name]:
            x = x1
            results = []
            for (bn, bk), warps, stages in itertools.product(TILINGS, (4, 8), (2, 3, 4)):
                if variant == "norm_silu" and bn % (2 * GATE_UP_BLOCK):
                    continue
                cfg = GemvConfig(bn, bk, warps, stages)
                try:
                    results.append((gpu_us(lambda w: _call(variant, x, w, out, g, cfg), ws, reps=24), cfg))
                except Exception as e:  # noqa: BLE001 -- a tiling that does not compile (registers, smem)
                    print(f"  {cfg}: {type(e).__name__}")
            results.sort(key=lambda r: r[0])
            t, cfg = results[0]
            best[(name, variant)] = cfg
            top = ", ".join(f"{r[0]:.1f}" for r in results[:3])
            print(f"{name:<8} {variant:<10} {ref:7.1f} {nbytes / ref / 1e6:5.2f} {t:7.1f} {nbytes / t / 1e6:5.2f}  "
                  f"({cfg.block_n}, {cfg.block_k}, {cfg.num_warps}, {cfg.num_stages})  {top}", flush=True)
        torch.testing.assert_close(fused_gemv(x1, ws[0], config=best[(name, "plain")]), F.linear(x1, ws[0]),
                                   rtol=2e-2, atol=2e-2)
        del ws
    return best


def layer_chain(shapes: dict, best: dict[tuple[str, str], GemvConfig], gpu_us, layers: int = 8) -> None:
    """One layer's GEMMs and the elementwise kernels between them, unfused vs fused (us per layer)."""
    dims = {name: shapes[name] for name in ("qkv", "o", "gate_up", "down")}
    hidden, inter = dims["o"][1], dims["down"][0]
    dev, dt = "cuda", torch.bfloat16
    weights = [{name: torch.randn(n, k, device=dev, dtype=dt) * 0.02 for name, (k, n) in dims.items()}
               for _ in range(layers)]
    for w in weights:  # the merged gate/up weight as the model stores it: blocks of gate rows, then their up rows
        b = GATE_UP_BLOCK
        w["gate_up_il"] = w["gate_up"].view(2, inter // b, b, hidden).transpose(0, 1).reshape(2 * inter, hidden)
    g1, g2 = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dt), (1 + 0.1 * torch.randn(hidden, device=dev)).to(dt)
    attn = torch.randn(1, hidden, device=dev, dtype=dt)
    res0 = torch.randn(1, hidden, device=dev, dtype=dt)
    act = torch.empty(1, inter, device=dev, dtype=dt)
    qkv = torch.empty(1, dims["qkv"][1], device=dev, dtype=dt)

    def unfused(w: dict) -> torch.Tensor:
        o = F.linear(attn, w["o"])
        x, res = fused_add_rmsnorm(o, res0, g2, 1e-5)
        d = F.linear(silu_and_mul(F.linear(x, w["gate_up"])), w["down"])
        x, res = fused_add_rmsnorm(d, res, g1, 1e-5)
        return F.linear(x, w["qkv"])

    res = res0.clone()

    def fused(w: dict) -> torch.Tensor:  # the residual stream carries on from call to call, as in a model
        fused_gemv(attn, w["o"], residual=res, config=best[("o", "res")])
        fused_gemv(res, w["gate_up_il"], norm_weight=g2, eps=1e-5, silu_out=True, out=act,
                   config=best[("gate_up", "norm_silu")])
        fused_gemv(act, w["down"], residual=res, config=best[("down", "res")])
        return fused_gemv(res, w["qkv"], norm_weight=g1, eps=1e-5, out=qkv, config=best[("qkv", "norm")])

    a, b = unfused(weights[0]), fused(weights[0])
    res.copy_(res0)
    err = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
    t_un, t_fu = gpu_us(unfused, weights, reps=16), gpu_us(fused, weights, reps=16)
    t_un, t_fu = min(t_un, gpu_us(unfused, weights, reps=16)), min(t_fu, gpu_us(fused, weights, reps=16))
    print(f"\n## batch 1: layer chain O -> norm -> gate/up -> SiLU -> down -> norm -> QKV, us per layer")
    print(f"unfused (cuBLAS + add-RMSNorm x2 + SiLU-mul): {t_un:.1f}   fused (4 GEMVs): {t_fu:.1f}   "
          f"saving per 32 layers: {(t_un - t_fu) * 32 / 1e3:.3f} ms   max rel diff {err:.2e}", flush=True)


def fused_main(shapes: dict, gpu_us) -> int:
    best = sweep(shapes, gpu_us)
    layer_chain(shapes, best, gpu_us)
    return 0
