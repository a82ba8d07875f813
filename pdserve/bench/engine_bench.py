"""Offline engine throughput beside transformers ``generate`` in the same process.

    python -m pdserve.bench.engine_bench --batch-sizes 1,8 --input-len 256 --output-len 64

Output tok/s = batch x output tokens / wall time of the whole generate call (prefill included),
greedy, ignore_eos, same weights (the model's GGUF or folder) and dtype for both. Each figure is
the best of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


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


def load_transformers(model_path: str):
    from transformers import AutoModelForCausalLM
    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.engine_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default="smollm2")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    from pdserve import Engine
    from pdserve.model_pull import resolve_model_path
    path = resolve_model_path(args.model_path, None)
    engine = Engine(model_path=path, max_total_tokens=16384, cpu_threads=args.cpu_threads, device="cpu")
    hf = None if args.skip_transformers else load_transformers(path)
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        ours = bench_pdserve(engine, b, args.input_len, args.output_len, args.repeats)
        theirs = None if hf is None else bench_transformers(hf, b, args.input_len, args.output_len, args.repeats,
                                                            engine.core.vocab_size)
        rows.append({"batch": b, "pdserve_tok_s": ours, "transformers_tok_s": theirs,
                     "speedup": ours / theirs if theirs else None})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {args.input_len} in / {args.output_len} out, greedy")
    print(f"{'batch':>5} {'pdserve tok/s':>14} {'transformers tok/s':>19} {'speedup':>8}")
    for r in rows:
        t = f"{r['transformers_tok_s']:.1f}" if r["transformers_tok_s"] else "-"
        s = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['batch']:>5} {r['pdserve_tok_s']:>14.1f} {t:>19} {s:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
