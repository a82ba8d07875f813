"""Write a model folder for `--load-format dummy`: a real architecture's config.json plus a
synthetic tokenizer of the same vocabulary size (no hub access on the GPU machines).

    python scripts/gpu/make_dummy_model.py DIR [--arch llama-3.1-8b]

The tokenizer is word-level: token i <-> "t<i>", with Llama-3's special tokens at 128000+ and a
plain chat template, so the router can tokenize chat text and detokenize any generated id.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

ARCHS = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    },
    # Llama-3 vocabulary on a toy body: a CPU smoke test of the benchmark script's plumbing.
    "tiny-llama3": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "torch_dtype": "float32",
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
}
FIRST_SPECIAL = 128000
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")
NAMED_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                  128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}


def write_tokenizer(out: Path, vocab_size: int) -> None:
    n_plain = min(FIRST_SPECIAL, vocab_size)
    vocab = {f"t{i}": i for i in range(n_plain)}
    specials = [NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i - n_plain}|>") for i in range(n_plain, vocab_size)]
    vocab.update({tok: n_plain + k for k, tok in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(out / "tokenizer.json"))
    has_llama_specials = vocab_size > 128009
    config = {"bos_token": "<|begin_of_text|>" if has_llama_specials else None,
              "eos_token": "<|eot_id|>" if has_llama_specials else None, "chat_template": TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ARCHS[args.arch]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    eos = config["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": eos}))
    write_tokenizer(out, config["vocab_size"])
    print(f"wrote {args.arch} config + synthetic tokenizer ({config['vocab_size']} ids) to {out}")


if __name__ == "__main__":
    main()
