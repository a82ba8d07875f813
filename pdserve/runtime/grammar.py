"""Grammar-constrained sampling (structured output, tools) with xgrammar, as a token mask.

A request whose ``SamplingParams.grammar`` is set gets a ``GrammarMatcher`` the first time one of
its rows is sampled. Before each draw the matcher fills the row's bitmask over the vocabulary (one
bit per token: may it come next?) and the logits of forbidden tokens become -inf. The matcher
advances by catching up with ``req.output_ids``: on a decode node the first entry is the token the
prefill node sampled under the same grammar, so no extra message is needed; a retracted request
keeps its matcher. That needs each draw to see the previous one's token on the host, so the engine
does not plan a grammar request's next step ahead (like penalties).

Compiled grammars are cached by ``(kind, source)`` (an LRU of ``CACHE_SIZE``). Compiling starts in
a worker thread when a node admits the request (``prepare``), so it overlaps the step loop; the
first draw waits for it only if it is not done (typical JSON schemas take 1-10 ms on CPU).

``--constrained-json-whitespace-pattern`` (a regex) replaces the whitespace allowed between JSON
tokens; without it JSON is compact with ``", "`` and ``": "`` separators (small models given free
whitespace tend to emit newlines until max_tokens).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

from pdserve.sampling_params import GRAMMAR_FIELDS, GrammarSpec, SamplingParams

log = logging.getLogger(__name__)

CACHE_SIZE = 256
JSON_WS_EBNF = "[ \\n\\r\\t]*"        # how xgrammar's JSON grammars spell "any whitespace"
JSON_OBJECT_SCHEMA = '{"type": "object"}'


_IMPORT_LOCK = threading.Lock()


def _xgr():
    # xgrammar imports transformers (seconds on a loaded CPU, so ``preload`` / ``warm`` start it
    # early in a thread). transformers is a lazy module: a second thread importing it half-way
    # through gets "cannot import name ..." -- hence one lock around the import.
    with _IMPORT_LOCK:
        import xgrammar
    return xgrammar


def preload() -> threading.Thread:
    """Import xgrammar in a daemon thread (router startup), so that the first structured-output
    request does not stall the event loop for the import."""
    thread = threading.Thread(target=_xgr, name="xgrammar-import", daemon=True)
    thread.start()
    return thread


def _fail(spec: GrammarSpec, what: str, exc: Exception) -> ValueError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", detail)   # xgrammar's "[time] file.cc:line: " prefix
    return ValueError(f"{GRAMMAR_FIELDS.get(spec.kind, 'grammar')}: {what}: {detail[:300]}")


def build_grammar(spec: GrammarSpec, ws_pattern: str | None = None):
    """``spec`` as an ``xgrammar.Grammar`` (no tokenizer needed); ValueError naming the request field."""
    xgr = _xgr()
    if spec.kind in ("json_schema", "json_object"):
        source = spec.source if spec.kind == "json_schema" else JSON_OBJECT_SCHEMA
        try:
            json.loads(source)
        except ValueError as exc:
            raise _fail(spec, "the JSON schema is not valid JSON", exc) from None
        return _json_grammar(spec, source, ws_pattern)
    try:
        if spec.kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(spec.source)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.source)
        return xgr.Grammar.from_ebnf(spec.source)
    except Exception as exc:  # xgrammar raises RuntimeError / its own errors for bad sources
        raise _fail(spec, f"invalid {spec.kind.replace('_', ' ')}", exc) from None


def _json_grammar(spec: GrammarSpec, schema: str, ws_pattern: str | None):
    xgr = _xgr()
    strict = spec.kind == "json_schema"   # json_object: any object (extra properties allowed)
    try:
        if ws_pattern is None:
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(", ", ": "),
                                                strict_mode=strict)
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=True, strict_mode=strict)
    except Exception as exc:
        raise _fail(spec, "invalid JSON schema", exc) from None
    return xgr.Grammar.from_ebnf(str(grammar).replace(JSON_WS_EBNF, "ws_root") + "\n" + whitespace_ebnf(ws_pattern))


@lru_cache(maxsize=16)
def whitespace_ebnf(pattern: str) -> str:
    """The regex ``pattern`` as EBNF rules whose root is ``ws_root`` (others ``ws_root_*``)."""
    text = str(_xgr().Grammar.from_regex(pattern))
    return re.sub(r"\broot(\w*)", r"ws_root\1", text)


def check_whitespace_pattern(pattern: str) -> None:
    """Raise ValueError naming the flag when xgrammar cannot use ``pattern``."""
    try:
        _json_grammar(GrammarSpec(kind="json_object"), JSON_OBJECT_SCHEMA, pattern)
    except Exception as exc:
        raise ValueError(f"--constrained-json-whitespace-pattern: {pattern!r} is not a usable regex: "
                         f"{str(exc).strip()[:200]}") from None


@lru_cache(maxsize=CACHE_SIZE)
def check_grammar(spec: GrammarSpec) -> None:
    """Raise ValueError (naming the request field) if ``spec`` cannot be compiled. Cached."""
    try:
        build_grammar(spec)
    except ValueError:
        raise
    except Exception as exc:  # xgrammar missing or broken: the request fails, never the node
        raise _fail(spec, "the grammar library failed", exc) from None


def tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's view of a pdserve ``Tokenizer`` (token strings, byte-level or not, stop ids)."""
    xgr = _xgr()
    with _IMPORT_LOCK:   # see _xgr
        from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size,
                                                 stop_token_ids=list(tokenizer.eos_token_ids))


