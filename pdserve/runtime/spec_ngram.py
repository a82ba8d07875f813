"""Speculative decoding with n-gram (prompt-lookup) drafts: no draft model.

One request's speculative step: the scheduler asks ``NgramDrafter.propose`` for up to k tokens
that followed the most recent earlier occurrence of the request's last n tokens (n from
--speculative-ngram-max-match-window-size down to the min: the longest match wins) in its prompt
and output so far. Its decode row becomes an extend of 1 + k tokens (the last sampled token, then
the drafts; ``SeqChunk.num_draft = k``) over its paged KV, next to the other requests' rows of the
same step, and the forward returns logits for all 1 + k positions. ``verify`` takes the target's
token at each position (the sampler's greedy argmax) and accepts drafts while they equal it; the
request gains the accepted drafts plus the target's token after them (1 to k + 1 tokens per
forward). The KV written for rejected drafts lies beyond ``num_computed``: the next step
overwrites those slots, and pages past the sequence are handed back at commit (scheduler).

Greedy only: a request that samples (temperature > 0), has penalties, a grammar, or still blocks
its stop tokens (min_new_tokens) decodes one token per step as before, in the same batch. Greedy
output is token-identical to no speculation (the verify rows' argmax is the token plain decoding
would have produced; on CPU fp32 the logits agree to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.config import SpeculativeConfig
from pdserve.runtime.request import Request


class NgramDrafter:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.num_draft = cfg.num_draft
        self.min_window = cfg.speculative_ngram_min_match_window_size
        self.max_window = cfg.speculative_ngram_max_match_window_size

    def propose(self, tokens: list[int], max_draft: int) -> list[int]:
        """``min(k, max_draft)`` tokens that followed the latest, longest earlier match of the last n
        tokens of ``tokens`` (``min_window <= n <= max_window``); [] when nothing matches."""
        k = min(self.num_draft, max_draft)
        if k <= 0 or len(tokens) < self.min_window + 1:
            return []
        return ngram_draft(np.asarray(tokens, dtype=np.int64), k, self.min_window, self.max_window)


def ngram_draft(seq: np.ndarray, k: int, min_window: int, max_window: int) -> list[int]:
    """The prompt-lookup draft of ``seq [L]``: candidates are earlier positions j holding the last
    token; each extends its match backwards while ``seq[j - m] == seq[L - 1 - m]``. The draft is
    what followed the best match, continued with the match's period where it reaches the end."""
    n = len(seq)
    ends = np.flatnonzero(seq[:-1] == seq[-1])            # [C] earlier positions holding the last token
    if ends.size == 0:
        return []
    match = np.ones(ends.size, dtype=np.int64)            # [C] matched suffix length so far
    alive = np.ones(ends.size, dtype=bool)
    for m in range(1, min(max_window, n - 1)):
        ok = alive & (ends - m >= 0)
        ok[ok] = seq[ends[ok] - m] == seq[n - 1 - m]
        match += ok
        alive = ok
        if not alive.any():
            break
    best = int(match.max())
    if best < min_window:
        return []
    j = int(ends[np.flatnonzero(match == best)[-1]])      # the most recent of the longest matches
    out = seq[j + 1:j + 1 + k].tolist()
    period = n - 1 - j                                    # a continuation that runs into the end repeats
    while len(out) < k:                                   # with the match's period (a loop: "4 4 4" -> 4 ...)
        out.append(out[len(out) - period])
    return out


def can_speculate(req: Request) -> bool:
    """Greedy requests whose next tokens need nothing but the logits (no penalties, no grammar, no
    stop tokens still blocked by min_new_tokens)."""
    p = req.params
    return p.is_greedy and not p.has_penalties and p.grammar is None and len(req.output_ids) >= p.min_new_tokens


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    """How many leading drafts equal the target's own tokens (``targets`` has one more row)."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


@dataclass
class SpecStats:
    """Counters behind the engine's speculative metrics."""
    verify_steps: int = 0        # engine steps that verified drafts
    verified_rows: int = 0       # request-steps that carried drafts
    drafted: int = 0             # draft tokens sent to verification
    accepted: int = 0            # drafts equal to the target's tokens
    emitted: int = 0             # tokens those request-steps gained (accepted + the target's next)

    def as_dict(self) -> dict:
        return {"spec_verify_steps": self.verify_steps, "spec_verified_rows": self.verified_rows,
                "spec_drafted_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_accept_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "spec_tokens_per_step": self.emitted / self.verified_rows if self.verified_rows else 0.0}


class SpecLaunched:
    """A verify step, run to completion at launch (drafting needs every step's tokens on the host,
    so it is never overlapped). ``result()`` maps step index -> (token, logprob, top) for rows
    without drafts, and -> the list of tokens gained for rows with drafts."""

    def __init__(self, runner, seqs: list, reqs: list[Request], stats: SpecStats, check_nonfinite: bool) -> None:
        logits = runner.forward(seqs)                     # [R, vocab]: 1 + num_draft rows per verifying seq
        owners = [i for i, s in enumerate(seqs) if s.need_logits for _ in range(1 + s.num_draft)]
        sampled = runner.sampler.launch(logits, [reqs[i] for i in owners]).result()
        self.nonfinite = sorted({owners[r] for r in _nonfinite(logits)}) if check_nonfinite else []
        rows = list(zip(sampled.token_ids, sampled.logprobs, sampled.top_logprobs))
        self._out: dict[int, object] = {}
        r = 0
        for i, s in enumerate(seqs):
            if not s.need_logits:
                continue
            mine, r = rows[r:r + 1 + s.num_draft], r + 1 + s.num_draft
            if not s.num_draft:
                self._out[i] = mine[0]
                continue
            n = accept_greedy(s.input_ids[1:], [t for t, _, _ in mine])
            self._out[i] = mine[:n + 1]
            stats.verified_rows += 1
            stats.drafted += s.num_draft
            stats.accepted += n
            stats.emitted += n + 1    # (before a stop token or max_new_tokens cuts the list at commit)
        stats.verify_steps += 1

    def result(self) -> dict[int, object]:
        return self._out


def _nonfinite(logits: torch.Tensor) -> list[int]:
    return (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
