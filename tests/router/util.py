"""Factories shared by the router tests."""

from __future__ import annotations

import time

from pdserve.protocol import LoadReport, NodeInfo


def make_info(node_id: str, role: str = "prefill", *, addr: str | None = None, fingerprint: str = "fp-a",
              page_size: int = 16, context_length: int = 2048, vocab_size: int = 49152,
              bootstrap: str | None = None, **kw) -> NodeInfo:
    return NodeInfo(node_id=node_id, role=role, addr=addr or f"tcp://127.0.0.1:1/{node_id}",
                    bootstrap=bootstrap or f"tcp://127.0.0.1:2/{node_id}", model="smollm2",
                    fingerprint=fingerprint, dtype=kw.pop("dtype", "float32"), page_size=page_size,
                    context_length=context_length, vocab_size=vocab_size, max_total_tokens=4096,
                    started_at=kw.pop("started_at", time.time()), **kw)


def make_load(node_id: str, *, waiting: int = 0, running: int = 0, free_pages: int = 256,
              total_pages: int = 256) -> LoadReport:
    return LoadReport(node_id=node_id, waiting=waiting, running=running, free_pages=free_pages,
                      total_pages=total_pages, timestamp=time.time())


class RouterHarness:
    """The real router app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, router) -> None:
        import threading

        import uvicorn

        from pdserve.router.app import create_app

        self.router = router
        from pdserve.router.server import bound_socket

        self._sock = bound_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(router), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> "RouterHarness":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("router app did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def make_router(tokenizer, redis_url: str | None, **overrides):
    """A Router over the real registry at ``redis_url`` (None: no registry, so no nodes)."""
    from pdserve.config import RouterConfig
    from pdserve.registry import RegistryView
    from pdserve.router.core import Router

    overrides.setdefault("max_prefill_retries", 2)
    cfg = RouterConfig(registry_url=redis_url, **overrides)
    view = RegistryView(redis_url, scan_interval_s=0.5) if redis_url else None
    return Router(cfg, tokenizer, view=view, served_model_name="smollm2")


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body, with the final '[DONE]' kept as the string."""
    import json

    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
