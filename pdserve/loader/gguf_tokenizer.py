"""A ``tokenizers.Tokenizer`` rebuilt from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: it stores tokens, merges, token types and special ids under
llama.cpp's keys. For byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3,
Qwen) we build the same tokenizer transformers' GGUF loader builds (GPT-2 byte-level BPE, the
split regex named by ``tokenizer.ggml.pre`` where one is known, control tokens as special added
tokens), so token ids match it exactly. The result is serialized once into a sidecar JSON (beside
the GGUF, or in the cache dir if that folder is read-only) keyed by the file's size and mtime, so
later loads (e.g. the router's) do not parse the GGUF at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from pdserve.loader.gguf_file import field, file_identity, open_gguf

SIDECAR_VERSION = 1
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                        "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


@dataclass
class GGUFTokenizerData:
    """What a ``pdserve.tokenizer.Tokenizer`` needs from a GGUF, JSON-serializable."""
    tokenizer_json: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    special_tokens: dict[str, str]  # bos_token / eos_token / unk_token / pad_token -> text


def load_gguf_tokenizer_data(path: str, cache_dir: str | None = None) -> GGUFTokenizerData:
    """From the sidecar if it matches this file, else built from the GGUF (and the sidecar written)."""
    identity = file_identity(path)
    for sidecar in _sidecar_paths(path, cache_dir):
        data = _read_sidecar(sidecar, identity)
        if data is not None:
            return data
    data = build_gguf_tokenizer_data(path)
    for sidecar in _sidecar_paths(path, cache_dir):
        if _write_sidecar(sidecar, identity, data):
            break
    return data


def build_gguf_tokenizer_data(path: str) -> GGUFTokenizerData:
    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"--tokenizer-path: GGUF tokenizer type {kind!r} is not supported (only byte-level "
                         f"BPE, 'gpt2'); pass --tokenizer-path with a tokenizer.json")
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = field(reader, "tokenizer.ggml.token_type") or []
    merges: list[str] = field(reader, "tokenizer.ggml.merges") or []
    tok = _byte_level_bpe(tokens, merges, field(reader, "tokenizer.ggml.pre"))
    _add_special_tokens(tok, tokens, token_types)
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)])
    special = {name: tokens[i] for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                                  ("unk_token", "unknown"), ("pad_token", "padding"))
               if (i := field(reader, f"tokenizer.ggml.{key}_token_id")) is not None}
    return GGUFTokenizerData(tokenizer_json=tok.to_str(), chat_template=field(reader, "tokenizer.chat_template"),
                             bos_token_id=bos, eos_token_id=eos, add_bos_token=add_bos, special_tokens=special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:  # GPT-2's own regex (what transformers uses for e.g. "smollm")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (``<|im_end|>``) stay whole and are special; user-defined ones stay whole."""
    alphabet = set(_bytes_to_unicode().values())
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, token_types) if kind == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    if user:
        tok.add_tokens(user)


def _sidecar_paths(path: str, cache_dir: str | None) -> list[str]:
    beside = path + ".tokenizer.json"
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    return [beside, os.path.join(cache, "tokenizers", f"{digest}.tokenizer.json")]


def _read_sidecar(sidecar: str, identity: str) -> GGUFTokenizerData | None:
    try:
        with open(sidecar, encoding="utf-8") as f:
            blob = json.load(f)
    except (OSError, ValueError):
        return None
    if blob.get("version") != SIDECAR_VERSION or blob.get("source") != identity:
        return None
    return GGUFTokenizerData(**blob["data"])


def _write_sidecar(sidecar: str, identity: str, data: GGUFTokenizerData) -> bool:
    blob: dict[str, Any] = {"version": SIDECAR_VERSION, "source": identity, "data": asdict(data)}
    tmp = f"{sidecar}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(sidecar) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(blob, f)
        os.replace(tmp, sidecar)  # atomic: concurrent loaders never read half a file
        return True
    except OSError:
        return False
