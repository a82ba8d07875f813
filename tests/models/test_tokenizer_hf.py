"""HF-folder tokenizers (tokenizer.json + tokenizer_config.json), chat template sources and errors."""

from __future__ import annotations

import json

import pytest

from pdserve.tokenizer import IncrementalDetokenizer, load_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_folder(smollm2_path, tmp_path_factory):
    """An HF-style tokenizer folder written from the SmolLM2 GGUF's tokenizer."""
    folder = tmp_path_factory.mktemp("tok")
    load_tokenizer(smollm2_path).backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


def test_hf_folder_matches_transformers(hf_folder):
    from transformers import AutoTokenizer

    ours, hf = load_tokenizer(str(hf_folder)), AutoTokenizer.from_pretrained(str(hf_folder))
    for text in ["Hello, world!", "code:\n\tx = [1, 2]  # ü 🤖", "<|im_start|>user\nhey<|im_end|>"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False), skip_special_tokens=True)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token_ids == [2, 0] and ours.bos_token_id == 1
    assert ours.name == hf_folder.name


def test_template_sources_in_order(hf_folder, tmp_path):
    messages = [{"role": "user", "content": "x"}]
    jinja = hf_folder / "chat_template.jinja"
    jinja.write_text("J{{ messages[0]['content'] }}")
    try:
        assert load_tokenizer(str(hf_folder)).apply_chat_template(messages) == "Jx"  # file beats config
        inline = load_tokenizer(str(hf_folder), chat_template="I{{ messages|length }}")
        assert inline.apply_chat_template(messages) == "I1"  # override beats both
        path = tmp_path / "t.jinja"
        path.write_text("F{{ add_generation_prompt }}")
        assert load_tokenizer(str(hf_folder), chat_template=str(path)).apply_chat_template(messages) == "FTrue"
    finally:
        jinja.unlink()


def test_template_is_sandboxed_and_can_raise(hf_folder):
    tok = load_tokenizer(str(hf_folder), chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        tok.apply_chat_template([])
    tok = load_tokenizer(str(hf_folder), chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(Exception, match="no system role"):
        tok.apply_chat_template([])
    tok = load_tokenizer(str(hf_folder), chat_template="{{ messages|tojson }}{% generation %}G{% endgeneration %}")
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]G'


def test_errors_name_the_flag(hf_folder, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-path: .*does not exist"):
        load_tokenizer(str(hf_folder), tokenizer_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--model-path: no tokenizer.json"):   # the flag the user gave
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text((hf_folder / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="--chat-template"):
        load_tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}])


def test_detokenizer_with_special_tokens(hf_folder):
    tok = load_tokenizer(str(hf_folder))
    ids = tok.encode("<|im_start|>Ça va? 👍<|im_end|>")
    for skip, expected in ((True, "Ça va? 👍"), (False, "<|im_start|>Ça va? 👍<|im_end|>")):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(detok.add([i]) for i in ids) + detok.flush() == expected