@dataclass(eq=False)
class _MatchState:
    matcher: Any
    num_accepted: int = 0        # output tokens fed to the matcher
    is_broken: bool = False      # a token the grammar rejects arrived: the row is left unmasked


class GrammarBackend:
    """Compiled-grammar cache, one matcher per request, bitmask filling and application."""

    def __init__(self, get_tokenizer: Callable[[], Any], vocab_size: int, ws_pattern: str | None = None) -> None:
        self.vocab_size = vocab_size
        self.ws_pattern = ws_pattern
        self._get_tokenizer = get_tokenizer
        self._compiler = None
        self._lock = threading.Lock()            # guards the cache (the step thread and the worker)
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Request -> _MatchState
        self._bitmask: torch.Tensor | None = None   # [rows, ceil(V / 32)] int32, host
        self.num_compiled = 0

    def warm(self) -> Future:
        """Import xgrammar and index the vocabulary in the worker thread (node warm-up), so the first
        structured-output request does not stall the step loop for seconds."""
        return self._pool.submit(self._get_compiler)

    def check(self, params: SamplingParams) -> None:
        """Admission: a bad grammar is a ValueError naming the field; a good one starts compiling."""
        if params.grammar is not None:
            check_grammar(params.grammar)
            self.prepare(params.grammar)

    def prepare(self, spec: GrammarSpec) -> Future:
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec] = fut
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                info = tokenizer_info(self._get_tokenizer(), self.vocab_size)
                self._compiler = _xgr().GrammarCompiler(info, max_threads=1)
            return self._compiler

    def _compile(self, spec: GrammarSpec):
        compiled = self._get_compiler().compile_grammar(build_grammar(spec, self.ws_pattern))
        self.num_compiled += 1
        return compiled

    def matcher_state(self, req) -> _MatchState:
        """``req``'s matcher, advanced over every output token it has not yet seen."""
        state = self._states.get(req)
        if state is None:
            compiled = self.prepare(req.params.grammar).result()
            state = _MatchState(_xgr().GrammarMatcher(compiled))
            self._states[req] = state
        new = req.output_ids[state.num_accepted:]
        for token in new:
            if not state.is_broken and not state.matcher.accept_token(token):
                log.warning("request %s: token %d breaks its grammar; its output is no longer constrained",
                            req.rid, token)
                state.is_broken = True
        state.num_accepted += len(new)
        return state

    def mask_logits(self, logits: torch.Tensor, reqs: list) -> None:
        """Set to -inf, in place, the logits ``[N, V]`` of tokens each grammar row's matcher forbids."""
        rows, bitmask = [], None
        for i, req in enumerate(reqs):
            if req.params.grammar is None:
                continue
            state = self.matcher_state(req)
            if state.is_broken or state.matcher.is_terminated():
                continue
            if bitmask is None:
                bitmask = self._host_bitmask(len(reqs))
            if state.matcher.fill_next_token_bitmask(bitmask, i):   # False: every token allowed here
                rows.append(i)
        if rows:
            xgr = _xgr()
            xgr.apply_token_bitmask_inplace(logits, bitmask[:len(reqs)].to(logits.device, non_blocking=True),
                                            vocab_size=self.vocab_size, indices=rows)

    def _host_bitmask(self, num_rows: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = _xgr().allocate_token_bitmask(max(num_rows, 8), self.vocab_size)
        return self._bitmask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_grammar_backend(backend: str, get_tokenizer: Callable[[], Any], vocab_size: int,
                         ws_pattern: str | None) -> GrammarBackend | None:
    """``--grammar-backend``: "xgrammar" or "none" (structured-output requests are then refused)."""
    if backend == "none":
        return None
    return GrammarBackend(get_tokenizer, vocab_size, ws_pattern)
