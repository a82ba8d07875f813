"""GPU check of the tensor-parallel engine: greedy tokens of a dummy-weight model at --tp 1 and at
--tp N (N = visible GPUs, when > 1), with CUDA graphs and eagerly, and the decode step time of each.

    python scripts/gpu_tp_check.py [--arch llama-3.2-1b] [--tokens 32]

On one GPU it checks that the TP-aware runner (rank layout, pools, graphs) still serves tp=1 with
and without CUDA graphs, token for token. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    from pdserve import Engine

    folder = Path(tempfile.mkdtemp()) / a.arch
    subprocess.run([sys.executable, str(Path(__file__).parent / "gpu" / "make_dummy_model.py"), str(folder),
                    "--arch", a.arch], check=True)
    prompts = [[128000 + 0, *range(100, 100 + n)] for n in (5, 300, 1000)]
    configs = [dict(tp=1), dict(tp=1, disable_cuda_graph=True)]
    if torch.cuda.device_count() > 1:
        configs += [dict(tp=torch.cuda.device_count()), dict(tp=2, dp=2, enable_dp_attention=True)]
    reference = None
    for cfg in configs:
        with Engine(model_path=str(folder), load_format="dummy", max_total_tokens=32768, **cfg) as engine:
            engine.generate(prompts[:1], {"temperature": 0, "max_new_tokens": 4})   # warm-up
            t0 = time.perf_counter()
            out = engine.generate(prompts, {"temperature": 0, "max_new_tokens": a.tokens, "ignore_eos": True})
            seconds = time.perf_counter() - t0
        tokens = [o["token_ids"] for o in out]
        reference = reference or tokens
        same = sum(x == y for r, t in zip(reference, tokens) for x, y in zip(r, t))
        print(json.dumps({"config": cfg, "device": torch.cuda.get_device_name(0), "seconds": round(seconds, 3),
                          "tokens_equal_to_first_config": f"{same}/{sum(map(len, reference))}"}), flush=True)


if __name__ == "__main__":
    main()
