"""Offline engine throughput beside transformers ``generate`` in the same process.

    python -m pdserve.bench.engine_bench --batch-sizes 1,8 --input-len 256 --output-len 64 \\
        --dtype float32,bfloat16 --quantization none,w8a8_int8 --transformers-dtype float32,bfloat16

Output tok/s = batch x output tokens / wall time of the whole generate call (prefill included),
greedy, ignore_eos, same weights (the model's GGUF or folder). Every pdserve configuration
(each ``--dtype`` x each ``--quantization``) is printed beside every transformers dtype
(``--transformers-dtype``), so same-dtype ratios are visible next to the others. Each figure is
the best of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Row:
    batch: int
    engine: str          # "pdserve" or "transformers"
    dtype: str
    quantization: str    # "none" for unquantized
    tok_s: float


def _prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, input_len), generator=g).tolist()


def bench_pdserve(engine, batch: int, input_len: int, output_len: int, repeats: int) -> float:
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    best = float("inf")
    for r in range(repeats + 1):
        prompts = _prompts(batch, input_len, engine.core.vocab_size, seed=1000 + r)  # fresh: no prefix-cache hits
        t = time.perf_counter()
        out = engine.generate(prompts, params)
        dt = time.perf_counter() - t
        assert all(len(o["token_ids"]) == output_len for o in out)
        if r:
            best = min(best, dt)
    return batch * output_len / best


def bench_transformers(model, batch: int, input_len: int, output_len: int, repeats: int, vocab: int) -> float:
    best = float("inf")
    for r in range(repeats + 1):
        ids = torch.tensor(_prompts(batch, input_len, vocab, seed=2000 + r))
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t
        assert out.shape[1] == input_len + output_len
        if r:
            best = min(best, dt)
    return batch * output_len / best


def load_transformers(model_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM
    torch_dtype = getattr(torch, dtype)
    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).eval()


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run_pdserve(path: str, args, batches: list[int]) -> list[Row]:
    from pdserve import Engine
    rows = []
    for dtype in _csv(args.dtype):
        for quant in _csv(args.quantization):
            engine = Engine(model_path=path, max_total_tokens=16384, cpu_threads=args.cpu_threads, device="cpu",
                            dtype=dtype, quantization=None if quant == "none" else quant)
            for b in batches:
                tok_s = bench_pdserve(engine, b, args.input_len, args.output_len, args.repeats)
                rows.append(Row(b, "pdserve", dtype, quant, tok_s))
            del engine
            gc.collect()
    return rows


def run_transformers(path: str, args, batches: list[int]) -> list[Row]:
    rows = []
    for dtype in _csv(args.transformers_dtype):
        model = load_transformers(path, dtype)
        vocab = model.config.vocab_size
        for b in batches:
            rows.append(Row(b, "transformers", dtype, "none",
                            bench_transformers(model, b, args.input_len, args.output_len, args.repeats, vocab)))
        del model
        gc.collect()
    return rows


def format_table(rows: list[Row]) -> str:
    """One line per (batch, engine configuration); one ratio column per transformers dtype."""
    base = {(r.batch, r.dtype): r.tok_s for r in rows if r.engine == "transformers"}
    base_dtypes = sorted({r.dtype for r in rows if r.engine == "transformers"}, key=lambda d: d != "float32")
    head = f"{'batch':>5}  {'engine':<12} {'dtype':<9} {'quantization':<12} {'tok/s':>8}"
    head += "".join(f"  {'vs HF ' + d:>16}" for d in base_dtypes)
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.batch, r.engine != "transformers")):
        line = f"{r.batch:>5}  {r.engine:<12} {r.dtype:<9} {r.quantization:<12} {r.tok_s:>8.1f}"
        for d in base_dtypes:
            ref = base.get((r.batch, d))
            line += f"  {(f'{r.tok_s / ref:.2f}x' if ref else '-'):>16}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.engine_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default="smollm2")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", help="pdserve --dtype values, comma-separated")
    ap.add_argument("--quantization", default="none", help="pdserve --quantization values (none, w8a8_int8), "
                    "comma-separated; every dtype runs with every quantization")
    ap.add_argument("--transformers-dtype", default="float32,bfloat16",
                    help="dtypes of the transformers baseline, comma-separated")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    from pdserve.model_pull import resolve_model_path
    from pdserve.models.quant import check_quantization
    for q in _csv(args.quantization):
        check_quantization(None if q == "none" else q)
    path = resolve_model_path(args.model_path, None)
    batches = [int(x) for x in _csv(args.batch_sizes)]
    rows = run_pdserve(path, args, batches)
    if not args.skip_transformers:
        rows += run_transformers(path, args, batches)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {args.input_len} in / {args.output_len} out, greedy, "
          f"best of {args.repeats}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
