"""Decode TPOT and prefill time of pdserve's ModelRunner beside transformers, dummy bf16 weights.

    python scripts/gpu/engine_bench.py                 # H200: Llama-3.1-8B and Llama-3.2-1B shapes (<= 6 min)
    python scripts/gpu/engine_bench.py --tiny          # CPU smoke test: a toy Llama, same code path

pdserve: the engine's ``ModelRunner`` (dummy weights from a written config.json, Triton kernels,
CUDA graphs for decode). Decode: ``--batches`` sequences of ``--ctx`` cached tokens each, steady
steps of ``runner.forward`` + greedy argmax on the host (what the engine does per step), with
graphs and eagerly. Reported as ms/step and as a fraction of the HBM floor
``(weights + batch x ctx x KV/token) / 4.3 TB/s``. Prefill: one sequence of ``--prefill`` tokens,
ms and MFU (FLOPs / 790 TFLOP/s; FLOPs = 2 x tokens x matmul params + causal attention).
transformers (same shapes, its own random init; timing does not depend on the values): eager
forward for prefill, eager decode over a DynamicCache filled to ``ctx``, and a torch.compile'd
static-cache decode step at batch 1 when the time budget allows (guarded by an alarm).
Every section is guarded; the table is printed at the end and JSON is written to $OUT (or
--json) after every section, so a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pdserve_timing import (make_runner, pdserve_decode_ms, pdserve_engine_decode_ms, pdserve_prefill_ms,  # noqa: E402
                            sync)

HBM_BYTES_PER_S = 4.3e12
PEAK_FLOPS = 790e12

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
LLAMA_32_1B = {**LLAMA_31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "head_dim": 64, "tie_word_embeddings": True,
               "rope_scaling": {**LLAMA_31_8B["rope_scaling"], "factor": 32.0}}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}
TINY = {**LLAMA_31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 1024,
        "rope_scaling": {**LLAMA_31_8B["rope_scaling"], "original_max_position_embeddings": 64},
        "bos_token_id": 1, "eos_token_id": [2], "torch_dtype": "float32"}
TINY_QWEN3 = {**QWEN3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 1024,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
ARCHS = {"llama-3.1-8b": LLAMA_31_8B, "llama-3.2-1b": LLAMA_32_1B, "qwen3-8b": QWEN3_8B, "tiny": TINY,
         "tiny-qwen3": TINY_QWEN3}


def write_model_dir(root: Path, name: str, **overrides) -> Path:
    """A folder holding only config.json (for --load-format dummy and transformers' from_config)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**ARCHS[name], **overrides}, indent=1))
    return folder


# -- results ------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    impl: str        # pdserve+graph | pdserve eager | transformers eager | transformers compile
    case: str        # decode bs=8 ctx=2048 | prefill 1024
    ms: float | None
    floor_ms: float | None = None
    note: str = ""

    @property
    def efficiency(self) -> str:
        if self.ms is None or self.floor_ms is None:
            return ""
        kind = "MFU" if self.case.startswith("prefill") else "of HBM floor"
        return f"{self.floor_ms / self.ms:6.1%} {kind}"


class Report:
    def __init__(self, json_path: Path | None) -> None:
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.json_path = json_path
        self.meta: dict = {}

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ms = "-" if row.ms is None else f"{row.ms:9.3f}"
        print(f"  {row.model:13s} {row.impl:22s} {row.case:26s} {ms} ms  {row.efficiency}  {row.note}", flush=True)
        self.save()

    def error(self, what: str) -> None:
        msg = f"{what}: {traceback.format_exc(limit=4).strip()}"
        self.errors.append(msg)
        print(f"  ERROR {msg}", flush=True)
        self.save()

    def save(self) -> None:
        if self.json_path is None:
            return
        data = {"meta": self.meta, "rows": [{**asdict(r), "efficiency": r.efficiency} for r in self.rows],
                "errors": self.errors}
        self.json_path.write_text(json.dumps(data, indent=1))

    def print_table(self) -> None:
        print("\n| model | impl | case | ms | floor ms | efficiency | note |\n|---|---|---|---|---|---|---|")
        for r in self.rows:
            ms = "-" if r.ms is None else f"{r.ms:.3f}"
            floor = "" if r.floor_ms is None else f"{r.floor_ms:.3f}"
            print(f"| {r.model} | {r.impl} | {r.case} | {ms} | {floor} | {r.efficiency.strip()} | {r.note} |")
        if self.errors:
            print(f"\n{len(self.errors)} section(s) failed (see ERROR lines above)")


@contextmanager
def guard(report: Report, what: str):
    try:
        yield
    except Exception:  # one failing section must not hide the rest
        report.error(what)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Deadline(Exception):
    pass


@contextmanager
def alarm(seconds: int):
    """Raise Deadline in this (main) thread after ``seconds`` (POSIX only; 0 = no limit)."""
    def fire(signum, frame):
        raise Deadline(f"over the {seconds} s budget")
    if seconds <= 0:
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- model arithmetic ---------------------------------------------------------------------------
def kv_bytes_per_token(cfg: dict, dtype: torch.dtype) -> int:
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype.itemsize


def param_counts(cfg: dict) -> tuple[int, int, int]:
    """(matmul params of the layers, embedding params, lm_head params or 0 if tied)."""
    h, d, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    embed = cfg["vocab_size"] * h
    return cfg["num_hidden_layers"] * per_layer, embed, 0 if cfg["tie_word_embeddings"] else embed


def decode_floor_ms(cfg: dict, dtype: torch.dtype, batch: int, ctx: int) -> float:
    """Bytes a decode step must read: every layer weight, the LM head (the tied embedding once),
    norms ignored; plus the KV of every sequence."""
    layers, embed, head = param_counts(cfg)
    weights = (layers + (head or embed)) * dtype.itemsize
    return (weights + batch * ctx * kv_bytes_per_token(cfg, dtype)) / HBM_BYTES_PER_S * 1e3


def prefill_floor_ms(cfg: dict, tokens: int) -> float:
    layers, _, _ = param_counts(cfg)
    attn = 2 * tokens * tokens * cfg["num_attention_heads"] * cfg["head_dim"] * cfg["num_hidden_layers"]  # causal
    head = 2 * cfg["vocab_size"] * cfg["hidden_size"]  # logits of the last token
    return (2 * tokens * layers + attn + head) / PEAK_FLOPS * 1e3


# -- pdserve (timing in pdserve_timing.py) -------------------------------------------------------
def bench_pdserve(report: Report, name: str, model_dir: Path, args, dtype: torch.dtype) -> None:
    cfg = ARCHS[name]
    page = 16
    pages_per_seq = -(-(args.ctx + args.warmup + args.steps + 1) // page)
    total = max(max(args.batches) * pages_per_seq * page, max(args.prefill, default=0) + page)
    context_length = max(args.ctx + args.warmup + args.steps + page, max(args.prefill, default=0)) + page
    t0 = time.perf_counter()
    try:
        runner = make_runner(model_dir, args.device, args.dtype, total, context_length, max(args.batches),
                             disable_fused_gemv=args.disable_fused_gemv)
    except RuntimeError:  # graph capture failed: say so, and still measure the eager engine
        report.error(f"{name} pdserve CUDA graph capture")
        runner = make_runner(model_dir, args.device, args.dtype, total, context_length, max(args.batches),
                             disable_cuda_graph=True, disable_fused_gemv=args.disable_fused_gemv)
    graphs = runner.graphs
    note = f"load+capture {time.perf_counter() - t0:.1f}s"
    if graphs is not None:
        note += f", graphs {graphs.capture_seconds:.1f}s {graphs.capture_bytes / 2**20:.0f} MiB"
    report.meta[f"{name}/pdserve"] = note
    print(f"  {name}: pdserve runner ready ({note})", flush=True)
    bench_prefill(report, name, runner, args, "")
    for impl, use_graphs in (("pdserve+graph", True), ("pdserve eager", False)):
        if use_graphs and graphs is None:
            continue
        runner.graphs = graphs if use_graphs else None
        for b in args.batches:
            with guard(report, f"{name} {impl} decode bs={b}"):
                ms = pdserve_decode_ms(runner, b, args.ctx, args.steps, args.warmup)
                report.add(Row(name, impl, f"decode bs={b} ctx={args.ctx}", ms,
                               decode_floor_ms(cfg, dtype, b, args.ctx)))
    runner.graphs = graphs
    for overlap in (True, False):
        impl = "pdserve engine loop" + (" (overlap)" if overlap else " (sync)")
        for b in args.batches:
            with guard(report, f"{name} {impl} decode bs={b}"):
                ms = pdserve_engine_decode_ms(runner, b, args.ctx, args.steps, args.warmup, overlap)
                report.add(Row(name, impl, f"decode bs={b} ctx={args.ctx}", ms,
                               decode_floor_ms(cfg, dtype, b, args.ctx)))
    bench_prefill(report, name, runner, args, " (after the decode runs)")
    del runner, graphs


def host_loop_ms() -> float:
    """The host's speed at Python, for reading host-bound rows across runs (eager prefill, small
    models at large batch): best of 5 timings of a fixed loop of small-object work."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        sum(len(str(i)) for i in range(200_000))
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 2)


def bench_prefill(report: Report, name: str, runner, args, label: str) -> None:
    """Prefill rows; run on a fresh runner and again after the decode runs (the 1k figure moved
    between runs, this tells whether the process's history is why)."""
    prefill_graphs = runner.prefill_graphs
    for impl, graphs in (("pdserve+graph", prefill_graphs), ("pdserve eager", None)):
        if impl == "pdserve+graph" and graphs is None:
            continue
        runner.prefill_graphs = graphs
        for n in args.prefill:
            with guard(report, f"{name} {impl} prefill {n}{label}"):
                ms, note = pdserve_prefill_ms(runner, n, args.reps)
                report.add(Row(name, impl, f"prefill {n}{label}", ms, prefill_floor_ms(ARCHS[name], n), note))
    runner.prefill_graphs = prefill_graphs


# -- transformers -------------------------------------------------------------------------------
def hf_model(model_dir: Path, device: torch.device, dtype: torch.dtype):
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(str(model_dir))
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def hf_prefill_ms(model, tokens: int, reps: int, device: torch.device) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    model(ids, logits_to_keep=1)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1).logits.argmax(-1).tolist()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def filled_dynamic_cache(model, batch: int, ctx: int, device: torch.device):
    """A DynamicCache holding ``ctx`` tokens of (zero) K/V per sequence, without running a prefill."""
    from transformers import DynamicCache

    c = model.config
    cache = DynamicCache(config=c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for layer in range(c.num_hidden_layers):
        kv = torch.zeros(batch, c.num_key_value_heads, ctx, head_dim, dtype=model.dtype, device=device)
        cache.update(kv, kv.clone(), layer)
    return cache


@torch.inference_mode()
def hf_decode_ms(model, batch: int, ctx: int, steps: int, warmup: int, device: torch.device) -> float:
    cache = filled_dynamic_cache(model, batch, ctx, device)
    tok = torch.ones(batch, 1, dtype=torch.long, device=device)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        pos = torch.full((batch, 1), ctx + step, dtype=torch.long, device=device)
        logits = model(tok, past_key_values=cache, position_ids=pos, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        tok.tolist()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


@torch.inference_mode()
def hf_compiled_decode_ms(model, ctx: int, steps: int, device: torch.device) -> float:
    """Batch 1: StaticCache, eager prefill of ``ctx`` tokens, then a torch.compile'd (reduce-overhead,
    fullgraph) one-token step, as in transformers' static-cache guide."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ctx + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=device)
    logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    tok = logits[:, -1].argmax(-1, keepdim=True)

    def one_step(cur, position_ids, cache_position):
        out = model(cur, position_ids=position_ids, cache_position=cache_position, past_key_values=cache,
                    use_cache=True, return_dict=False)[0]
        return out[:, -1].argmax(-1, keepdim=True)

    step_fn = torch.compile(one_step, mode="reduce-overhead", fullgraph=True)
    warmup = 3
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        pos = ctx + step
        tok = step_fn(tok, torch.tensor([[pos]], device=device), torch.tensor([pos], device=device)).clone()
        tok.tolist()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def bench_transformers(report: Report, name: str, model_dir: Path, args, dtype: torch.dtype) -> None:
    device = torch.device(args.device)
    cfg = ARCHS[name]
    model = hf_model(model_dir, device, dtype)
    for n in args.prefill:
        with guard(report, f"{name} transformers prefill {n}"):
            report.add(Row(name, "transformers eager", f"prefill {n}", hf_prefill_ms(model, n, args.reps, device),
                           prefill_floor_ms(cfg, n)))
    for b in args.hf_batches:
        with guard(report, f"{name} transformers decode bs={b}"):
            ms = hf_decode_ms(model, b, args.ctx, args.steps, args.warmup, device)
            report.add(Row(name, "transformers eager", f"decode bs={b} ctx={args.ctx}", ms,
                           decode_floor_ms(cfg, dtype, b, args.ctx)))
    del model


def bench_compile(report: Report, name: str, model_dir: Path, args, dtype: torch.dtype, deadline: float) -> None:
    """transformers + torch.compile, batch 1, within what is left of the total budget."""
    budget = int(min(args.compile_budget_s, deadline - time.perf_counter()))
    if budget < 60:
        report.meta[f"{name}/compile"] = f"skipped: {budget} s left of the total budget"
        print(f"  {name}: torch.compile skipped ({budget} s left)", flush=True)
        return
    device = torch.device(args.device)
    with alarm(budget):
        t0 = time.perf_counter()
        model = hf_model(model_dir, device, dtype)
        ms = hf_compiled_decode_ms(model, args.ctx, args.steps, device)
        report.add(Row(name, "transformers compile", f"decode bs=1 ctx={args.ctx}", ms,
                       decode_floor_ms(ARCHS[name], dtype, 1, args.ctx),
                       note=f"static cache, reduce-overhead; compile+run {time.perf_counter() - t0:.0f}s"))
    del model


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: toy Llama, tiny sizes")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--models", default="llama-3.1-8b,llama-3.2-1b")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"))
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--hf-batches", default="1,8,64", help="transformers eager decode batches")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--prefill", default="1024,4096")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--disable-fused-gemv", action="store_true", help="batch 1 through cuBLAS + separate kernels")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--compile-models", default="llama-3.2-1b,llama-3.1-8b", help="torch.compile section, in order")
    p.add_argument("--compile-budget-s", type=int, default=120, help="per model, torch.compile section")
    p.add_argument("--budget-s", type=int, default=330, help="total; compile sections are skipped past it")
    p.add_argument("--json", default=None, help="default: $OUT/engine_bench.json when $OUT is set")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batches, args.hf_batches, args.ctx, args.prefill = "tiny", "1,2", "1,2", 16, "16,32"
        args.steps, args.warmup, args.reps, args.skip_compile = 3, 1, 2, True
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.batches = [int(x) for x in args.batches.split(",")]
    args.hf_batches = [int(x) for x in args.hf_batches.split(",") if x]
    args.prefill = [int(x) for x in args.prefill.split(",") if x]
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "engine_bench.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    dtype = getattr(torch, args.dtype)
    report = Report(Path(args.json) if args.json else None)
    report.meta.update(device=args.device, dtype=args.dtype, torch=torch.__version__, ctx=args.ctx,
                       gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       hbm_tb_s=HBM_BYTES_PER_S / 1e12, peak_tflops=PEAK_FLOPS / 1e12,
                       host_loop_ms=host_loop_ms(), fused_gemv=not args.disable_fused_gemv)
    print(f"engine_bench: {args.device} {args.dtype}, models {args.models}; host: a fixed Python loop takes "
          f"{report.meta['host_loop_ms']} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = write_model_dir(Path(tmp), name)
            with guard(report, f"{name} pdserve"):
                bench_pdserve(report, name, model_dir, args, dtype)
            if not args.skip_hf:
                with guard(report, f"{name} transformers"):
                    bench_transformers(report, name, model_dir, args, dtype)
        # torch.compile last: its compile time is the least predictable part of the run
        for name in args.compile_models.split(",") if not args.skip_compile and args.device == "cuda" else []:
            with guard(report, f"{name} transformers compile decode bs=1"):
                bench_compile(report, name, write_model_dir(Path(tmp), name), args, dtype, deadline)
    report.meta["seconds"] = round(time.perf_counter() - start, 1)
    report.print_table()
    report.save()
    print(f"engine_bench: {report.meta['seconds']} s" + (f", JSON in {args.json}" if args.json else ""))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
