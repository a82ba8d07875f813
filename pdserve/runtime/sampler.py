"""Batched sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Logprobs are those of the model's own distribution (log-softmax of the raw logits, before
penalties and temperature), as vLLM reports by default. Greedy rows take the argmax after
penalties. Sampled rows draw with the exponential-race trick (argmax of p / E, E ~ Exp(1)) so
a per-request ``torch.Generator`` seeds exactly its own row.

``launch`` queues the whole draw on the device and returns a ``PendingSample`` (device tensors
plus a non-blocking copy to host); ``result`` waits for it. Between the two the engine plans and
launches the next step, whose inputs read the sampled ids on the device (overlap scheduling).
Nothing in ``launch`` waits for the device, unless penalties or a mixed greedy/sampled batch
need host-built indices (small blocking copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.protocol import TokenLogprob
from pdserve.runtime.grammar import GrammarBackend
from pdserve.runtime.request import Request
from pdserve.sampling_params import GRAMMAR_FIELDS, SamplingParams


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[TokenLogprob] | None]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the device (pageable host memory is
    staged by the copy call itself, so the list may go away at once)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class PendingSample:
    """A draw queued on the device: ``tokens`` (device, ``[N]``) is usable at once by later device
    work; ``result()`` waits and returns host values."""

    def __init__(self, reqs: list[Request], tokens: torch.Tensor, chosen: torch.Tensor | None,
                 top: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.reqs = reqs
        self.tokens = tokens
        host = [tokens, *([chosen] if chosen is not None else []), *(top or ())]
        self._host = [t.to("cpu", non_blocking=True) for t in host]  # pinned on CUDA
        self._event = None
        if tokens.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._has_lp, self._has_top = chosen is not None, top is not None

    def result(self) -> SampleOutput:
        if self._event is not None:
            self._event.synchronize()
        token_list = self._host[0].tolist()
        n = len(self.reqs)
        lps: list[float | None] = [None] * n
        tops: list[list[TokenLogprob] | None] = [None] * n
        if self._has_lp:
            chosen = self._host[1].tolist()
            top_v, top_i = (self._host[2].tolist(), self._host[3].tolist()) if self._has_top else ([], [])
            for i, r in enumerate(self.reqs):
                if not r.params.logprobs:
                    continue
                lps[i] = chosen[i]
                k = r.params.top_logprobs
                if k:
                    tops[i] = [TokenLogprob(t, v) for t, v in zip(top_i[i][:k], top_v[i][:k])]
        return SampleOutput(token_list, lps, tops)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", seed: int = 0,
                 grammar: GrammarBackend | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.grammar = grammar   # None: --grammar-backend none (structured-output requests refused)

    def check_grammar(self, params: SamplingParams) -> None:
        """At admission: ValueError naming the field if this sampler cannot constrain ``params``."""
        if params.grammar is None:
            return
        if self.grammar is None:
            raise ValueError(f"{GRAMMAR_FIELDS.get(params.grammar.kind, 'grammar')}: structured output is off "
                             f"on this node (--grammar-backend none)")
        self.grammar.check(params)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> SampleOutput:
        """logits ``[N, V]`` (any float dtype; padded vocab is cut) -> one token per request."""
        return self.launch(logits, reqs).result()

    def launch(self, logits: torch.Tensor, reqs: list[Request]) -> PendingSample:
        """Queue the draw for ``logits [N, V]``; see ``PendingSample``."""
        logits = logits[:, :self.vocab_size].float()
        raw_lp = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in reqs) else None  # [N, V]
        if self.grammar is not None and any(r.params.grammar is not None for r in reqs):
            logits = logits.contiguous()
            self.grammar.mask_logits(logits, reqs)   # forbidden tokens -> -inf (grammar rows only)
        logits = self._apply_penalties(logits, reqs)
        tokens = self._draw(logits, reqs)
        chosen = top = None
        if raw_lp is not None:
            chosen = raw_lp.gather(1, tokens[:, None])[:, 0]
            k = max(r.params.top_logprobs for r in reqs)
            top = tuple(raw_lp.topk(k, dim=-1)) if k else None
        return PendingSample(reqs, tokens, chosen, top)

    def _draw(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        greedy = [i for i, r in enumerate(reqs) if r.params.is_greedy]
        if len(greedy) == len(reqs):
            return logits.argmax(dim=-1)
        if not greedy:
            return self._sample_rows(logits, reqs)
        sampled = [i for i, r in enumerate(reqs) if not r.params.is_greedy]
        tokens = torch.empty(len(reqs), dtype=torch.int64, device=logits.device)
        g, s = (to_device(x, torch.int64, logits.device) for x in (greedy, sampled))
        tokens[g] = logits[g].argmax(dim=-1)
        tokens[s] = self._sample_rows(logits[s], [reqs[i] for i in sampled])
        return tokens

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(reqs) if r.params.has_penalties or _blocks_stop(r)]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            r, p = reqs[i], reqs[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.all_ids)), dtype=torch.int64, device=row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
                out = torch.tensor(r.output_ids, dtype=torch.int64, device=row.device)
                counts = torch.bincount(out, minlength=self.vocab_size)[:self.vocab_size].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if _blocks_stop(r):
                stop = [t for t in set(p.stop_token_ids) | set(r.eos_token_ids) if t < self.vocab_size]
                row[stop] = float("-inf")
        return logits

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logits ``[M, V]`` of rows that sample -> ``[M]`` token ids."""
        dev = logits.device
        temps = to_device([r.params.temperature for r in reqs], torch.float32, dev)[:, None]
        probs = torch.softmax(logits / temps, dim=-1)
        probs = _filter(probs, reqs)
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            gen = r.generator or self.generator
            noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)


def _blocks_stop(r: Request) -> bool:
    return r.num_outputs < r.params.min_new_tokens


def _filter(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to ``probs [M, V]`` (rows renormalised implicitly by argmax)."""
    top_k = [r.params.top_k for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    min_p = [r.params.min_p for r in reqs]
    if all(k == -1 for k in top_k) and all(p == 1.0 for p in top_p) and all(m == 0.0 for m in min_p):
        return probs
    dev, vocab = probs.device, probs.shape[-1]
    sorted_p, order = probs.sort(dim=-1, descending=True)           # [M, V]
    rank = torch.arange(vocab, device=dev)[None, :]
    k = to_device([vocab if x == -1 else x for x in top_k], torch.int64, dev)[:, None]
    drop = rank >= k
    cum = sorted_p.cumsum(dim=-1)
    drop |= (cum - sorted_p) > to_device(top_p, torch.float32, dev)[:, None]  # keep the token that crosses p
    drop |= sorted_p < to_device(min_p, torch.float32, dev)[:, None] * sorted_p[:, :1]
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)
