"""Decode TPOT and prefill time of pdserve's ModelRunner beside transformers, dummy bf16 weights.

    python scripts/gpu/engine_bench.py                 # one GPU: Llama-3.1-8B and Llama-3.2-1B shapes (<= 6 min)
    python scripts/gpu/engine_bench.py --tiny          # CPU smoke test: a toy Llama, same code path

pdserve: the engine's ``ModelRunner`` (dummy weights from a written config.json, Triton kernels,
CUDA graphs for decode). Decode: ``--batches`` sequences of ``--ctx`` cached tokens each, steady
steps of ``runner.forward`` + greedy argmax on the host (what the engine does per step), with
graphs and eagerly. Reported as ms/step and as a fraction of the HBM floor
``(weights + batch x ctx x KV/token) / copy rate``. Prefill: one sequence of ``--prefill`` tokens,
ms and MFU (FLOPs / matmul rate; FLOPs = 2 x tokens x matmul params + causal attention). Both
rates are measured on the card at the start of the run (scripts/gpu/floors.py), never assumed.
Batches are sized from the card's memory: one whose KV pool does not fit (Llama-8B at 256 x 2k on
an 80 GB H100) runs at the largest graph bucket that does, and its note says so; an out-of-memory
is a row of its own ("OOM ..."), not a graph-capture failure.
transformers (same shapes, its own random init; timing does not depend on the values): eager
forward for prefill, eager decode over a DynamicCache filled to ``ctx``, and a torch.compile'd
static-cache decode step at batch 1 when the time budget allows (guarded by an alarm).
Every section is guarded and bounded by its share of ``--budget-s`` (a section over its time is a
TIMEOUT row); the table is printed at the end and JSON is written to $OUT (or --json) after
every row, so a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from floors import (Budget, Deadline, Floors, alarm, classify_failure, failure_note, floors_for,  # noqa: E402
                    is_capture_failure, plan_batches)
from floors import decode_floor_ms as _decode_floor_ms  # noqa: E402
from floors import prefill_floor_ms as _prefill_floor_ms  # noqa: E402
from pdserve_timing import (make_runner, pdserve_decode_ms, pdserve_engine_decode_ms, pdserve_prefill_ms,  # noqa: E402
                            sync)

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
        self.ooms: list[str] = []
        self.json_path = json_path
        self.meta: dict = {}
        self.floors: Floors | None = None

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

    def failed(self, what: str, exc: BaseException, row: tuple[str, str, str] | None = None) -> None:
        """A failed row or section: an OOM is a row saying so (and counted apart from errors)."""
        if row is not None:
            self.add(Row(*row, None, note=failure_note(exc)))
        if classify_failure(exc) == "OOM":
            self.ooms.append(f"{what}: {failure_note(exc)}")
            print(f"  OOM {what}: {failure_note(exc)}", flush=True)
            self.save()
        else:
            self.error(what)

    def save(self) -> None:
        if self.json_path is None:
            return
        data = {"meta": self.meta, "rows": [{**asdict(r), "efficiency": r.efficiency} for r in self.rows],
                "errors": self.errors, "ooms": self.ooms}
        self.json_path.write_text(json.dumps(data, indent=1))

    def print_table(self) -> None:
        print("\n| model | impl | case | ms | floor ms | efficiency | note |\n|---|---|---|---|---|---|---|")
        for r in self.rows:
            ms = "-" if r.ms is None else f"{r.ms:.3f}"
            floor = "" if r.floor_ms is None else f"{r.floor_ms:.3f}"
            print(f"| {r.model} | {r.impl} | {r.case} | {ms} | {floor} | {r.efficiency.strip()} | {r.note} |")
        if self.errors or self.ooms:
            print(f"\n{len(self.errors)} section(s) failed (see ERROR lines above), {len(self.ooms)} out of memory")


@contextmanager
def guard(report: Report, what: str, row: tuple[str, str, str] | None = None):
    """One row: a failure is recorded (an OOM as a row of its own) and the next row runs. A
    section's Deadline is a BaseException and goes through to ``section``."""
    try:
        yield
    except Exception as e:  # one failing row must not hide the rest
        report.failed(what, e, row)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def section(report: Report, budget: Budget, what: str, share: float, fn, *args, at_least: float = 0.0) -> None:
    """Run ``fn(*args)`` within ``share`` of --budget-s (no more than is left): skipped, with a
    note, when nothing is left; a TIMEOUT row when it runs over."""
    seconds = budget.section_s(share, at_least)
    if seconds == 0:
        report.meta.setdefault("skipped", []).append(f"{what}: {budget.left():.0f} s left of --budget-s")
        print(f"  {what}: skipped ({budget.left():.0f} s left of --budget-s)", flush=True)
        return
    try:
        with alarm(seconds):
            fn(*args)
    except Deadline:
        report.add(Row(what.split()[0], what.split(" ", 1)[-1], "section", None,
                       note=f"TIMEOUT: over its {seconds} s of --budget-s; later rows of it did not run"))
    except Exception as e:
        report.failed(what, e)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- floors: scripts/gpu/floors.py, against the rates measured at the start of this run --------------
