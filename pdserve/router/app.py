"""The router's HTTP surface (FastAPI).

``/v1/chat/completions``, ``/v1/completions``: OpenAI-compatible generation (see generate.py).
``/v1/models``: the served model. ``/health``: 200 only when a compatible prefill+decode pair or
a colocated node is usable (status ``degraded`` while the registry is unreachable: nodes are then
known from the router's last view and its own liveness probes), else 503; ``registry_age_s`` says
how long ago the registry was last read. ``/metrics``: Prometheus. ``/nodes``: the registry view as JSON
(records, latest load, this router's in-flight attempts per node), for ``pdserve bench`` and
operators. ``--api-key`` guards ``/v1``, ``/nodes`` and ``/metrics`` (unless ``--metrics-no-auth``;
not the probe ``/health``). Every error body has OpenAI's shape.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.router import liveness
from pdserve.router.core import Router
from pdserve.router.dashboard import add_dashboard_routes
from pdserve.router.errors import APIError
from pdserve.router.embeddings import add_embedding_routes
from pdserve.router.generate import handle_generate
from pdserve.runtime import grammar


def create_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grammar.preload()   # structured output: xgrammar's import (seconds) off the event loop
        await router.start()
        prober = liveness.attach(router)   # dead nodes are noticed without the registry too
        try:
            yield
        finally:
            if prober is not None:
                prober.stop()
            await router.stop()

    app = FastAPI(title="pdserve router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router
    _add_error_handlers(app)
    _add_generation_routes(app, router)
    add_embedding_routes(app, router)
    _add_info_routes(app, router)
    add_dashboard_routes(app, router)   # /dashboard, /dashboard/data
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)


def check_api_key(router: Router, request: Request) -> None:
    key = router.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")


def _add_generation_routes(app: FastAPI, router: Router) -> None:
    async def serve(request: Request, endpoint: str, is_chat: bool) -> Response:
        router.metrics.in_flight.inc()
        status = 500
        try:
            check_api_key(router, request)
            response = await handle_generate(router, request, is_chat)
            status = response.status_code
            return response
        except APIError as exc:
            status = exc.status
            raise
        finally:
            router.metrics.in_flight.dec()
            router.metrics.requests.labels(endpoint, str(status)).inc()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, "chat", True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "completions", False)


def _add_info_routes(app: FastAPI, router: Router) -> None:
    started = int(time.time())

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_api_key(router, request)
        card = {"id": router.served_model_name, "object": "model", "created": started, "owned_by": "pdserve",
                "max_model_len": router.context_length()}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> JSONResponse:
        nodes = router.nodes().values()
        counts = {role: sum(1 for n in nodes if n.role == role) for role in ("prefill", "decode", "colocated")}
        is_ok, is_connected = router.is_healthy(), _registry_connected(router)
        age = router.view.registry_age_s if router.view is not None else None
        status = "unavailable" if not is_ok else "ok" if is_connected else "degraded"
        body = {"status": status, "registry_connected": is_connected,
                "registry_age_s": None if age is None else round(age, 3), **counts}
        return JSONResponse(body, status_code=200 if is_ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not router.config.metrics_no_auth:
            check_api_key(router, request)
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/nodes")
    async def nodes(request: Request) -> JSONResponse:
        check_api_key(router, request)
        loads, inflight = router.loads(), router.inflight()
        out = []
        draining = router.view.draining_nodes() if router.view is not None else {}
        for node_id, info in sorted({**router.nodes(), **draining}.items()):
            load = loads.get(node_id)
            out.append({**msgspec.to_builtins(info), "load": msgspec.to_builtins(load) if load else None,
                        "router_inflight": inflight.get(node_id, 0)})
        return JSONResponse({"nodes": out, "registry_connected": _registry_connected(router),
                             "policy": router.config.policy})


def _registry_connected(router: Router) -> bool:
    return router.view is not None and router.view.is_connected
