"""One choice's output: node token ids -> text deltas with stop strings, logprobs and counts.

Token by token: detokenize incrementally, look for a stop string in the new text, keep the
logprobs of every consumed token. A stop token id reported by the node (``matched_stop``) is
counted but not shown; a stop string ends the choice at its start (the node is then aborted by
the caller). Text that may still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pdserve.protocol import TokenOut
from pdserve.router.stop import StopStrings
from pdserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class LogprobEntry:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)   # (token text, logprob), best first


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[LogprobEntry]
    finish_reason: str | None = None


class ChoiceOutput:
    def __init__(self, index: int, tokenizer: Tokenizer, stops: StopStrings, token_text: Callable[[int], str], *,
                 want_logprobs: bool = False, skip_special_tokens: bool = True) -> None:
        self.index = index
        self.stops = stops
        self.token_text = token_text
        self.want_logprobs = want_logprobs
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.text = ""                 # output text so far (cut at a stop string once found)
        self.num_sent_chars = 0
        self.num_tokens = 0            # completion tokens consumed (a matched stop token included)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: TokenOut) -> ChoiceDelta:
        """Consume one TokenOut (never an error one: the dispatcher raises those)."""
        if out.prompt_tokens:
            self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        entries: list[LogprobEntry] = []
        for i, tid in enumerate(out.token_ids):
            if self.is_finished:
                break
            self.num_tokens += 1
            self.token_ids.append(tid)
            if self.want_logprobs:
                entries.append(self._entry(out, i, tid))
            is_last = i == len(out.token_ids) - 1
            if is_last and out.finish_reason == "stop" and out.matched_stop == tid:
                break                  # the stop token itself is not part of the text
            self._append(self.detok.add([tid]))
        if not self.is_finished and out.finish_reason is not None:
            self._append(self.detok.flush())
            if not self.is_finished:   # the flushed tail may itself complete a stop string
                self.finish_reason = "length" if out.finish_reason == "length" else "stop"
        end = len(self.text) if self.is_finished else self.stops.releasable(self.text)
        end = max(end, self.num_sent_chars)
        delta = self.text[self.num_sent_chars:end]
        self.num_sent_chars = end
        return ChoiceDelta(self.index, delta, entries, self.finish_reason)

    def _append(self, new_text: str) -> None:
        before = len(self.text)
        self.text += new_text
        pos = self.stops.find(self.text, before)
        if pos is not None:
            self.text = self.text[:pos]
            self.finish_reason = "stop"

    def _entry(self, out: TokenOut, i: int, tid: int) -> LogprobEntry:
        logprob = out.logprobs[i] if out.logprobs and i < len(out.logprobs) else 0.0
        top = []
        if out.top_logprobs and i < len(out.top_logprobs):
            top = [(self.token_text(t.token_id), t.logprob) for t in out.top_logprobs[i]]
        return LogprobEntry(tid, self.token_text(tid), logprob, top)