FLOORS: list[Floors] = []  # the run's measured floors (set in main)


def decode_floor_ms(cfg: dict, dtype: torch.dtype, batch: int, ctx: int) -> float:
    return _decode_floor_ms(cfg, dtype.itemsize, batch, ctx, FLOORS[0])


def prefill_floor_ms(cfg: dict, tokens: int) -> float:
    return _prefill_floor_ms(cfg, tokens, FLOORS[0])


# -- pdserve (timing in pdserve_timing.py) -------------------------------------------------------
def sized_batches(report: Report, name: str, batches: list[int], tokens_per_seq: int, dtype: torch.dtype,
                  impl: str) -> list[tuple[int, str]]:
    """(batch, note) to run, from the card's memory (floors.plan_batches); a batch nothing fits for
    is a row saying so."""
    out = []
    for plan in plan_batches(ARCHS[name], dtype.itemsize, batches, tokens_per_seq, FLOORS[0].total_bytes):
        if plan.batch is None:
            report.add(Row(name, impl, f"decode bs={plan.asked}", None, note=f"does not fit: {plan.note}"))
        else:
            out.append((plan.batch, plan.note))
        if plan.note:
            print(f"  {name} {impl}: {plan.note}", flush=True)
    return out


def build_runner(report: Report, name: str, model_dir: Path, args, total: int, context_length: int, max_bs: int):
    """The ModelRunner, or None. A graph-capture failure (an OOM or not) is recorded as a row and
    the engine is built again without graphs; an OOM of the pool itself leaves nothing to run."""
    kw = dict(disable_fused_gemv=args.disable_fused_gemv)
    what = f"runner: pool {total} tokens, graphs to bs={max_bs}"
    try:
        return make_runner(model_dir, args.device, args.dtype, total, context_length, max_bs, **kw)
    except Exception as e:
        report.failed(f"{name} pdserve runner", e, (name, "pdserve+graph", what))
        if not is_capture_failure(e):
            return None
    gc.collect()
    torch.cuda.empty_cache()
    with guard(report, f"{name} pdserve eager runner", (name, "pdserve eager", what)):
        return make_runner(model_dir, args.device, args.dtype, total, context_length, max_bs,
                           disable_cuda_graph=True, **kw)
    return None


