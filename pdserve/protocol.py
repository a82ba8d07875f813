"""Typed messages between the router and the nodes (request/stream channel) and registry records.

Every message is a tagged ``msgspec.Struct`` encoded with msgpack; one decoder takes the union.
Transport: each node binds a ZMQ PULL socket (``NodeInfo.addr``) for requests; each router binds a
PULL socket whose address travels in ``reply_to`` and receives ``TokenOut`` / ``PrefillStatus``.
Node <-> node messages (the KV handshake) live in ``pdserve.transfer.protocol``.
"""

from __future__ import annotations

import msgspec

from pdserve.sampling_params import SamplingParams

PROTOCOL_VERSION = 1


class GenerateReq(msgspec.Struct, tag="generate", kw_only=True):
    """To a decode node (PD mode, with prefill_* set) or a colocated node (no prefill_*)."""
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    reply_to: str                        # router's PULL address for TokenOut
    transfer_id: str | None = None       # PD mode: names the KV transfer
    prefill_bootstrap: str | None = None  # PD mode: the prefill node's bootstrap endpoint


class PrefillReq(msgspec.Struct, tag="prefill", kw_only=True):
    """To a prefill node: prefill, push KV into the decode node's pages, send the first token there."""
    rid: str
    transfer_id: str
    input_ids: list[int]
    sampling: SamplingParams
    reply_to: str                        # router's PULL address for PrefillStatus


class AbortReq(msgspec.Struct, tag="abort", kw_only=True):
    rid: str
    reason: str = "aborted"


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class TokenOut(msgspec.Struct, tag="tokens", kw_only=True):
    """Node -> router: new tokens of one request (streamed), the last one with finish_reason."""
    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error"
    matched_stop: int | None = None
    error: str | None = None
    error_code: int = 0                  # HTTP-ish status for errors (400 bad input, 503 overloaded...)
    prompt_tokens: int = 0
    cached_tokens: int = 0


class PrefillStatus(msgspec.Struct, tag="prefill_status", kw_only=True):
    """Prefill node -> router: the prefill for ``rid`` finished (ok) or failed (router may retry)."""
    rid: str
    transfer_id: str
    ok: bool
    error: str | None = None
    kv_bytes: int = 0
    num_descriptors: int = 0
    transfer_ms: float = 0.0


class FirstToken(msgspec.Struct, kw_only=True):
    """Prefill -> decode, inside the transfer's completion notification: the first sampled token."""
    token_id: int
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0


class EmbedReq(msgspec.Struct, tag="embed", kw_only=True):
    """To a node started with --is-embedding: pooled final hidden states of each input."""
    rid: str
    inputs: list[list[int]]              # token ids of each input
    reply_to: str                        # router's PULL address for EmbedOut


class EmbedOut(msgspec.Struct, tag="embeddings", kw_only=True):
    """Node -> router: one L2-normalized vector per input of an ``EmbedReq`` (or the error)."""
    rid: str
    embeddings: list[list[float]] = []
    prompt_tokens: int = 0
    error: str | None = None
    error_code: int = 0                  # 400 bad input (or not an embedding node), 503 no room


class StatsReq(msgspec.Struct, tag="stats", kw_only=True):
    """Ask a node for its current load (tests, tools); answered with ``NodeStats`` to reply_to."""
    reply_to: str


class NodeStats(msgspec.Struct, tag="node_stats", kw_only=True):
    node_id: str
    role: str
    waiting: int
    running: int
    free_pages: int
    total_pages: int
    cached_pages: int = 0
    metrics: dict[str, float] = {}       # engine counters (speculative decoding: EngineCore.metrics)


NodeMessage = GenerateReq | PrefillReq | AbortReq | StatsReq | EmbedReq
RouterMessage = TokenOut | PrefillStatus | NodeStats | EmbedOut


class NodeInfo(msgspec.Struct, kw_only=True):
    """A node's registry record (Redis, with a TTL refreshed by heartbeat)."""
    node_id: str
    role: str                            # "prefill" | "decode" | "colocated"
    addr: str                            # ZMQ PULL endpoint for NodeMessage
    bootstrap: str | None = None         # transfer bootstrap endpoint (prefill/decode)
    metrics_url: str | None = None       # HTTP /metrics of the node
    model: str                           # model name as served
    fingerprint: str                     # hash of architecture + weights identity + dtype
    dtype: str
    page_size: int
    context_length: int
    vocab_size: int
    tp: int = 1
    dp: int = 1
    max_total_tokens: int
    protocol_version: int = PROTOCOL_VERSION
    started_at: float = 0.0
    is_embedding: bool = False           # serves /v1/embeddings only (--is-embedding)
    draining: bool = False               # SIGTERM: finishing its requests, takes no new ones
    ttl_s: float = 3.0                   # record TTL: a load report older than this is stale


class LoadReport(msgspec.Struct, kw_only=True):
    node_id: str
    waiting: int
    running: int
    free_pages: int
    total_pages: int
    timestamp: float


_encoder = msgspec.msgpack.Encoder()
_node_decoder = msgspec.msgpack.Decoder(NodeMessage)
_router_decoder = msgspec.msgpack.Decoder(RouterMessage)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_node_message(data: bytes) -> NodeMessage:
    return _node_decoder.decode(data)


def decode_router_message(data: bytes) -> RouterMessage:
    return _router_decoder.decode(data)
