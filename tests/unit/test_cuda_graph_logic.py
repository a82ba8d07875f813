"""CUDA-graph bucketing and padding (plain functions, CPU), and the kernel flags the engine refuses."""

from __future__ import annotations

import pytest
import torch

from pdserve.runtime.cuda_graph import PAD_SLOT, bucket_for, decode_rows, graph_buckets, is_decode_batch
from pdserve.runtime.forward import SeqChunk, build_forward_batch


def test_buckets_default_and_small():
    assert graph_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert graph_buckets(1) == [1]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 100]
    with pytest.raises(ValueError, match="--cuda-graph-max-bs"):
        graph_buckets(0)


@pytest.mark.parametrize("max_bs", [1, 3, 7, 33, 64, 200, 256, 512])
def test_every_batch_size_gets_the_smallest_bucket_that_holds_it(max_bs):
    buckets = graph_buckets(max_bs)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_bs
    for b in range(1, max_bs + 1):
        got = bucket_for(b, buckets)
        assert got >= b and not any(b <= other < got for other in buckets)
    assert bucket_for(max_bs + 1, buckets) is None
    assert bucket_for(0, buckets) is None


def test_decode_rows_match_build_forward_batch_and_pad():
    page_size = 4
    seqs = [SeqChunk("a", [11], 0, [7]), SeqChunk("b", [12], 5, [3, 9]), SeqChunk("c", [13], 8, [1, 2, 6])]
    packed = decode_rows(seqs, 8, page_size)
    ref = build_forward_batch(seqs, page_size)
    assert packed.shape == (3, 8) and packed.dtype == torch.int64
    assert packed[0, :3].tolist() == ref.input_ids.tolist() == [11, 12, 13]
    assert packed[1, :3].tolist() == ref.positions.tolist() == [0, 5, 8]
    assert packed[2, :3].tolist() == ref.out_loc.tolist() == [28, 37, 24]
    assert packed[0, 3:].tolist() == [0] * 5 and packed[1, 3:].tolist() == [0] * 5
    assert packed[2, 3:].tolist() == [PAD_SLOT] * 5


def test_decode_rows_rejects_what_a_graph_cannot_run():
    with pytest.raises(ValueError, match="do not fit"):
        decode_rows([SeqChunk("a", [1], 0, [0])] * 3, 2, 4)
    with pytest.raises(ValueError, match="2 new tokens"):
        decode_rows([SeqChunk("a", [1, 2], 0, [0])], 2, 4)
    with pytest.raises(ValueError, match="page table covers 4 tokens"):
        decode_rows([SeqChunk("a", [1], 4, [0])], 1, 4)


def test_is_decode_batch():
    assert is_decode_batch([SeqChunk("a", [1], 3, [0]), SeqChunk("b", [2], 0, [1])])
    assert not is_decode_batch([])
    assert not is_decode_batch([SeqChunk("a", [1, 2], 0, [0])])
    assert not is_decode_batch([SeqChunk("a", [1], 0, [0], need_logits=False)])


@pytest.mark.parametrize("flags, match", [
    ({"enable_torch_compile": True}, "--enable-torch-compile"),
    ({"kv_cache_dtype": "fp8_e4m3", "attention_backend": "flashinfer"}, "--kv-cache-dtype fp8_e4m3 with --attention"),
    ({"decode_attention_backend": "triton"}, "--decode-attention-backend"),
])
def test_unsupported_kernel_flags_fail_loudly(flags, match):
    from pdserve.config import CacheConfig, EngineConfig, KernelConfig
    from pdserve.runtime.model_runner import ModelRunner

    cache = {k: v for k, v in flags.items() if k == "kv_cache_dtype"}
    kernel = {k: v for k, v in flags.items() if k != "kv_cache_dtype"}
    cfg = EngineConfig(cache=CacheConfig(**cache), kernel=KernelConfig(**kernel))
    with pytest.raises(ValueError, match=match):
        ModelRunner(cfg)  # refused before the model loads


def test_triton_options_follow_the_flags():
    from pdserve.config import EngineConfig, KernelConfig
    from pdserve.runtime.model_runner import attention_options

    cfg = EngineConfig(kernel=KernelConfig(triton_attention_num_kv_splits=4, triton_attention_reduce_in_fp32=True,
                                           cuda_graph_max_bs=512))
    assert attention_options(cfg, "triton", 8192) == {"num_kv_splits": 4, "reduce_in_fp32": True,
                                                      "max_batch_size": 512, "max_context_len": 8192}
    assert attention_options(cfg, "torch", 8192) == {}


