"""pdserve against transformers with the same random weights (bf16 on GPU): greedy tokens and logits.

    python scripts/gpu/gpu_parity.py                   # H200: Llama-3.1-8B and Qwen3-8B shapes, 8 layers
    python scripts/gpu/gpu_parity.py --layers 0        # all layers (32 / 36)
    python scripts/gpu/gpu_parity.py --tiny            # CPU smoke test: toy Llama + toy Qwen3, fp32

Per model: HF-named weights are drawn once (matrices N(0, --std), the LM head N(0, --head-std) so
logits are not near-uniform, norms 1 + N(0, 0.1)) and loaded into both transformers and pdserve's
``ModelRunner`` (Triton kernels, CUDA graphs). ``--prompts`` random prompts of different lengths
are prefilled together in one ragged step, then decoded greedily as one batch for
``--new-tokens`` steps (a batch of 3 replays the bucket-4 graph: one padding row; the prefill
step replays a prefill graph, padded to its token bucket). Checks:

1. greedy tokens equal to transformers' ``generate`` (greedy) per prompt; where they differ, the
   HF top-1/top-2 margin at the first difference says whether it is a bf16 near-tie;
2. teacher-forced logits: transformers run once over pdserve's own output sequence; at every
   generated position max |logit diff| / std(logits), and top-1 agreement (disagreements with a
   margin under --tie-margin x std count as ties, reported separately);
3. graph vs eager: the same prefill and decode steps run without CUDA graphs give the same tokens.

Exit status 1 on any non-tie disagreement, a relative logit error over --rtol, greedy tokens that
differ from transformers', or a crash (fp32); 16-bit runs also measure their tolerance
(``add_baselines``: transformers with eager attention against transformers with SDPA, and both
engines against transformers in fp32) and are judged by it, and the same model is checked again
in fp32, where greedy tokens must equal transformers' (``verdict``; ``--skip-fp32`` leaves it out).
The 16-bit run's top-1 agreement with transformers (teacher-forced) is reported beside it.
JSON to $OUT/gpu_parity.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from engine_bench import ARCHS, write_model_dir  # noqa: E402
from pdserve_timing import make_runner  # noqa: E402


def make_weights(config: dict, seed: int, std: float, head_std: float, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors for a Llama-family config (names and shapes from pdserve's dummy loader)."""
    from pdserve.loader.dummy import hf_weight_shapes
    from pdserve.models.arch import ModelArch

    out = {}
    for name, shape in hf_weight_shapes(ModelArch.from_hf_config(config)):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            values = 1 + 0.1 * noise
        else:
            values = noise * (head_std if name == "lm_head.weight" else std)
        out[name] = values.to(dtype)
    if config.get("tie_word_embeddings"):
        out["model.embed_tokens.weight"] = (out["model.embed_tokens.weight"].float() * head_std / std).to(dtype)
    return out


