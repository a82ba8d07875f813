"""Tiny HF checkpoints (random weights) and a runner that drives our model like the engine does:
ragged mixed prefill/decode steps through build_forward_batch + TorchAttention + a paged KVPool."""

from __future__ import annotations

import torch

from pdserve.runtime.attention import TorchAttention
from pdserve.runtime.forward import SeqChunk, build_forward_batch
from pdserve.runtime.kv_pool import KVLayout, KVPool

PAGE_SIZE = 4
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_config(family: str, tied: bool, **overrides):
    import transformers as tf

    common = {**COMMON, **overrides}
    if family == "llama3":  # llama3 RoPE scaling, low theta so every frequency band is exercised
        return tf.LlamaConfig(**common, tie_word_embeddings=tied, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=tied)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=tied)
    if family == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=tied, sliding_window=None)
    raise ValueError(family)


def save_tiny(family: str, folder, tied: bool = False, max_shard_size: str | None = None, seed: int = 0,
              **overrides):
    """Build a tiny HF model with every parameter randomized (biases and norms too), save it, return it."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family, tied, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [len, vocab]


def run_ragged(lm, plans: dict[str, list[int]], tokens: dict[str, list[int]], page_ids: dict[str, list[int]],
               num_pages: int) -> dict[str, torch.Tensor]:
    """Run sequences through our model in steps. ``plans[rid]`` lists how many new tokens each step
    feeds (0 = idle that step). Returns per rid the logits of every fed token, [len, vocab]."""
    arch = lm.arch
    kv_heads = lm.model.num_local_kv_heads  # this TP rank's
    pool = KVPool(num_pages, KVLayout(arch.num_layers, kv_heads, arch.head_dim, PAGE_SIZE, "float32"))
    attn = TorchAttention(pool)
    fed = {rid: 0 for rid in plans}
    out: dict[str, list[torch.Tensor]] = {rid: [] for rid in plans}
    steps = max(len(p) for p in plans.values())
    for step in range(steps):
        chunks = []
        for rid, plan in plans.items():
            n = plan[step] if step < len(plan) else 0
            if n:
                chunks.append(SeqChunk(rid, tokens[rid][fed[rid]:fed[rid] + n], fed[rid], page_ids[rid]))
                fed[rid] += n
        batch = build_forward_batch(chunks, PAGE_SIZE)
        attn.init_batch(batch)
        hidden = lm.model(batch.input_ids, batch.positions, batch, attn)  # [T, hidden]
        logits = lm.model.compute_logits(hidden)
        for chunk, start in zip(chunks, batch.q_starts):
            out[chunk.rid].append(logits[start:start + chunk.num_new_tokens])
    return {rid: torch.cat(parts) for rid, parts in out.items()}
