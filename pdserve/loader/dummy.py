"""Random weights for ``--load-format dummy``: HF-named full tensors, so TP sharding and the
fused-layer loaders run exactly as for a real checkpoint.

Each tensor is drawn from its own generator seeded by ``(seed, name)``: the same values on every
call and every rank, independent of iteration order. Matrices ~ N(0, 0.02), norms = 1.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import torch

from pdserve.models.arch import ModelArch

INIT_STD = 0.02


def hf_weight_shapes(arch: ModelArch) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor name of a Llama-family checkpoint with its shape."""
    h, d, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.q_size, arch.kv_size
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (arch.vocab_size, h))]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
        if arch.attention_bias:
            shapes += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]
        if arch.qk_norm:
            shapes += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
    shapes.append(("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        shapes.append(("lm_head.weight", (arch.vocab_size, h)))
    return shapes


def dummy_weights(arch: ModelArch, seed: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    device = torch.device(device)
    for name, shape in hf_weight_shapes(arch):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        values = torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * INIT_STD
        yield name, values.to(dtype)