def hf_model(model_dir: Path, weights: dict, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(str(model_dir))
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"transformers state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], new_tokens: int, device: torch.device) -> tuple[list[int], list[float]]:
    """Greedy continuation and the top-1/top-2 logit margin at each step."""
    ids = torch.tensor([prompt], device=device)
    model.generation_config.eos_token_id = None  # no early stop and no EOS suppression: plain argmax
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    margins = []
    for step_logits in out.logits:
        top2 = step_logits[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return tokens, margins


@torch.inference_mode()
def hf_logits(model, sequence: list[int], device: torch.device) -> torch.Tensor:
    return model(torch.tensor([sequence], device=device)).logits[0].float()  # [len, vocab]


@torch.inference_mode()
def pdserve_generate(runner, prompts: list[list[int]], new_tokens: int, use_graphs: bool):
    """One ragged prefill step for all prompts, then batched greedy decode. -> (tokens, logits per step)."""
    from pdserve.runtime.forward import SeqChunk

    page = runner.layout.page_size
    graphs, prefill_graphs = runner.graphs, runner.prefill_graphs
    if not use_graphs:
        runner.graphs = runner.prefill_graphs = None
    try:
        per_seq = -(-(max(map(len, prompts)) + new_tokens + 1) // page)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
        logits = runner.forward([SeqChunk(f"p{i}", p, 0, tables[i]) for i, p in enumerate(prompts)]).clone()
        steps = [logits]  # [B, vocab] per generated position
        tokens = [[t] for t in logits.argmax(-1).tolist()]
        for step in range(new_tokens - 1):
            seqs = [SeqChunk(f"p{i}", [tokens[i][-1]], len(p) + step, tables[i]) for i, p in enumerate(prompts)]
            logits = runner.forward(seqs).clone()
            steps.append(logits)
            for i, t in enumerate(logits.argmax(-1).tolist()):
                tokens[i].append(t)
    finally:
        runner.graphs, runner.prefill_graphs = graphs, prefill_graphs
    return tokens, torch.stack(steps, dim=1).float()  # tokens [B][n]; logits [B, n, vocab]


def compare_logits(ours: torch.Tensor, ref: torch.Tensor, tie_margin: float) -> dict:
    """ours/ref [n, vocab] at the same positions -> max relative diff, top-1 agreement, ties."""
    scale = float(ref.std())
    diff = float((ours - ref).abs().max())
    ours_top, ref_top = ours.argmax(-1), ref.argmax(-1)
    disagree = (ours_top != ref_top).nonzero().flatten().tolist()
    ties, real = [], []
    for pos in disagree:
        margin = float(ref[pos, ref_top[pos]] - ref[pos, ours_top[pos]])  # how much HF prefers its own pick
        (ties if margin < tie_margin * scale else real).append({"pos": pos, "margin": round(margin, 4)})
    return {"max_abs_diff": float(f"{diff:.3g}"), "logit_std": float(f"{scale:.3g}"), "rel_diff": float(f"{diff / scale:.3g}"),
            "top1_agree": round(1 - len(disagree) / ours.shape[0], 4), "positions": int(ours.shape[0]),
            "ties": ties, "disagreements": real}


def check_model(name: str, args, root: Path, device: torch.device, dtype: torch.dtype) -> dict:
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model_dir = write_model_dir(root, name, **overrides)
    config = json.loads((model_dir / "config.json").read_text())
    weights = make_weights(config, args.seed, args.std, args.head_std, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    lengths = [args.prompt_len + 37 * i for i in range(args.prompts)]
    prompts = [torch.randint(3, config["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    ctx = max(lengths) + args.new_tokens + 32
    sizes = dict(total_tokens=len(prompts) * (ctx + 16), context_length=ctx, cuda_graph_max_bs=8,
                 attention_backend=args.attention_backend)
    capture_error = None
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        runner = make_runner(model_dir, args.device, dtype_name, **sizes)
    except RuntimeError as e:  # graph capture failed: report it, still check the eager engine
        traceback.print_exc()
        capture_error = str(e)
        runner = make_runner(model_dir, args.device, dtype_name, disable_cuda_graph=True, **sizes)
    runner.model.load_weights(weights.items())  # in place: captured graphs keep reading these tensors
    if device.type == "cpu" and args.attention_backend == "triton":  # CPU: the graph path, run eagerly
        from pdserve.runtime.cuda_graph import CudaGraphRunner
        from pdserve.runtime.prefill_graph import PrefillGraphRunner
        runner.graphs = CudaGraphRunner(runner, 8, emulate=True)
        runner.prefill_graphs = PrefillGraphRunner(runner, 512, 8, emulate=True)
        for graphs in (runner.graphs, runner.prefill_graphs):
            graphs.capture()
    ours, our_logits = pdserve_generate(runner, prompts, args.new_tokens, use_graphs=True)
    eager, _ = pdserve_generate(runner, prompts, args.new_tokens, use_graphs=False)
    result = {"model": name, "dtype": dtype_name, "layers": config["num_hidden_layers"],
              "graphs": runner.graphs is not None,
              "emulated": bool(runner.graphs is not None and runner.graphs.emulate), "capture_error": capture_error,
              "graph_vs_eager_tokens_equal": ours == eager, "prompts": []}
    del runner
    model = hf_model(model_dir, weights, device, dtype)
    hf_runs = []
    for i, prompt in enumerate(prompts):
        ref_tokens, margins = hf_greedy(model, prompt, args.new_tokens, device)
        first = _first_diff(ours[i], ref_tokens)
        forced = hf_logits(model, prompt + ours[i], device)[len(prompt) - 1:-1]  # [n, vocab] at our positions
        cmp = compare_logits(our_logits[i].to(forced.device), forced, args.tie_margin)
        result["prompts"].append({"prompt_len": len(prompt), "greedy_equal": first is None, "first_diff": first,
                                  "hf_margin_at_first_diff": None if first is None else round(margins[first], 4),
                                  **cmp})
        hf_runs.append((ref_tokens, forced))
    del model
    if dtype != torch.float32 and not args.skip_baselines:
        add_baselines(result, model_dir, weights, prompts, ours, our_logits, hf_runs, args, device, dtype)
    return result


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def add_baselines(result: dict, model_dir: Path, weights: dict, prompts, ours, our_logits, hf_runs, args,
                  device, dtype) -> None:
    """What 'bf16 tolerance' is on these weights, measured: transformers against itself with its
    eager attention instead of SDPA (same dtype), and each bf16 engine against transformers in
    fp32 (teacher-forced over pdserve's tokens)."""
    model = hf_model(model_dir, weights, device, dtype, attn="eager")
    eager = [(hf_greedy(model, p, args.new_tokens, device)[0], hf_logits(model, p + ours[i], device)[len(p) - 1:-1])
             for i, p in enumerate(prompts)]
    del model
    model = hf_model(model_dir, {k: v.float() for k, v in weights.items()}, device, torch.float32)
    for i, p in enumerate(prompts):
        truth = hf_logits(model, p + ours[i], device)[len(p) - 1:-1]
        (sdpa_tokens, sdpa_logits), (eager_tokens, eager_logits) = hf_runs[i], eager[i]
        std = float(truth.std())
        result["prompts"][i]["baselines"] = {
            "hf_eager_vs_sdpa_first_diff": _first_diff(eager_tokens, sdpa_tokens),
            "hf_eager_vs_sdpa_rel_diff": round(float((eager_logits - sdpa_logits).abs().max()) / std, 4),
            "ours_vs_fp32_rel_diff": round(float((our_logits[i].to(truth.device) - truth).abs().max()) / std, 4),
            "hf_vs_fp32_rel_diff": round(float((sdpa_logits - truth).abs().max()) / std, 4),
            "ours_top1_vs_fp32": round(float((our_logits[i].to(truth.device).argmax(-1) == truth.argmax(-1))
                                             .float().mean()), 4),
            "hf_top1_vs_fp32": round(float((sdpa_logits.argmax(-1) == truth.argmax(-1)).float().mean()), 4),
        }
    del model


def verdict(result: dict, rtol: float) -> list[str]:
    """fp32: logits within ``rtol`` x std and no top-1 change outside a near-tie. 16-bit with the
    baselines: the tolerance is what was measured on the same weights, i.e. pdserve may differ from
    transformers by as much as transformers differs from itself (eager vs SDPA attention), and must
    be as close to the fp32 logits as transformers' 16-bit run is (within 25%)."""
    problems = [f"fp32: {p}" for p in verdict(result["fp32"], rtol)] if "fp32" in result else []
    if result["capture_error"]:
        problems.append(f"CUDA graph capture failed: {result['capture_error'][:300]}")
    if not result["graph_vs_eager_tokens_equal"]:
        problems.append("graph and eager decode disagree")
    for p in result["prompts"]:
        name, base = f"prompt {p['prompt_len']}", p.get("baselines")
        if result.get("dtype") == "float32" and not p["greedy_equal"]:
            problems.append(f"{name}: greedy token {p['first_diff']} differs from transformers "
                            f"(HF top-2 margin there {p['hf_margin_at_first_diff']})")
        if base is None:
            if p["disagreements"]:
                problems.append(f"{name}: top-1 differs (not a tie) at {p['disagreements'][:3]}")
            if p["rel_diff"] > rtol:
                problems.append(f"{name}: max logit diff {p['rel_diff']:.3f} x std > {rtol}")
            continue
        allowed = max(rtol, base["hf_eager_vs_sdpa_rel_diff"])
        if p["rel_diff"] > allowed:
            problems.append(f"{name}: max logit diff vs transformers {p['rel_diff']:.3f} x std > {allowed:.3f} "
                            "(transformers eager vs SDPA)")
        if base["ours_vs_fp32_rel_diff"] > 1.25 * base["hf_vs_fp32_rel_diff"]:
            problems.append(f"{name}: {base['ours_vs_fp32_rel_diff']:.3f} x std from fp32, transformers 16-bit "
                            f"{base['hf_vs_fp32_rel_diff']:.3f}")
    return problems


def top1_summary(result: dict) -> str:
    """Top-1 agreement with transformers over every generated position (teacher-forced), and the
    fp32 check's greedy equality, in one line."""
    positions = sum(p["positions"] for p in result["prompts"])
    agree = sum(round(p["top1_agree"] * p["positions"]) for p in result["prompts"])
    ties = sum(len(p["ties"]) for p in result["prompts"])
    line = (f"{result['dtype']} top-1 agreement with transformers: {agree}/{positions} = {agree / positions:.1%} "
            f"({ties} of the misses near-ties)")
    if "fp32" in result:
        fp32 = result["fp32"]["prompts"]
        line += f"; fp32 greedy tokens equal to transformers: {sum(p['greedy_equal'] for p in fp32)}/{len(fp32)} prompts"
    return line


def print_result(result: dict, problems: list[str]) -> None:
    graphs = "off" if not result["graphs"] else "emulated" if result["emulated"] else "on"
    print(f"\n{result['model']} ({result['layers']} layers, CUDA graphs {graphs}; "
          f"graph == eager tokens: {result['graph_vs_eager_tokens_equal']})")
    print("| dtype | prompt | greedy equal | first diff (HF margin) | max |dlogit| | / std | top-1 agree | ties |")
    print("|---|---|---|---|---|---|---|---|")
    for run in (result, result.get("fp32")):
        for p in run["prompts"] if run else []:
            diff = "-" if p["first_diff"] is None else f"{p['first_diff']} ({p['hf_margin_at_first_diff']})"
            print(f"| {run['dtype']} | {p['prompt_len']} | {p['greedy_equal']} | {diff} | {p['max_abs_diff']} | "
                  f"{p['rel_diff']} | {p['top1_agree']:.1%} | {len(p['ties'])} |")
    if any("baselines" in p for p in result["prompts"]):
        print("bf16 baselines (teacher-forced over pdserve's tokens; / std of the fp32 logits):")
        print("| prompt | HF eager vs HF sdpa: first token diff | / std | pdserve vs HF fp32 | HF bf16 vs HF fp32 |"
              " top-1 = fp32: pdserve | HF bf16 |")
        print("|---|---|---|---|---|---|---|")
        for p in result["prompts"]:
            b = p["baselines"]
            print(f"| {p['prompt_len']} | {b['hf_eager_vs_sdpa_first_diff']} | {b['hf_eager_vs_sdpa_rel_diff']} | "
                  f"{b['ours_vs_fp32_rel_diff']} | {b['hf_vs_fp32_rel_diff']} | {b['ours_top1_vs_fp32']:.1%} | "
                  f"{b['hf_top1_vs_fp32']:.1%} |")
    print(top1_summary(result))
    print("PASS" if not problems else "FAIL: " + "; ".join(problems), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: toy Llama + toy Qwen3, fp32")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--models", default="llama-3.1-8b,qwen3-8b")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (0 = the model's own count)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"))
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--head-std", type=float, default=0.08, help="LM head std (spreads the logits)")
    p.add_argument("--tie-margin", type=float, default=0.05, help="x logit std: a closer top-2 is a tie")
    p.add_argument("--rtol", type=float, default=0.1, help="max |logit diff| / logit std allowed")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="--tiny on CPU: triton (interpreter) + the graph runner's padded path, run eagerly")
    p.add_argument("--skip-baselines", action="store_true",
                   help="16-bit runs: skip transformers eager-attention and fp32 runs (the bf16 noise baselines)")
    p.add_argument("--skip-fp32", action="store_true",
                   help="16-bit runs: skip the fp32 check (pdserve's greedy tokens equal to transformers' in fp32)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.layers, args.prompt_len, args.new_tokens = "tiny,tiny-qwen3", 0, 9, 6
        if args.attention_backend == "auto":
            args.attention_backend = "triton"
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "gpu_parity.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"gpu_parity: {args.device} {args.dtype}, models {args.models}, "
          f"{'all' if not args.layers else args.layers} layers, {args.prompts} prompts x {args.new_tokens} tokens")
    results, failed = [], False
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                result = check_model(name, args, Path(tmp), device, dtype)
                if dtype != torch.float32 and not args.skip_fp32:
                    result["fp32"] = check_model(name, args, Path(tmp), device, torch.float32)
                problems = verdict(result, args.rtol)
                print_result(result, problems)
                result["problems"] = problems
            except Exception:
                traceback.print_exc()
                result, problems = {"model": name, "error": traceback.format_exc(limit=4)}, ["crashed"]
            failed |= bool(problems)
            results.append(result)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"gpu_parity: {'FAIL' if failed else 'PASS'} in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
