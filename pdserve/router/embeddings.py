"""``/v1/embeddings``: OpenAI's embeddings API over the nodes started with ``--is-embedding``.

Flow: read the body (413) -> parse and validate (400: ``input`` a string, a list of strings, a
list of token ids or a list of such lists; ``encoding_format`` float or base64; ``dimensions``
refused) -> model name (404) -> tokenize -> context check (400) -> pick the least busy embedding
node (none: 400 when the cluster only generates, 503 when it has no node at all) -> one
``EmbedReq`` with every input -> ``EmbedOut`` -> the response. A node leaving mid-request is a
503; the router's ``--request-timeout-s`` bounds the wait (504).

Generation requests never go to embedding nodes (``pairing.Pairing.pick`` skips them); one sent to
a cluster that only embeds is a 400 (``generation_unavailable``).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdserve.protocol import EmbedOut, EmbedReq, NodeInfo
from pdserve.router.errors import APIError, bad_request, unavailable
from pdserve.router.node_client import NodeGone, NodeSendError
from pdserve.router.pairing import is_usable, load_score


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: str | list[str | int | list[int]]   # a text, texts, token ids, or lists of token ids
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


def add_embedding_routes(app: FastAPI, router) -> None:
    from pdserve.router.app import check_api_key

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        router.metrics.in_flight.inc()
        status = 500
        try:
            check_api_key(router, request)
            response = await handle_embeddings(router, request)
            status = response.status_code
            return response
        except APIError as exc:
            status = exc.status
            raise
        finally:
            router.metrics.in_flight.dec()
            router.metrics.requests.labels("embeddings", str(status)).inc()


def embedding_nodes(router) -> list[NodeInfo]:
    return [n for n in router.nodes().values() if is_usable(n) and n.is_embedding]


def generation_unavailable(router) -> APIError:
    """No node can generate: a 400 when the cluster serves embeddings only, else a 503."""
    if embedding_nodes(router) and all(n.is_embedding for n in router.nodes().values() if is_usable(n)):
        return bad_request("this deployment serves embeddings only (nodes started with --is-embedding): "
                           "use /v1/embeddings", code="embedding_model")
    return unavailable()


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    try:
        req = msgspec.json.decode(body, type=EmbeddingRequest)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if req.encoding_format not in ("float", "base64"):
        raise bad_request(f"encoding_format: {req.encoding_format!r} is not one of float, base64",
                          param="encoding_format")
    if req.dimensions is not None:
        raise bad_request("dimensions: not supported (vectors have the model's hidden size)", param="dimensions")
    if isinstance(req.input, list):
        kinds = {type(x) for x in req.input}
        if not req.input or len(kinds) > 1:
            raise bad_request("input: a string, a list of strings, a list of token ids or a list of such lists "
                              "(non-empty, one kind)", param="input")
    return req


def tokenize_inputs(router, req: EmbeddingRequest) -> list[list[int]]:
    items = req.input if isinstance(req.input, list) else [req.input]
    if all(isinstance(x, int) for x in items):
        items = [items]   # one input given as token ids
    out = []
    for i, item in enumerate(items):
        ids = router.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request(f"input[{i}]: must contain at least one token", param="input")
        out.append(ids)
    context = router.context_length()
    for i, ids in enumerate(out):
        if context is not None and len(ids) > context:
            raise bad_request(f"input[{i}]: {len(ids)} tokens exceed the model's context length {context}",
                              param="input", code="context_length_exceeded")
    return out


def pick_embedding_node(router) -> NodeInfo:
    nodes = embedding_nodes(router)
    if not nodes:
        if router.nodes():
            raise bad_request("no node serves embeddings: start one with --is-embedding", code="no_embedding_model")
        raise unavailable()
    loads, inflight = router.loads(), router.inflight()
    return min(nodes, key=lambda n: load_score(n.node_id, loads, inflight) + (n.node_id,))


async def handle_embeddings(router, request: Request) -> JSONResponse:
    from pdserve.router.generate import read_body

    req = parse_embedding_request(await read_body(request, router.config.max_request_bytes))
    if req.model and req.model != router.served_model_name:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
    inputs = tokenize_inputs(router, req)
    node = pick_embedding_node(router)
    out = await run_embed(router, node, inputs)
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(vec, req.encoding_format)}
            for i, vec in enumerate(out.embeddings)]
    usage = {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": router.served_model_name, "usage": usage})


async def run_embed(router, node: NodeInfo, inputs: list[list[int]]) -> EmbedOut:
    rid = "embd-" + uuid.uuid4().hex
    queue = router.client.open(rid)
    router.bind(rid, node.node_id)
    try:
        try:
            router.client.send(node, EmbedReq(rid=rid, inputs=inputs, reply_to=router.client.reply_to))
        except NodeSendError as exc:
            raise unavailable(str(exc)) from None
        try:
            async with asyncio.timeout(router.config.request_timeout_s):
                msg = await queue.get()
        except TimeoutError:
            raise APIError(504, f"request timed out after {router.config.request_timeout_s:g}s",
                           code="timeout") from None
        if isinstance(msg, NodeGone):
            raise APIError(503, f"embedding node {node.node_id} left the registry mid-request", code="node_lost")
        if not isinstance(msg, EmbedOut) or msg.error:
            status = getattr(msg, "error_code", 0) or 500
            raise APIError(status, getattr(msg, "error", None) or f"unexpected reply {type(msg).__name__}")
        return msg
    finally:
        router.unbind(rid, node.node_id)
        router.client.close(rid)


def encode_vector(vec: list[float], encoding_format: str) -> list[float] | str:
    """``base64``: the float32 little-endian bytes, as OpenAI's API (and its Python client) expects."""
    if encoding_format == "float":
        return vec
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
