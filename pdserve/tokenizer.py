"""Tokenizer, chat template and incremental detokenization (used by the router and the loader).

``load_tokenizer`` reads a GGUF's tokenizer metadata (through a cached tokenizer.json sidecar, see
``pdserve.loader.gguf_tokenizer``) or an HF folder's ``tokenizer.json`` + ``tokenizer_config.json``.
It uses the ``tokenizers`` library directly, not transformers, so the router starts fast and
imports little. Chat templates render in jinja2's immutable sandbox, with the same globals and
filters as transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, *, name: str, chat_template: str | None,
                 bos_token_id: int | None, eos_token_ids: list[int], special_tokens: dict[str, str]) -> None:
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.special_tokens = special_tokens  # bos_token / eos_token / ... -> text, for templates

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render ``messages``; ``tools`` (OpenAI function tools) go to a template that takes them,
        else into a Hermes-style system message (see ``with_tools_prompt``)."""
        if not self.chat_template:
            raise ValueError(f"--chat-template: tokenizer {self.name!r} has no chat template; pass one")
        if tools and not self.template_takes_tools:
            messages = with_tools_prompt(messages, tools)
        elif tools:
            kwargs["tools"] = tools
        context = {**self.special_tokens, **kwargs}
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **context)

    @property
    def template_takes_tools(self) -> bool:
        return bool(self.chat_template) and "tools" in self.chat_template

    @cached_property
    def _compiled_template(self):
        return compile_chat_template(self.chat_template)


TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def with_tools_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """``messages`` for a template that knows nothing of tools: the tools described in the system
    message (Hermes / Qwen wording), earlier tool calls written as ``<tool_call>`` blocks, and tool
    results as user turns in ``<tool_response>`` blocks."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    prompt = TOOLS_PROMPT.format(tools=listing)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "role": "system", "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    for m in out:
        if m.get("tool_calls"):
            blocks = [f"<tool_call>\n{_call_json(c)}\n</tool_call>" for c in m.pop("tool_calls")]
            m["content"] = "\n".join([m["content"]] * bool(m.get("content")) + blocks)
        if m.get("role") == "tool":
            m["role"] = "user"
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
    return out


def _call_json(call: dict) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass  # kept as the string the client sent
    return json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)


def compile_chat_template(source: str):
    """A jinja2 template in the immutable sandbox, configured as transformers configures it."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}..{% endgeneration %}`` (assistant-mask markers): rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_tokenizer(path_or_gguf: str, tokenizer_path: str | None = None, chat_template: str | None = None,
                   cache_dir: str | None = None) -> Tokenizer:
    """Tokenizer of a GGUF file or an HF folder. ``tokenizer_path`` overrides where it is read from;
    ``chat_template`` (inline jinja or a file path) overrides the template."""
    source = tokenizer_path or path_or_gguf
    if not os.path.exists(source):
        flag = "--tokenizer-path" if tokenizer_path else "--model-path"
        raise ValueError(f"{flag}: {source} does not exist")
    if os.path.isfile(source) and source.endswith(".gguf"):
        tok = _from_gguf(source, cache_dir)
    elif os.path.isfile(source) and source.endswith(".json"):
        tok = _from_hf(os.path.dirname(source) or ".", source)
    else:
        tok = _from_hf(source, os.path.join(source, "tokenizer.json"),
                       "--tokenizer-path" if tokenizer_path else "--model-path")
    if chat_template:
        tok.chat_template = _read_template(chat_template)
    return tok


def _from_gguf(path: str, cache_dir: str | None) -> Tokenizer:
    from pdserve.loader.gguf_tokenizer import load_gguf_tokenizer_data

    data = load_gguf_tokenizer_data(path, cache_dir)
    eos = [data.eos_token_id] if data.eos_token_id is not None else []
    return Tokenizer(_HFTokenizer.from_str(data.tokenizer_json), name=os.path.basename(path),
                     chat_template=data.chat_template, bos_token_id=data.bos_token_id, eos_token_ids=eos,
                     special_tokens=data.special_tokens)


def _from_hf(folder: str, tokenizer_json: str, flag: str = "--tokenizer-path") -> Tokenizer:
    if not os.path.isfile(tokenizer_json):   # ``flag``: the one the user gave (the model's folder by default)
        raise ValueError(f"{flag}: no tokenizer.json in {folder}")
    backend = _HFTokenizer.from_file(tokenizer_json)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    special = {k: v for k, v in special.items() if v is not None}
    template = config.get("chat_template")
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):  # transformers >= 4.50 saves the template separately
        template = open(jinja_file, encoding="utf-8").read()
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
    return Tokenizer(backend, name=os.path.basename(os.path.abspath(folder)), chat_template=template,
                     bos_token_id=bos, eos_token_ids=_eos_ids(folder, backend, special.get("eos_token")),
                     special_tokens=special)


def _eos_ids(folder: str, backend: _HFTokenizer, eos_text: str | None) -> list[int]:
    """Stop ids: generation_config.json's eos_token_id (may be a list, e.g. Llama 3) + the tokenizer's."""
    ids: list[int] = []
    gen = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
    for i in gen if isinstance(gen, list) else [gen]:
        if i is not None and i not in ids:
            ids.append(int(i))
    tid = backend.token_to_id(eos_text) if eos_text else None
    if tid is not None and tid not in ids:
        ids.append(tid)
    return ids


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


class IncrementalDetokenizer:
    """Turns a growing token stream into text deltas.

    Decodes a small window (``prefix_offset..``) and emits only what lies past the text already
    emitted; a delta ending in U+FFFD (an incomplete UTF-8 sequence split across tokens) is held
    back until the next token completes it. ``flush()`` emits whatever is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window (context for spacing)
        self.read_offset = 0    # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text not yet emitted (possibly ending in a replacement character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]