def _tiny_runner(max_bs: int):
    """What CudaGraphRunner reads of a ModelRunner: a tiny dummy Llama, a pool, TritonAttention."""
    from types import SimpleNamespace

    from pdserve.kernels.backend import TritonAttention
    from pdserve.loader.dummy import dummy_weights
    from pdserve.models.arch import ModelArch
    from pdserve.models.llama import LlamaForCausalLM
    from pdserve.runtime.kv_pool import KVLayout, KVPool

    arch = ModelArch.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 96,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0})
    model = LlamaForCausalLM(arch)
    model.load_weights(dummy_weights(arch, 0, torch.float32))
    layout = KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, 4, "float32")
    pool = KVPool(24, layout, "cpu")
    attn = TritonAttention(pool, num_kv_splits=2, max_batch_size=max_bs, max_context_len=32)
    return SimpleNamespace(device=torch.device("cpu"), attn=attn, layout=layout, model=model, pool=pool)


def test_padded_static_step_matches_eager_and_padding_writes_no_page():
    """The graph path's buffers and padding (run eagerly: CPU has no graphs) against the plain
    eager step: same logits, same pool; padding rows (slot -1) leave every other slot untouched."""
    from pdserve.runtime.cuda_graph import CudaGraphRunner

    torch.manual_seed(0)
    runner = _tiny_runner(max_bs=4)
    runner.pool.buffer.normal_()  # cached contexts
    seqs = [SeqChunk("a", [5], 6, [0, 1]), SeqChunk("b", [7], 0, [2]), SeqChunk("c", [9], 13, [3, 4, 5, 6])]
    before = runner.pool.buffer.clone()

    batch = build_forward_batch(seqs, 4)
    runner.attn.init_batch(batch)
    with torch.inference_mode():
        eager = runner.model.compute_logits(runner.model.forward(batch.input_ids, batch.positions, batch, runner.attn))
    eager_pool = runner.pool.buffer.clone()

    runner.pool.buffer.copy_(before)
    graphs = CudaGraphRunner(runner, 4, emulate=True)
    graphs.capture()
    assert graphs.can_run(seqs) and bucket_for(len(seqs), graphs.buckets) == 4  # one padding row
    padded = graphs.run(seqs)
    assert padded.shape == (3, 96)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.pool.buffer, eager_pool, rtol=1e-5, atol=1e-6)  # GEMM of 4 rows vs 3
    changed = (runner.pool.buffer != before).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 2, 6]  # the pages of positions 6, 0 and 13 only: the padding row wrote nothing


def test_can_run_refuses_what_the_fixed_buffers_cannot_hold():
    from pdserve.runtime.cuda_graph import CudaGraphRunner

    runner = _tiny_runner(max_bs=2)
    graphs = CudaGraphRunner(runner, 2, emulate=True)
    assert not graphs.can_run([SeqChunk("a", [1], 0, [0])])  # nothing captured yet
    graphs.capture()
    assert graphs.can_run([SeqChunk("a", [1], 0, [0])])
    assert not graphs.can_run([SeqChunk(str(i), [1], 0, [i]) for i in range(3)])   # more than max_bs
    assert not graphs.can_run([SeqChunk("a", [1, 2], 0, [0])])                      # a prefill chunk
    assert not graphs.can_run([SeqChunk("a", [1], 32, list(range(9)))])             # past the page-table width
    with pytest.raises(ValueError, match="exceeds the attention metadata"):
        CudaGraphRunner(runner, 3, emulate=True)


@pytest.mark.slow
def test_gpu_scripts_smoke_modes(tmp_path):
    """engine_bench.py and gpu_parity.py --tiny (what run_all.sh --tiny runs), in-process."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu"))
    import engine_bench
    import gpu_parity

    assert engine_bench.main(["--tiny", "--skip-hf", "--json", str(tmp_path / "eb.json")]) == 0
    rows = json.loads((tmp_path / "eb.json").read_text())["rows"]
    prefills = {f"prefill {n}{when}" for n in (16, 32) for when in ("", " (after the decode runs)")}
    assert {r["case"] for r in rows} == {"decode bs=1 ctx=16", "decode bs=2 ctx=16", *prefills}
    assert all(r["ms"] > 0 for r in rows)
    assert gpu_parity.main(["--tiny", "--attention-backend", "torch", "--json", str(tmp_path / "gp.json")]) == 0
    results = json.loads((tmp_path / "gp.json").read_text())
    assert [r["model"] for r in results] == ["tiny", "tiny-qwen3"]
    assert all(p["greedy_equal"] and p["rel_diff"] < 1e-4 for r in results for p in r["prompts"])
