"""ModelArch parsing and the TP-aware layers' sharding (single process: each rank's loader is
called directly; the real two-process TP run is in test_tensor_parallel.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.models.arch import ModelArch
from pdserve.models.layers import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RotaryEmbedding, RowParallelLinear, TPInfo, VocabParallelEmbedding, silu_and_mul)

BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2}


def test_llama3_rope_parameters_and_legacy_spelling():
    v5 = ModelArch.from_hf_config({**BASE, "architectures": ["LlamaForCausalLM"], "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, "eos_token_id": [128001, 128009]})
    v4 = ModelArch.from_hf_config({**BASE, "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert v5.rope_type == v4.rope_type == "llama3" and v5.rope_theta == v4.rope_theta == 500000.0
    assert v5.rope_scaling == v4.rope_scaling
    assert v5.eos_token_ids == (128001, 128009) and v5.head_dim == 8
    plain = ModelArch.from_hf_config({**BASE, "architectures": ["LlamaForCausalLM"],
                                      "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4


def test_family_traits():
    qwen2 = ModelArch.from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    qwen3 = ModelArch.from_hf_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32,
                                      "attention_bias": False})
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.q_size == 8 * 32


def test_unsupported_architecture_and_rope_are_named():
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        ModelArch.from_hf_config({**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
        ModelArch.from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"],
                                  "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=params)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    rope = RotaryEmbedding(64, 4, 500000.0, params, "cpu")
    ours = torch.atan2(rope.sin[1], rope.cos[1])  # angle at position 1 = inv_freq
    torch.testing.assert_close(ours, hf_inv_freq.float(), rtol=1e-6, atol=1e-7)


def _qkv(rank: int, size: int, kv_heads: int) -> QKVParallelLinear:
    return QKVParallelLinear(16, 4, 4, kv_heads, True, TPInfo(rank, size), torch.float32, "cpu")


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_qkv_shards_cover_the_full_projection(kv_heads):
    full_q, full_k, full_v = torch.randn(16, 16), torch.randn(4 * kv_heads, 16), torch.randn(4 * kv_heads, 16)
    ranks = [_qkv(r, 2, kv_heads) for r in range(2)]
    for layer in ranks:
        for shard, w in enumerate((full_q, full_k, full_v)):
            layer.weight_loader(layer.weight, w, shard)
    q_parts = [layer.weight[:8] for layer in ranks]
    torch.testing.assert_close(torch.cat(q_parts), full_q)  # query heads split
    k_parts = [layer.weight[8:12] for layer in ranks]
    if kv_heads == 2:
        torch.testing.assert_close(torch.cat(k_parts), full_k)  # one KV head per rank
    else:
        assert torch.equal(k_parts[0], full_k) and torch.equal(k_parts[1], full_k)  # replicated


def test_row_and_column_shards_compose_to_the_full_matmul():
    x, w1, w2 = torch.randn(3, 16), torch.randn(32, 16), torch.randn(16, 32)
    partial = []
    for rank in range(2):
        col = ColumnParallelLinear(16, [32], False, TPInfo(rank, 2), torch.float32, "cpu")
        row = RowParallelLinear(32, 16, False, TPInfo(rank, 2), torch.float32, "cpu")
        col.weight_loader(col.weight, w1, 0)
        row.weight_loader(row.weight, w2)
        partial.append(F.linear(F.linear(x, col.weight), row.weight))  # what all-reduce would sum
    torch.testing.assert_close(partial[0] + partial[1], x @ w1.T @ w2.T, rtol=1e-5, atol=1e-5)


def test_vocab_shards_pad_the_last_rank():
    full = torch.randn(10, 4)
    shards = [VocabParallelEmbedding(10, 4, TPInfo(r, 3), torch.float32, "cpu") for r in range(3)]
    for s in shards:
        s.weight_loader(s.weight, full)
    assert [s.weight.shape[0] for s in shards] == [4, 4, 4]
    torch.testing.assert_close(torch.cat([s.weight for s in shards])[:10], full)
    assert torch.count_nonzero(shards[2].weight[2:]) == 0


def test_checkpoint_shape_mismatch_is_named():
    layer = RowParallelLinear(32, 16, False, TPInfo(), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"checkpoint tensor has shape \(16, 30\), expected size 32"):
        layer.weight_loader(layer.weight, torch.randn(16, 30))


def test_gguf_freq_factors_reproduce_llama3_scaling():
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    plain = RotaryEmbedding(32, 100, 10000.0, None, "cpu")
    llama3 = RotaryEmbedding(32, 100, 10000.0, params, "cpu")
    inv_plain, inv_llama3 = torch.atan2(plain.sin[1], plain.cos[1]), torch.atan2(llama3.sin[1], llama3.cos[1])
    factors = (inv_plain / inv_llama3).tolist()  # what llama.cpp stores as rope_freqs
    arch = ModelArch.from_hf_config({**BASE, "architectures": ["LlamaForCausalLM"],
                                     "rope_scaling": {"rope_type": "freq_factors", "factors": factors}})
    gguf_style = RotaryEmbedding(32, 100, 10000.0, arch.rope_scaling_dict, "cpu")
    torch.testing.assert_close(gguf_style.cos, llama3.cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gguf_style.sin, llama3.sin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inter,tp,block", [(48, 1, 8), (48, 2, 8), (36, 1, 4), (12, 2, 2)])
def test_gate_up_blocks_per_rank(inter, tp, block):
    """Each rank keeps its gate and up shards in blocks of ``block`` rows (gcd of the shard and 8),
    and silu_and_mul over its output equals silu(x gate^T) * (x up^T) for that shard."""
    gate, up = torch.randn(inter, 16), torch.randn(inter, 16)
    x = torch.randn(3, 16)
    for rank in range(tp):
        layer = MergedColumnParallelLinear(16, [inter, inter], False, TPInfo(rank, tp), torch.float32, "cpu")
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
        assert layer.block == block
        shard = slice(rank * inter // tp, (rank + 1) * inter // tp)
        assert torch.equal(layer.weight[:block], gate[shard][:block])
        assert torch.equal(layer.weight[block:2 * block], up[shard][:block])
        expected = F.silu(x @ gate[shard].T) * (x @ up[shard].T)
        torch.testing.assert_close(silu_and_mul(layer(x), layer.block), expected)
