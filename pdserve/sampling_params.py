"""Per-request sampling parameters: one typed struct shared by the engine, the nodes and the router."""

from __future__ import annotations

import msgspec

GRAMMAR_KINDS = ("json_schema", "json_object", "structural_tag", "regex", "ebnf")
# The request field each kind comes from, for error messages that name it.
GRAMMAR_FIELDS = {"json_schema": "response_format", "json_object": "response_format", "structural_tag": "tools",
                  "regex": "regex", "ebnf": "ebnf"}


class GrammarSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What constrains a request's output: ``kind`` and its source text (a JSON schema, an xgrammar
    structural tag as JSON, a regex or an EBNF grammar; empty for json_object). Nodes compile it
    (cached by ``(kind, source)``) and mask the logits with it; see ``pdserve.runtime.grammar``."""
    kind: str
    source: str = ""


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                  # -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0            # how many alternatives per token (needs logprobs)
    grammar: GrammarSpec | None = None  # structured output (response_format, tools, regex, ebnf)

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the field for any invalid value; return self."""
        _need(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _need(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _need(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 or >= 1, got {self.top_k}")
        _need(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _need(self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"must be in [-2, 2], got {self.frequency_penalty}")
        _need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"must be in [-2, 2], got {self.presence_penalty}")
        _need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _need(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
              f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        _need(0 <= self.top_logprobs <= 20, "top_logprobs", f"must be in [0, 20], got {self.top_logprobs}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            _need(not bad, "stop_token_ids", f"ids out of vocabulary range: {bad[:5]}")
        if self.grammar is not None:
            _need(self.grammar.kind in GRAMMAR_KINDS, "grammar",
                  f"kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.grammar.kind!r}")
            from pdserve.runtime.grammar import check_grammar  # xgrammar loads only when a request needs it
            check_grammar(self.grammar)
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


def _need(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def sampling_params_from(value: "SamplingParams | dict | None") -> SamplingParams:
    """Accept a dict (Python API) or a struct; unknown keys are an error naming them."""
    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"sampling_params: expected a dict, got {type(value).__name__}")
    try:
        return msgspec.convert(value, SamplingParams, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"sampling_params: {exc}") from None
