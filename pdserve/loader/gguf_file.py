"""Reading a GGUF file: metadata -> HF-style config dict, tensors -> HF-named dequantized tensors.

llama.cpp's converter permutes Llama's q/k rows (interleaved RoPE pairs); we undo it exactly as
transformers' GGUF loader does, so the HF rotate-half RoPE applies. Qwen2/Qwen3 files are not
permuted.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Iterator

import torch

from pdserve.loader.gguf_parse import GGUFError, GGUFFile, dequantize

GGUF_ARCH_TO_HF = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_SKIPPED = {"rope_freqs.weight"}  # llama3 frequency factors: read into the config's rope_scaling instead


def open_gguf(path: str) -> GGUFFile:
    """The parsed file; a corrupt or truncated one -> ValueError naming the flag."""
    try:
        return GGUFFile(path)
    except (GGUFError, OSError) as e:
        raise ValueError(f"--model-path: {path} is not a readable GGUF file ({e})") from e


def field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.get(key, default)


def gguf_hf_config(reader: GGUFFile) -> dict[str, Any]:
    """The HF ``config.json`` dict this file's metadata describes."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCH_TO_HF:
        raise ValueError(f"--model-path: unsupported GGUF architecture {arch!r} "
                         f"(supported: {', '.join(GGUF_ARCH_TO_HF)})")

    def meta(key: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    vocab = meta("vocab_size") or len(reader.get("tokenizer.ggml.tokens", []))
    names = {t.name for t in reader.tensors}
    cfg: dict[str, Any] = {
        "architectures": [GGUF_ARCH_TO_HF[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = meta("rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # Llama 3.1-style: per-frequency divisors stored as a tensor
        cfg["rope_scaling"] = {"rope_type": "freq_factors",
                               "factors": dequantize(freqs, torch.float32).tolist()}
    elif scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"--model-path: GGUF RoPE scaling {scaling_type!r} is not supported")
    return cfg


def hf_tensor_name(name: str) -> str | None:
    """GGUF tensor name -> HF name; None for tensors we do not load."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name in _SKIPPED:
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"--model-path: unexpected GGUF tensor {name!r}")


def gguf_tensors(reader: GGUFFile, config: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in ``dtype``) for every weight, dequantized and un-permuted."""
    is_llama = config["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        hf_name = hf_tensor_name(t.name)
        if hf_name is None:
            continue
        tensor = dequantize(t, torch.float32)  # [rows, cols], HF orientation
        if is_llama and ".q_proj." in hf_name:
            tensor = _reverse_permute(tensor, heads)
        elif is_llama and ".k_proj." in hf_name:
            tensor = _reverse_permute(tensor, kv_heads)
        yield hf_name, tensor.to(dtype)


def _reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows [head, pair, 2] -> [head, 2, pair]."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def file_identity(path: str, windows: int = 16, window_bytes: int = 1 << 16) -> str:
    """Content identity of a weight file: its size and a hash of ``windows`` evenly spaced 64 KiB
    windows (the whole file when small). Independent of file name, path and mtime, so a prefill and
    a decode node holding copies of the same weights on different machines agree; reads ~1 MiB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= windows * window_bytes:
            digest.update(f.read())
        else:
            step = (size - window_bytes) // (windows - 1)
            for i in range(windows):
                f.seek(i * step)
                digest.update(f.read(window_bytes))
    return f"{size}:{digest.hexdigest()[:24]}"
