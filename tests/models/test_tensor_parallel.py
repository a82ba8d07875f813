"""Real tensor parallelism: two processes over gloo load the same checkpoint at tp=2 and must
produce the tp=1 logits (query heads split; KV heads split, or replicated when fewer than ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.config import ModelConfig
from pdserve.loader import load_model
from .tiny import run_ragged, save_tiny

pytestmark = pytest.mark.slow

TOKENS = {"a": list(range(3, 20)), "b": list(range(40, 49))}
PLANS = {"a": [8, 9, 1, 1], "b": [9, 1, 1, 1]}
PAGES = {"a": [0, 5, 2, 7, 4, 9], "b": [1, 3, 6, 8]}


def _run(folder: str, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    tokens = {rid: t[:sum(PLANS[rid])] for rid, t in TOKENS.items()}
    lm = load_model(ModelConfig(model_path=folder), "cpu", tp_rank=tp_rank, tp_size=tp_size)
    return run_ragged(lm, PLANS, tokens, PAGES, num_pages=10)


def _worker(rank: int, port: int, folders: list[str], out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for i, folder in enumerate(folders):
            torch.save(_run(folder, rank, 2), os.path.join(out_dir, f"{i}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_tp1(tmp_path):
    folders = [tmp_path / "llama", tmp_path / "qwen2"]
    save_tiny("llama3", folders[0])                                   # 2 KV heads: one per rank
    save_tiny("qwen2", folders[1], tied=True, num_key_value_heads=1)  # 1 KV head: replicated
    mp.spawn(_worker, args=(_free_port(), [str(f) for f in folders], str(tmp_path)), nprocs=2, join=True)
    for i, folder in enumerate(folders):
        expected = _run(str(folder))
        for rank in range(2):
            got = torch.load(tmp_path / f"{i}-rank{rank}.pt")
            for rid in TOKENS:
                torch.testing.assert_close(got[rid], expected[rid], atol=2e-5, rtol=1e-4)
