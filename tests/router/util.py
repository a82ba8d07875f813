"""Factories shared by the router tests."""

from __future__ import annotations

import time

from pdserve.protocol import LoadReport, NodeInfo


def make_info(node_id: str, role: str = "prefill", *, addr: str | None = None, fingerprint: str = "fp-a",
              page_size: int = 16, context_length: int = 2048, vocab_size: int = 49152,
              bootstrap: str | None = None, **kw) -> NodeInfo:
    return NodeInfo(node_id=node_id, role=role, addr=addr or f"tcp://127.0.0.1:1/{node_id}",
                    bootstrap=bootstrap or f"tcp://127.0.0.1:2/{node_id}", model="smollm2",
                    fingerprint=fingerprint, dtype="float32", page_size=page_size,
                    context_length=context_length, vocab_size=vocab_size, max_total_tokens=4096,
                    started_at=kw.pop("started_at", time.time()), **kw)


def make_load(node_id: str, *, waiting: int = 0, running: int = 0, free_pages: int = 256,
              total_pages: int = 256) -> LoadReport:
    return LoadReport(node_id=node_id, waiting=waiting, running=running, free_pages=free_pages,
                      total_pages=total_pages, timestamp=time.time())
