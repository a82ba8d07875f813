"""What the structured-output mask costs per decode step, at batch 1 / 8 / 32 (issue 15).

    python -m pdserve.bench.grammar_bench --batch-sizes 1,8,32 --steps 200

Every row of the batch carries a grammar (the worst case: a batch with fewer grammar rows pays
for those only) and sits at a different point of a valid document, so the matchers are in
varied states. A step is what the sampler adds for grammar rows: catch each matcher up by one
token, fill its bitmask row, copy the bitmask to the logits' device, set forbidden logits to
-inf. It is timed against the draw itself (greedy argmax / sampling over ``[B, V]`` logits) to
put it in proportion. Grammars: a JSON schema, json_object, and a tool call (structural tag,
``tool_choice="auto"``), in the text before the call (free text with a trigger watch).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pdserve.router.tools import tool_grammar
from pdserve.runtime.grammar import GrammarBackend
from pdserve.runtime.request import Request
from pdserve.runtime.sampler import Sampler
from pdserve.sampling_params import GrammarSpec, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}}, "required": ["name", "age", "tags", "address"]}
DOC = json.dumps({"name": "Ada Lovelace, Countess of Lovelace", "age": 36,
                  "tags": [f"mathematician {i}" for i in range(60)],
                  "address": {"city": "London", "zip": "W1"}})
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TEXT = ("The weather in Paris is mild in spring, with rain showers and sunny spells; "
        "summers are warm and winters cool, and the city is lovely in every season. ") * 12
CASES = {
    "json_schema": (GrammarSpec(kind="json_schema", source=json.dumps(SCHEMA)), DOC),
    "json_object": (GrammarSpec(kind="json_object"), DOC),
    "tools_auto_text": (tool_grammar([TOOL], "auto"), TEXT),
}


def make_batch(tokenizer, spec: GrammarSpec, text: str, batch: int, steps: int) -> list[tuple[Request, list[int]]]:
    """``batch`` requests, row i already ``i * stride`` tokens into ``text``, each with the tokens
    it will take over ``steps`` steps (the document wraps around by restarting the request)."""
    ids = tokenizer.encode(text)
    stride = max(1, (len(ids) - steps - 1) // max(batch, 1))
    rows = []
    for i in range(batch):
        start = min(i * stride, max(0, len(ids) - steps - 1))
        req = Request(rid=f"r{i}", prompt_ids=[1], params=SamplingParams(grammar=spec))
        req.output_ids = ids[:start]
        rows.append((req, ids[start:]))
    return rows


def time_case(backend: GrammarBackend, sampler: Sampler, rows, vocab: int, steps: int) -> dict:
    reqs = [r for r, _ in rows]
    backend.mask_logits(torch.zeros(len(reqs), vocab), reqs)          # compile + catch up, untimed
    mask_ms, draw_ms = [], []
    for step in range(steps):
        for req, future in rows:
            if step < len(future):
                req.output_ids.append(future[step])
        logits = torch.randn(len(reqs), vocab)
        t0 = time.perf_counter()
        backend.mask_logits(logits, reqs)
        t1 = time.perf_counter()
        sampler._draw(logits, reqs)
        t2 = time.perf_counter()
        mask_ms.append((t1 - t0) * 1e3)
        draw_ms.append((t2 - t1) * 1e3)
    return {"mask_ms_p50": statistics.median(mask_ms), "mask_ms_mean": statistics.fmean(mask_ms),
            "mask_ms_p99": sorted(mask_ms)[int(0.99 * (len(mask_ms) - 1))], "draw_ms_p50": statistics.median(draw_ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy draw; else sampled")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.cpu_threads)
    from pdserve.model_pull import resolve_model_path
    from pdserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path("smollm2"))
    vocab = tokenizer.vocab_size
    sampler = Sampler(vocab)
    results = []
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch threads {args.cpu_threads}, "
          f"vocab {vocab}, {args.steps} steps")
    print("| grammar | batch | mask ms/step p50 | mean | p99 | draw ms/step p50 |")
    print("|---|---|---|---|---|---|")
    for name, (spec, text) in CASES.items():
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            backend = GrammarBackend(lambda: tokenizer, vocab)
            rows = make_batch(tokenizer, spec, text, batch, args.steps)
            for req, _ in rows:
                req.params = SamplingParams(grammar=spec, temperature=args.temperature)
            res = time_case(backend, sampler, rows, vocab, args.steps)
            results.append({"grammar": name, "batch": batch, **res})
            print(f"| {name} | {batch} | {res['mask_ms_p50']:.3f} | {res['mask_ms_mean']:.3f} | "
                  f"{res['mask_ms_p99']:.3f} | {res['draw_ms_p50']:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
