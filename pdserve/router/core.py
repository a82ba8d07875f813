"""The router's state: config, tokenizer, registry view, node sockets, pairing, metrics.

Stateless across requests by design (the nodes hold all KV state), so routers scale by replicas.
What it does keep is per-attempt bookkeeping: which nodes each in-flight attempt is bound to, so
that a node leaving the registry reaches exactly the attempts that depended on it (within the
registry's detection time: the record TTL plus at most one scan), and how many attempts this
router has in flight per node (a load signal fresher than the nodes' reports).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from functools import lru_cache

from pdserve.config import RouterConfig
from pdserve.protocol import LoadReport, NodeInfo
from pdserve.registry import RegistryView
from pdserve.router.dashboard import LiveStats
from pdserve.router.metrics import RouterMetrics
from pdserve.router.node_client import NodeClient, NodeGone
from pdserve.router.pairing import Pairing, Target, has_capacity, is_usable
from pdserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Router:
    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, *, view: RegistryView | None,
                 served_model_name: str, context_length: int | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.view = view
        self.served_model_name = served_model_name
        self.default_context_length = context_length
        self.pairing = Pairing(config.policy)
        self.client = NodeClient(config.host, config.security.cluster_secret)
        self.client.on_refused = self._on_node_refused
        self.metrics = RouterMetrics(self.nodes, self.loads, self.load_ages)
        self.live = LiveStats(config.dispatch.slo_window_s, self.metrics.registry)   # dashboard, planner
        self.token_text = lru_cache(maxsize=65536)(lambda tid: tokenizer.decode([tid], skip_special_tokens=False))
        self._inflight: dict[str, int] = defaultdict(int)     # node_id -> attempts bound to it
        self._bound: dict[str, set[str]] = defaultdict(set)    # node_id -> attempt rids
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.client.start()
        if self.view is not None:
            self.view.add_listener(self._on_registry_event)
            await asyncio.to_thread(self.view.start)

    async def stop(self) -> None:
        if self.view is not None:
            await asyncio.to_thread(self.view.stop)
        await self.client.stop()

    # -- registry ----------------------------------------------------------------------------
    def nodes(self) -> dict[str, NodeInfo]:
        return self.view.nodes() if self.view is not None else {}

    def loads(self) -> dict[str, LoadReport]:
        return self.view.loads() if self.view is not None else {}

    def load_ages(self) -> dict[str, float]:
        """Seconds since each node's latest load report arrived (stale gauges are not exported)."""
        return self.view.load_ages() if self.view is not None else {}

    def is_healthy(self) -> bool:
        return has_capacity(self.nodes().values())

    def context_length(self) -> int | None:
        """The smallest context length among usable nodes (any of them may serve the request)."""
        lengths = [n.context_length for n in self.nodes().values() if is_usable(n) and n.context_length > 0]
        if lengths:
            return min(lengths)
        return self.default_context_length

    def vocab_size(self) -> int:
        sizes = [n.vocab_size for n in self.nodes().values() if is_usable(n) and n.vocab_size > 0]
        return min(sizes) if sizes else self.tokenizer.vocab_size

    def pick(self, input_ids: list[int], exclude: set[str]) -> Target | None:
        return self.pairing.pick(self.nodes(), self.loads(), self._inflight, input_ids, exclude)

    # -- attempt bookkeeping (event loop thread only) -----------------------------------------
    def bind(self, rid: str, node_id: str) -> None:
        if rid not in self._bound[node_id]:
            self._bound[node_id].add(rid)
            self._inflight[node_id] += 1

    def unbind(self, rid: str, node_id: str) -> None:
        rids = self._bound.get(node_id)
        if rids is not None and rid in rids:
            rids.discard(rid)
            self._inflight[node_id] -= 1
            if not rids:
                self._bound.pop(node_id, None)
                self._inflight.pop(node_id, None)

    def inflight(self) -> dict[str, int]:
        return dict(self._inflight)

    def _on_registry_event(self, event: str, info: NodeInfo) -> None:
        """Registry view thread -> event loop."""
        if event == "removed" and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._node_removed, info)

    def _on_node_refused(self, node_id: str) -> None:
        """Monitor thread -> event loop: the node failed the cluster handshake (another --cluster-secret);
        what was sent to it is never delivered, so its attempts end as if it had left."""
        info = self.nodes().get(node_id)
        if info is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._node_removed, info)

    def _node_removed(self, info: NodeInfo) -> None:
        rids = self._bound.pop(info.node_id, set())
        self._inflight.pop(info.node_id, None)
        if rids:
            log.warning("node %s (%s) left the registry with %d attempt(s) bound to it", info.node_id,
                        info.role, len(rids))
        for rid in rids:
            self.client.post(rid, NodeGone(info.node_id, info.role))
        self.client.forget(info.node_id)
