"""The real SmolLM2 GGUF: logits and tokenizer parity with transformers, and bad-file errors."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import ModelConfig
from pdserve.loader import load_model
from pdserve.tokenizer import IncrementalDetokenizer, load_tokenizer
from .tiny import run_ragged

TEXTS = [
    "Hello world",
    " 2024 is 12345 numbers 3.14159 and 1,000,000",
    "def f(x):\n    return x**2  # square\n\tif x: pass\n",
    "naïve café, Straße, 日本語のテキスト, русский, emoji 🤖👍🏽",
    "<|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "  multiple   spaces\n\n\nnewlines\r\n",
    "I'm sure they'll say WE'RE fine",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.mark.slow
def test_logits_match_transformers_gguf(smollm2, hf_smollm2):
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    n = len(ids)
    ours = run_ragged(smollm2, {"a": [20, n - 20]}, {"a": ids}, {"a": list(range(16))}, num_pages=16)["a"]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=0)
    assert tok.decode([int(ours[-1].argmax())]) == "The"


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf(smollm2, hf_smollm2_tokenizer):
    ours, hf = smollm2.tokenizer, hf_smollm2_tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == \
            hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert ours.vocab_size == len(hf) == 49152


def test_smollm2_metadata(smollm2):
    a = smollm2.arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.vocab_size) == (30, 576, 9, 3, 49152)
    assert a.tie_word_embeddings and a.rope_theta == 100000.0
    assert smollm2.eos_token_ids == [2] and smollm2.tokenizer.id_to_token(2) == "<|im_end|>"
    assert smollm2.context_length == 8192 and smollm2.dtype == torch.float32
    assert smollm2.load_seconds < 15


def test_incremental_detokenizer_holds_back_partial_utf8(smollm2):
    tok = smollm2.tokenizer
    text = "Robots 🤖 say こんにちは, done."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # the emoji spans several byte tokens: held back until complete


def test_tokenizer_sidecar_is_reused_and_invalidated(smollm2_path, tmp_path):
    link = tmp_path / "model.gguf"
    link.symlink_to(smollm2_path)
    first = load_tokenizer(str(link))
    sidecar = tmp_path / "model.gguf.tokenizer.json"
    assert sidecar.exists()
    assert load_tokenizer(str(link)).encode("Paris!") == first.encode("Paris!")
    blob = sidecar.read_text().replace('"source": "', '"source": "stale-')
    sidecar.write_text(blob)
    assert load_tokenizer(str(link)).chat_template == first.chat_template
    assert '"source": "stale-' not in sidecar.read_text()  # rebuilt and rewritten


@pytest.mark.parametrize("keep_bytes", [0, 3, 1000, 5_000_000])
def test_truncated_gguf_is_a_value_error(smollm2_path, tmp_path, keep_bytes):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(keep_bytes))
    with pytest.raises(ValueError, match="--model-path: .*not a readable GGUF"):
        load_model(ModelConfig(model_path=str(bad)), "cpu")


def test_garbage_gguf_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    with pytest.raises(ValueError, match="--model-path"):
        load_model(ModelConfig(model_path=str(bad)), "cpu")


def test_missing_path_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--model-path: .*does not exist"):
        load_model(ModelConfig(model_path=str(tmp_path / "nope")), "cpu")
