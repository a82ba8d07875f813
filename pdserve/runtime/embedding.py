"""Embeddings from the base model (``--is-embedding``): pooled, L2-normalized final hidden states.

A node started with ``--is-embedding`` answers ``EmbedReq`` (and refuses generation): each input
runs one prefill forward over fresh KV pages (the attention needs somewhere to put its K/V; the
pages go back right after, and nothing enters the prefix cache), the final-normed hidden states
``[T, H]`` of each input are pooled (``--embedding-pooling last``: the last token's, as for a
causal model; ``mean``: the average over its tokens) and normalized to unit length. Inputs are
batched into forwards of at most ``--max-prefill-tokens`` tokens (an input longer than that runs
alone).
"""

from __future__ import annotations

import logging

import torch

from pdserve.protocol import EmbedOut, EmbedReq
from pdserve.runtime.forward import SeqChunk, build_forward_batch
from pdserve.runtime.kv_manager import KVManager, pages_for

log = logging.getLogger(__name__)


class EmbedError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def pool(hidden: torch.Tensor, q_starts: list[int], lengths: list[int], how: str) -> torch.Tensor:
    """``hidden [T, H]`` of a ragged batch -> ``[N, H]`` unit vectors (float32), one per sequence."""
    rows = []
    for start, n in zip(q_starts, lengths):
        seq = hidden[start:start + n].float()   # [n, H]
        rows.append(seq[-1] if how == "last" else seq.mean(dim=0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def batches(inputs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of ``inputs`` grouped into forwards of at most ``max_tokens`` tokens (in order)."""
    out: list[list[int]] = []
    size = 0
    for i, ids in enumerate(inputs):
        if not out or size + len(ids) > max_tokens:
            out.append([])
            size = 0
        out[-1].append(i)
        size += len(ids)
    return out


class Embedder:
    def __init__(self, runner, pooling: str, max_batch_tokens: int) -> None:
        if runner.is_parallel:
            raise ValueError("--is-embedding: a node with --tp 1 only (embedding steps do not broadcast to ranks)")
        self.runner, self.pooling, self.max_batch_tokens = runner, pooling, max_batch_tokens

    def handle(self, msg: EmbedReq, kv: KVManager) -> EmbedOut:
        try:
            self._validate(msg.inputs)
            vectors = [None] * len(msg.inputs)
            for idx in batches(msg.inputs, self.max_batch_tokens):
                for i, vec in zip(idx, self.embed([msg.inputs[i] for i in idx], kv)):
                    vectors[i] = vec
        except EmbedError as exc:
            return EmbedOut(rid=msg.rid, error=str(exc), error_code=exc.status)
        except Exception as exc:  # a failed forward fails this request, never the node
            log.exception("embedding forward failed")
            return EmbedOut(rid=msg.rid, error=f"internal error: {exc}", error_code=500)
        return EmbedOut(rid=msg.rid, embeddings=vectors, prompt_tokens=sum(len(ids) for ids in msg.inputs))

    def _validate(self, inputs: list[list[int]]) -> None:
        if not inputs:
            raise EmbedError("input: must not be empty", 400)
        vocab, context = self.runner.vocab_size, self.runner.context_length
        for i, ids in enumerate(inputs):
            if not ids:
                raise EmbedError(f"input[{i}]: must contain at least one token", 400)
            if len(ids) > context:
                raise EmbedError(f"input[{i}]: {len(ids)} tokens exceed the context length {context}", 400)
            if any(not 0 <= t < vocab for t in ids):
                raise EmbedError(f"input[{i}]: token ids out of range [0, {vocab})", 400)

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], kv: KVManager) -> list[list[float]]:
        """One forward over ``inputs`` (fresh pages, freed after) -> one unit vector per input."""
        runner, page_size = self.runner, kv.page_size
        tables: list[list[int]] = []
        try:
            for ids in inputs:
                pages = kv.alloc(pages_for(len(ids), page_size))
                if pages is None:
                    raise EmbedError("node overloaded: no free KV pages for the embedding forward", 503)
                tables.append(pages)
            seqs = [SeqChunk(rid=f"embed-{i}", input_ids=ids, start_pos=0, page_ids=pages, need_logits=False)
                    for i, (ids, pages) in enumerate(zip(inputs, tables))]
            batch = build_forward_batch(seqs, page_size, runner.device)
            runner.attn.init_batch(batch)
            hidden = runner.model.forward(batch.input_ids, batch.positions, batch, runner.attn)  # [T, H]
            vectors = pool(hidden, batch.q_starts, [len(ids) for ids in inputs], self.pooling)  # [N, H]
            return vectors.cpu().tolist()
        finally:
            for pages in tables:
                kv.allocator.decref(pages)
