"""Choosing where a request runs: a (prefill, decode) pair, or one colocated node.

Compatibility first: a prefill node and a decode node can pair only when they serve the same
weights (``fingerprint``), use the same KV ``page_size`` (the transfer copies whole pages and
does not re-page) and speak this router's ``PROTOCOL_VERSION``. Then a policy:

- ``round_robin``: rotate through prefill nodes and, independently, through decode nodes.
- ``least_load``: the node with the fewest requests, counting both what its last LoadReport says
  (waiting + running, all routers) and what this router has in flight to it (reports lag by up to
  one report interval; a burst would otherwise all land on the same node); ties go to more free
  KV pages.
- ``power_of_two``: two random candidates, the less loaded one (cheap, avoids herding when
  several routers share stale load data).
- ``cache_aware``: prefill by prefix affinity: the first ``affinity_pages`` full pages of the
  prompt are hashed and rendezvous-hashed onto the prefill nodes, so requests sharing a prefix
  (a system prompt, a conversation so far) meet the same prefix cache, and a node joining or
  leaving moves only its own share. If that node is much busier than the least loaded one, load
  wins. Decode nodes get ``least_load`` (their KV comes from the transfer, not a prefix cache).

PD pairs are preferred; colocated nodes serve when no compatible pair exists.

Conditional disaggregation (``direct_reason``): a PD pick still goes straight to its decode node,
which prefills the prompt itself, when the prompt is shorter than ``--disagg-min-prefill-tokens``
(a transfer costs more than it saves) or when every prefill node holds more than
``--disagg-max-prefill-queue`` requests (the decode pool has room the prefill pool lacks).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from pdserve.protocol import PROTOCOL_VERSION, LoadReport, NodeInfo

POLICIES = ("round_robin", "least_load", "power_of_two", "cache_aware")


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: GenerateReq to ``decode`` (a decode or colocated node), PrefillReq to
    ``prefill`` in PD mode."""
    decode: NodeInfo
    prefill: NodeInfo | None = None

    @property
    def is_colocated(self) -> bool:
        return self.prefill is None

    @property
    def node_ids(self) -> tuple[str, ...]:
        return (self.decode.node_id,) if self.prefill is None else (self.prefill.node_id, self.decode.node_id)


def compat_key(node: NodeInfo) -> tuple[str, int, str]:
    """Nodes whose KV pages are interchangeable: same model and weights, page size and KV cache
    dtype (``dtype`` is the pool's: an fp8 prefill node cannot feed a bf16 decode node)."""
    return (node.fingerprint, node.page_size, node.dtype)


def is_usable(node: NodeInfo) -> bool:
    return node.protocol_version == PROTOCOL_VERSION


def has_capacity(nodes: Iterable[NodeInfo]) -> bool:
    """True when at least one compatible (prefill, decode) pair or one colocated node is registered."""
    usable = [n for n in nodes if is_usable(n)]
    if any(n.role == "colocated" or n.is_embedding for n in usable):
        return True
    prefill_keys = {compat_key(n) for n in usable if n.role == "prefill"}
    return any(compat_key(n) in prefill_keys for n in usable if n.role == "decode")


class Pairing:
    def __init__(self, policy: str = "least_load", *, affinity_pages: int = 4, balance_abs: int = 4,
                 balance_rel: float = 1.5, seed: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"--policy: {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.affinity_pages = affinity_pages
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        self._rng = random.Random(seed)
        self._rr = {"prefill": itertools.count(), "decode": itertools.count(), "colocated": itertools.count()}

    def pick(self, nodes: Mapping[str, NodeInfo], loads: Mapping[str, LoadReport], inflight: Mapping[str, int],
             input_ids: Sequence[int], exclude: frozenset[str] | set[str] = frozenset()) -> Target | None:
        """A target for one attempt, or None when nothing usable is left after ``exclude``."""
        usable = sorted((n for n in nodes.values()   # generation never goes to --is-embedding nodes
                         if is_usable(n) and not n.is_embedding and n.node_id not in exclude),
                        key=lambda n: n.node_id)
        decodes = [n for n in usable if n.role == "decode"]
        decode_keys = {compat_key(n) for n in decodes}
        prefills = [n for n in usable if n.role == "prefill" and compat_key(n) in decode_keys]
        if prefills:
            prefill = self._choose("prefill", prefills, loads, inflight, input_ids)
            compatible = [n for n in decodes if compat_key(n) == compat_key(prefill)]
            policy = "least_load" if self.policy == "cache_aware" else self.policy
            decode = self._choose("decode", compatible, loads, inflight, input_ids, policy=policy)
            return Target(decode=decode, prefill=prefill)
        colocated = [n for n in usable if n.role == "colocated"]
        if colocated:
            return Target(decode=self._choose("colocated", colocated, loads, inflight, input_ids))
        return None

    def _choose(self, role: str, candidates: list[NodeInfo], loads: Mapping[str, LoadReport],
                inflight: Mapping[str, int], input_ids: Sequence[int], policy: str | None = None) -> NodeInfo:
        policy = policy or self.policy
        if len(candidates) == 1:
            return candidates[0]

        def score(n: NodeInfo) -> tuple[int, float, str]:
            return load_score(n.node_id, loads, inflight) + (n.node_id,)

        if policy == "round_robin":
            return candidates[next(self._rr[role]) % len(candidates)]
        if policy == "power_of_two":
            return min(self._rng.sample(candidates, 2), key=score)
        if policy == "cache_aware":
            preferred = self._affine(candidates, input_ids)
            if preferred is not None:
                least = min(candidates, key=score)
                busy, least_busy = score(preferred)[0], score(least)[0]
                if busy <= least_busy + self.balance_abs or busy <= least_busy * self.balance_rel:
                    return preferred
                return least
        return min(candidates, key=score)

    def _affine(self, candidates: list[NodeInfo], input_ids: Sequence[int]) -> NodeInfo | None:
        page_size = candidates[0].page_size
        num_pages = min(self.affinity_pages, len(input_ids) // page_size)
        if num_pages == 0:
            return None
        key = prefix_key(input_ids[:num_pages * page_size])
        return max(candidates, key=lambda n: hashlib.blake2b(key + n.node_id.encode(), digest_size=8).digest())


def prefix_key(token_ids: Sequence[int]) -> bytes:
    data = b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids)
    return hashlib.blake2b(data, digest_size=16).digest()


def load_score(node_id: str, loads: Mapping[str, LoadReport], inflight: Mapping[str, int]) -> tuple[int, float]:
    """(requests on the node, fraction of its KV pages in use); lower is less loaded."""
    report = loads.get(node_id)
    reported = report.waiting + report.running if report is not None else 0
    busy = max(reported, inflight.get(node_id, 0))
    used = 1.0 - report.free_pages / report.total_pages if report is not None and report.total_pages else 0.0
    return (busy, used)


def direct_reason(num_prompt_tokens: int, min_prefill_tokens: int, max_prefill_queue: int,
                  nodes: Mapping[str, NodeInfo], loads: Mapping[str, LoadReport], inflight: Mapping[str, int],
                  target: Target) -> str | None:
    """Why a PD target should skip its prefill node ("short_prompt", "prefill_busy"), or None."""
    if target.prefill is None:
        return None
    if num_prompt_tokens < min_prefill_tokens:
        return "short_prompt"
    if max_prefill_queue > 0:
        key = compat_key(target.prefill)
        pool = [n for n in nodes.values() if n.role == "prefill" and is_usable(n) and compat_key(n) == key]
        if pool and all(load_score(n.node_id, loads, inflight)[0] > max_prefill_queue for n in pool):
            return "prefill_busy"
    return None
