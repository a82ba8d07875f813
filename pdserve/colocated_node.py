"""``pdserve serve``: a colocated node — one engine does prefill and decode (the baseline that
disaggregation is measured against, and a node the router can use on its own)."""

from __future__ import annotations

import logging

from pdserve.node_base import NodeBase, run_node
from pdserve.protocol import AbortReq, GenerateReq, NodeMessage, TokenOut
from pdserve.runtime.dp_engine import make_engine_core
from pdserve.runtime.engine import RequestOutput

log = logging.getLogger(__name__)


def token_out(out: RequestOutput) -> TokenOut:
    return TokenOut(rid=out.rid, token_ids=out.token_ids, logprobs=out.logprobs, top_logprobs=out.top_logprobs,
                    finish_reason=out.finish_reason if out.finished else None, matched_stop=out.matched_stop,
                    error=out.error, error_code=500 if out.error else 0, prompt_tokens=out.prompt_tokens,
                    cached_tokens=out.cached_tokens)


class ColocatedNode(NodeBase):
    role = "colocated"

    def __init__(self, cfg, runner=None) -> None:
        super().__init__(cfg, runner)
        self.core = make_engine_core(cfg.engine, self.runner)   # one engine per DP attention group, or one
        self.kv = self.core.groups[0].kv   # pages for node-level work (warm-up, embeddings): group 0's under DP
        self.reply_to: dict[str, str] = {}

    def cached_pages(self) -> int:
        return sum(g.kv.cache.num_pages for g in self.core.groups if g.kv.cache is not None)

    def handle(self, msg: NodeMessage) -> None:
        if isinstance(msg, GenerateReq):
            self._generate(msg)
        elif isinstance(msg, AbortReq):
            self.core.abort(msg.rid, "abort")
        else:
            log.warning("colocated node ignores %s", type(msg).__name__)

    def _generate(self, msg: GenerateReq) -> None:
        if msg.rid in self.reply_to:
            self.send(msg.reply_to, TokenOut(rid=msg.rid, token_ids=[], finish_reason="error",
                                             error=f"duplicate request id {msg.rid}", error_code=400))
            return
        if self.core.scheduler.num_requests >= self.cfg.engine.scheduler.max_queued_requests:
            self.send(msg.reply_to, TokenOut(rid=msg.rid, token_ids=[], finish_reason="error",
                                             error="node overloaded: too many queued requests", error_code=503))
            return
        try:
            self.core.add_request(msg.rid, msg.input_ids, msg.sampling)
        except ValueError as exc:
            self.send(msg.reply_to, TokenOut(rid=msg.rid, token_ids=[], finish_reason="error", error=str(exc),
                                             error_code=400, prompt_tokens=len(msg.input_ids)))
            return
        self.reply_to[msg.rid] = msg.reply_to
        self.node_metrics.begin(msg.rid, "prefill")

    def tick(self) -> bool:
        for out in self.core.step():
            self.node_metrics.on_output(out)
            reply_to = self.reply_to.get(out.rid)
            if reply_to is None:
                continue
            self.send(reply_to, token_out(out))
            if out.finished:
                del self.reply_to[out.rid]
        return self.core.has_work

    def load(self) -> dict:
        return self.core.load()

    def metrics(self) -> dict:
        return self.core.metrics() if hasattr(self.core, "metrics") else {}   # (none under DP attention)


def main(argv: list[str]) -> int:
    return run_node(ColocatedNode, "colocated", argv)