def bench_pdserve(report: Report, name: str, model_dir: Path, args, dtype: torch.dtype) -> None:
    cfg = ARCHS[name]
    page = 16
    pages_per_seq = -(-(args.ctx + args.warmup + args.steps + 1) // page)
    batches = sized_batches(report, name, args.batches, pages_per_seq * page, dtype, "pdserve")
    if not batches:
        return
    max_bs = max(b for b, _ in batches)
    total = max(max_bs * pages_per_seq * page, max(args.prefill, default=0) + page)
    context_length = max(args.ctx + args.warmup + args.steps + page, max(args.prefill, default=0)) + page
    t0 = time.perf_counter()
    runner = build_runner(report, name, model_dir, args, total, context_length, max_bs)
    if runner is None:
        return
    graphs = runner.graphs
    note = f"load+capture {time.perf_counter() - t0:.1f}s, pool {total} tokens"
    if graphs is not None:
        note += f", graphs {graphs.capture_seconds:.1f}s {graphs.capture_bytes / 2**20:.0f} MiB"
    report.meta[f"{name}/pdserve"] = note
    print(f"  {name}: pdserve runner ready ({note})", flush=True)
    bench_prefill(report, name, runner, args, "")
    for impl, use_graphs in (("pdserve+graph", True), ("pdserve eager", False)):
        if use_graphs and graphs is None:
            continue
        runner.graphs = graphs if use_graphs else None
        decode_rows(report, name, impl, batches, dtype, args,
                    lambda b: pdserve_decode_ms(runner, b, args.ctx, args.steps, args.warmup))
    runner.graphs = graphs
    for overlap in (True, False):
        impl = "pdserve engine loop" + (" (overlap)" if overlap else " (sync)")
        decode_rows(report, name, impl, batches, dtype, args,
                    lambda b: pdserve_engine_decode_ms(runner, b, args.ctx, args.steps, args.warmup, overlap))
    bench_prefill(report, name, runner, args, " (after the decode runs)")
    del runner, graphs


def decode_rows(report: Report, name: str, impl: str, batches: list[tuple[int, str]], dtype: torch.dtype, args,
                time_ms) -> None:
    """One row per (batch, sizing note): ``time_ms(batch)`` against the floor at that batch."""
    for b, sizing in batches:
        case = f"decode bs={b} ctx={args.ctx}"
        with guard(report, f"{name} {impl} {case}", (name, impl, case)):
            report.add(Row(name, impl, case, time_ms(b), decode_floor_ms(ARCHS[name], dtype, b, args.ctx), sizing))


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
            with guard(report, f"{name} {impl} prefill {n}{label}", (name, impl, f"prefill {n}{label}")):
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
        impl, case = "transformers eager", f"prefill {n}"
        with guard(report, f"{name} {impl} {case}", (name, impl, case)):
            report.add(Row(name, impl, case, hf_prefill_ms(model, n, args.reps, device), prefill_floor_ms(cfg, n)))
    batches = sized_batches(report, name, args.hf_batches, args.ctx + args.warmup + args.steps, dtype,
                            "transformers eager")
    decode_rows(report, name, "transformers eager", batches, dtype, args,
                lambda b: hf_decode_ms(model, b, args.ctx, args.steps, args.warmup, device))
    del model


def bench_compile(report: Report, name: str, model_dir: Path, args, dtype: torch.dtype) -> None:
    """transformers + torch.compile, batch 1 (bounded by its ``section``)."""
    device = torch.device(args.device)
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
    p.add_argument("--compile-budget-s", type=int, default=120,
                   help="per model, torch.compile section (within what --budget-s has left; skipped under 60 s)")
    p.add_argument("--budget-s", type=int, default=330,
                   help="total for every section; each gets its share of it, never more than is left")
    p.add_argument("--pdserve-share", type=float, default=0.35, help="of --budget-s, per model's pdserve section")
    p.add_argument("--hf-share", type=float, default=0.15, help="of --budget-s, per model's transformers section")
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
    budget = Budget(args.budget_s)
    dtype = getattr(torch, args.dtype)
    report = Report(Path(args.json) if args.json else None)
    FLOORS[:] = [floors_for(args.device, quick=args.tiny)]
    report.floors = FLOORS[0]
    report.meta.update(device=args.device, dtype=args.dtype, torch=torch.__version__, ctx=args.ctx,
                       **FLOORS[0].meta(), budget_s=args.budget_s,
                       host_loop_ms=host_loop_ms(), fused_gemv=not args.disable_fused_gemv)
    print(f"engine_bench: {args.device} {args.dtype}, models {args.models}; floors measured now: "
          f"{FLOORS[0].line()}; host: a fixed Python loop takes {report.meta['host_loop_ms']} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = write_model_dir(Path(tmp), name)
            section(report, budget, f"{name} pdserve", args.pdserve_share, bench_pdserve,
                    report, name, model_dir, args, dtype)
            if not args.skip_hf:
                section(report, budget, f"{name} transformers", args.hf_share, bench_transformers,
                        report, name, model_dir, args, dtype)
        # torch.compile last: its compile time is the least predictable part of the run
        for name in args.compile_models.split(",") if not args.skip_compile and args.device == "cuda" else []:
            section(report, budget, f"{name} transformers compile", args.compile_budget_s / args.budget_s,
                    bench_compile, report, name, write_model_dir(Path(tmp), name), args, dtype, at_least=60)
    report.meta["seconds"] = round(time.perf_counter() - start, 1)
    report.print_table()
    report.save()
    print(f"engine_bench: {report.meta['seconds']} s" + (f", JSON in {args.json}" if args.json else ""))
    return 1 if report.errors or report.ooms else 0


if __name__ == "__main__":
    sys.exit(main())
