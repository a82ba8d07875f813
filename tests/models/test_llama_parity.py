"""Our Llama-family model against transformers on the same (random) weights, fp32 on CPU.

Each case saves a tiny HF checkpoint, loads it through ``load_model`` and runs two sequences the
way the engine would: one prefilled in two chunks while the other prefills and then decodes in the
same ragged batches, over shuffled KV pages. Every fed token's logits must match HF's full forward.
"""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.config import ModelConfig
from pdserve.loader import load_model
from .tiny import hf_logits, run_ragged, save_tiny

CASES = [  # (family, tied embeddings, sharded safetensors)
    ("llama3", False, False),
    ("llama3", True, True),
    ("qwen2", True, False),
    ("qwen3", False, False),
    ("mistral", False, True),
]


@pytest.mark.parametrize("family,tied,sharded", CASES)
def test_logits_match_transformers(tmp_path, family, tied, sharded):
    hf = save_tiny(family, tmp_path, tied=tied, max_shard_size="40KB" if sharded else None)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").exists()
    lm = load_model(ModelConfig(model_path=str(tmp_path)), "cpu")
    assert lm.arch.tie_word_embeddings == tied
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == tied

    gen = torch.Generator().manual_seed(1)
    tokens = {"a": torch.randint(0, 320, (23,), generator=gen).tolist(),
              "b": torch.randint(0, 320, (12,), generator=gen).tolist()}
    plans = {"a": [9, 10, 1, 1, 1, 1],   # prefill in two chunks (9 + 10), then 4 decode steps
             "b": [7, 1, 1, 1, 1, 1]}    # prefill 7 alongside, then decode while "a" still prefills
    pages = {"a": [11, 2, 7, 5, 0, 9], "b": [3, 10, 1, 8]}
    ours = run_ragged(lm, plans, tokens, pages, num_pages=12)
    for rid in tokens:
        n = sum(plans[rid])
        ref = hf_logits(hf, tokens[rid][:n])
        torch.testing.assert_close(ours[rid], ref, atol=2e-5, rtol=1e-4)


def test_pytorch_bin_fallback(tmp_path):
    hf = save_tiny("llama3", tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    lm = load_model(ModelConfig(model_path=str(tmp_path)), "cpu")
    tokens = {"a": list(range(5, 20))}
    ours = run_ragged(lm, {"a": [15]}, tokens, {"a": [0, 1, 2, 3]}, num_pages=4)
    torch.testing.assert_close(ours["a"], hf_logits(hf, tokens["a"]), atol=2e-5, rtol=1e-4)


def test_dummy_weights_are_seeded_and_fingerprinted(tmp_path):
    save_tiny("qwen3", tmp_path)
    (tmp_path / "model.safetensors").unlink()  # dummy needs only config.json
    first = load_model(ModelConfig(model_path=str(tmp_path), load_format="dummy", random_seed=7), "cpu")
    again = load_model(ModelConfig(model_path=str(tmp_path), load_format="dummy", random_seed=7), "cpu")
    other = load_model(ModelConfig(model_path=str(tmp_path), load_format="dummy", random_seed=8), "cpu")
    w = dict(first.model.named_parameters())
    for name, p in again.model.named_parameters():
        assert torch.equal(p, w[name]), name
    assert not torch.equal(other.model.model.embed_tokens.weight, first.model.model.embed_tokens.weight)
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert first.tokenizer is None  # a bare config folder: nodes are token-in/token-out


def test_fingerprint_tracks_dtype_and_weights(tmp_path):
    save_tiny("llama3", tmp_path)
    fp32 = load_model(ModelConfig(model_path=str(tmp_path)), "cpu")
    bf16 = load_model(ModelConfig(model_path=str(tmp_path), dtype="bfloat16"), "cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.model.model.norm.weight.dtype == torch.bfloat16
    assert fp32.fingerprint != bf16.fingerprint
    save_tiny("llama3", tmp_path, seed=3)  # new weights at the same path
    assert load_model(ModelConfig(model_path=str(tmp_path)), "cpu").fingerprint != fp32.fingerprint


def test_context_length_extends_rope_cache(tmp_path):
    save_tiny("llama3", tmp_path)
    lm = load_model(ModelConfig(model_path=str(tmp_path), context_length=1000), "cpu")
    assert lm.context_length == 1000
    assert lm.model.model.rotary_emb.cos.shape[0] >= 1000


def test_missing_weight_is_an_error(tmp_path):
    save_tiny("llama3", tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ValueError, match="--model-path: .*missing shard"):
        load_model(ModelConfig(model_path=str(tmp_path)), "cpu")
