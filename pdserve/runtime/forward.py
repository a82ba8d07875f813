"""The scheduler -> runner contract: plain data describing one forward step.

A step holds any mix of prefill chunks and decode tokens (ragged, concatenated). Each sequence
contributes ``len(input_ids)`` new tokens at positions ``start_pos ..``; its pages cover the whole
context after the step. The runner turns a list of ``SeqChunk`` into a ``ForwardBatch`` of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FUTURE_TOKEN = -1   # input id of a token that the step in flight is still sampling (overlap scheduling)


@dataclass
class SeqChunk:
    rid: str
    input_ids: list[int]        # new tokens this step
    start_pos: int              # tokens already in the KV cache (cached prefix + earlier chunks)
    page_ids: list[int]         # the request's page table, covering start_pos + len(input_ids)
    need_logits: bool = True    # False for a prefill chunk that is not the prompt's last
    num_draft: int = 0          # speculative verify: the last num_draft inputs are drafts (logits for 1 + num_draft)

    @property
    def num_new_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def kv_len(self) -> int:
        return self.start_pos + len(self.input_ids)


@dataclass
class ForwardBatch:
    seqs: list[SeqChunk]
    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    out_loc: torch.Tensor          # [T] int64, slot where each new token's K/V goes
    q_starts: list[int]            # per seq, offset of its first new token in the T axis
    logits_idx: torch.Tensor       # [N] token indices whose logits are needed (N = seqs needing them)
    is_decode: bool                # every seq has exactly one new token
    extras: dict = field(default_factory=dict)  # backend-specific metadata (e.g. Triton page tables)
    dp_tokens: list[int] | None = None  # DP attention: new tokens of every group this step (runtime/parallel.py)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.seqs)


def page_slots(page_ids: list[int], start: int, end: int, page_size: int) -> torch.Tensor:
    """Slots of tokens ``[start, end)`` of a page table -> ``[end - start]`` int64."""
    if -(-end // page_size) > len(page_ids):
        raise ValueError(f"page table covers {len(page_ids) * page_size} tokens, need {end}")
    first, last = start // page_size, -(-end // page_size)
    pages = torch.tensor(page_ids[first:last], dtype=torch.int64)
    slots = (pages[:, None] * page_size + torch.arange(page_size, dtype=torch.int64)[None, :]).reshape(-1)
    return slots[start - first * page_size:end - first * page_size]


def build_forward_batch(seqs: list[SeqChunk], page_size: int, device: torch.device | str = "cpu") -> ForwardBatch:
    ids: list[int] = []
    positions: list[int] = []
    q_starts: list[int] = []
    out_locs: list[torch.Tensor] = []
    logits_idx: list[int] = []
    for s in seqs:
        q_starts.append(len(ids))
        ids.extend(s.input_ids)
        positions.extend(range(s.start_pos, s.kv_len))
        out_locs.append(page_slots(s.page_ids, s.start_pos, s.kv_len, page_size))
        if s.need_logits:
            logits_idx.extend(range(len(ids) - 1 - s.num_draft, len(ids)))
    return ForwardBatch(
        seqs=seqs,
        input_ids=_to(torch.tensor(ids, dtype=torch.int64), device),
        positions=_to(torch.tensor(positions, dtype=torch.int64), device),
        out_loc=_to(torch.cat(out_locs), device) if out_locs else torch.empty(0, dtype=torch.int64, device=device),
        q_starts=q_starts,
        logits_idx=_to(torch.tensor(logits_idx, dtype=torch.int64), device),
        is_decode=all(s.num_new_tokens == 1 for s in seqs),
    )


def _to(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host -> device without waiting for the device (pageable memory is staged by the call)."""
    return t.to(device, non_blocking=True)
