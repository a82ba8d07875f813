"""``--quantization w8a8_int8`` through ``load_model``: HF folders and dummy weights quantize at
load, the result tracks the float model, and tp=2 (real processes over gloo) quantizes its shards."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.config import ModelConfig
from pdserve.loader import load_model
from pdserve.models.layers import QuantizableLinear
from .tiny import run_ragged, save_tiny

TOKENS = {"a": list(range(3, 20)), "b": list(range(40, 49))}
PLANS = {"a": [8, 9, 1, 1], "b": [9, 1, 1, 1]}   # chunked prefill, then decode beside a prefill
PAGES = {"a": [0, 5, 2, 7, 4, 9], "b": [1, 3, 6, 8]}
W8A8 = "w8a8_int8"


def _run(folder: str, tp_rank: int = 0, tp_size: int = 1, **flags) -> dict[str, torch.Tensor]:
    tokens = {rid: t[:sum(PLANS[rid])] for rid, t in TOKENS.items()}
    lm = load_model(ModelConfig(model_path=folder, **flags), "cpu", tp_rank=tp_rank, tp_size=tp_size)
    return run_ragged(lm, PLANS, tokens, PAGES, num_pages=10)


def _rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((got[r] - ref[r]).abs().max() / ref[r].abs().max()) for r in ref)


def test_hf_folder_quantizes_at_load_and_tracks_fp32(tmp_path):
    save_tiny("qwen2", tmp_path, tied=True)  # q/k/v bias and a tied LM head
    fp32 = load_model(ModelConfig(model_path=str(tmp_path)), "cpu")
    q = load_model(ModelConfig(model_path=str(tmp_path), quantization=W8A8), "cpu")
    linears = [m for m in q.model.modules() if isinstance(m, QuantizableLinear)]
    assert len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down per layer + lm_head
    assert all(m.qweight is not None and m.qweight.dtype == torch.int8 and "weight" not in m._parameters
               for m in linears)
    assert q.model.model.embed_tokens.weight.dtype == torch.float32  # lookups stay float
    assert q.fingerprint != fp32.fingerprint
    # int8 steps are 1/127 of a row's (or token's) largest value; through two layers and the
    # LM head the logits move by a few percent of their range, never by their own size.
    err = _rel_err(_run(str(tmp_path), quantization=W8A8), _run(str(tmp_path)))
    assert 0 < err < 0.05, err


def test_dummy_weights_quantize_exactly_like_a_loaded_model_quantized_afterwards(tmp_path):
    save_tiny("llama3", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    flags = {"load_format": "dummy", "random_seed": 3}
    at_load = load_model(ModelConfig(model_path=str(tmp_path), quantization=W8A8, **flags), "cpu")
    later = load_model(ModelConfig(model_path=str(tmp_path), **flags), "cpu")
    later.model.quantize_(W8A8)
    tokens = {"a": list(range(5, 20))}
    run = lambda lm: run_ragged(lm, {"a": [15, 0]}, tokens, {"a": [0, 1, 2, 3]}, num_pages=4)["a"]  # noqa: E731
    assert torch.equal(run(at_load), run(later))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(_run(folder, rank, 2, quantization=W8A8), os.path.join(out_dir, f"rank{rank}.pt"))
        lm = load_model(ModelConfig(model_path=folder, quantization=W8A8), "cpu", tp_rank=rank, tp_size=2)
        qkv = lm.model.model.layers[0].self_attn.qkv_proj
        torch.save((qkv.qweight, qkv.weight_scale), os.path.join(out_dir, f"qkv{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_quantizes_its_shards(tmp_path):
    folder = tmp_path / "llama"
    save_tiny("llama3", folder)  # 4 query heads, 2 KV heads: one KV head per rank
    mp.spawn(_worker, args=(_free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    # Column-parallel rows are quantized per output channel, so a rank's codes are exactly the
    # tp=1 codes of its rows (q rows then its KV head's k and v rows).
    full = load_model(ModelConfig(model_path=str(folder), quantization=W8A8), "cpu")
    qkv = full.model.model.layers[0].self_attn.qkv_proj
    for rank in range(2):
        codes, scale = torch.load(tmp_path / f"qkv{rank}.pt")
        rows = torch.cat([torch.arange(32 * rank, 32 * rank + 32),              # 2 of 4 query heads (D 16)
                          64 + torch.arange(16 * rank, 16 * rank + 16),         # its k head
                          96 + torch.arange(16 * rank, 16 * rank + 16)])        # its v head
        assert torch.equal(codes, qkv.qweight[rows]) and torch.equal(scale, qkv.weight_scale[rows])
    # Row-parallel layers quantize each rank's input slice with its own per-token scale, so tp=2 is
    # not bit-equal to tp=1, but its error against fp32 is of the same size as tp=1's.
    fp32 = _run(str(folder))
    tp1_err = _rel_err(_run(str(folder), quantization=W8A8), fp32)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert _rel_err(got, fp32) < 2 * tp1_err, (_rel_err(got, fp32), tp1_err)
