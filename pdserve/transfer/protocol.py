"""Typed messages between a prefill node (KV sender) and a decode node (KV receiver).

Transport: the prefill node binds a ZMQ ROUTER at its bootstrap endpoint; a decode node dials it
with one DEALER per prefill peer (routing id = the decode agent's name). Every message is a tagged
``msgspec.Struct`` encoded with msgpack; ``decode_message`` takes the union. The completion
(``TransferComplete``) does not travel over ZMQ: it is a NIXL notification sent after the
transfer's writes are DONE, so it can never overtake the data.

One request's flow (decode D, prefill P)::

    D -> P  Handshake        once per peer: NIXL metadata + pool address + layout + fingerprint
    P -> D  HandshakeAccept | HandshakeReject (reason names both sides' values)
    D -> P  KVDest           per transfer: the decode pages to fill
    P => D  (NIXL WRITEs, one per finished prefill chunk)
    P ~> D  TransferComplete (NIXL notification: first token payload + metrics)
    either  Cancel -> CancelAck (the side that receives Cancel answers once its writes are drained)
    both    Heartbeat        every heartbeat_interval_s; a peer silent for peer_timeout_s is dead
"""

from __future__ import annotations

import msgspec

from pdserve.runtime.kv_pool import KVLayout
from pdserve.transfer.tp_map import RegionInfo, plan_routes

TRANSFER_PROTOCOL_VERSION = 2   # 2: pools as per-rank regions (tensor parallelism)


class LayoutSpec(msgspec.Struct, frozen=True, kw_only=True):
    """KVLayout on the wire (the fields both pools must agree on, byte for byte); ``num_kv_heads``
    is the model's, each rank's share is in its ``RegionInfo``."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str
    order: str
    k_scale: float = 1.0        # fp8 caches: what the stored bytes are multiplied by when read
    v_scale: float = 1.0

    @classmethod
    def of(cls, layout: KVLayout, total_kv_heads: int | None = None) -> "LayoutSpec":
        return cls(num_layers=layout.num_layers, num_kv_heads=total_kv_heads or layout.num_kv_heads,
                   head_dim=layout.head_dim, page_size=layout.page_size, dtype=layout.dtype,
                   order=layout.order, k_scale=layout.k_scale, v_scale=layout.v_scale)

    def to_layout(self) -> KVLayout:
        return KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, page_size=self.page_size, dtype=self.dtype,
                        order=self.order, k_scale=self.k_scale, v_scale=self.v_scale)


class PoolInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Where a node's KV pools live: NIXL agent identity and one registered region per rank
    (``transfer/tp_map.py``); every rank's pool has ``num_pages`` pages."""
    agent_name: str
    num_pages: int
    device_kind: str            # "cpu" | "cuda"
    regions: list[RegionInfo]

    def region(self, rank: int) -> RegionInfo:
        return next(r for r in self.regions if r.rank == rank)

    @property
    def dp_groups(self) -> list[int]:
        return sorted({r.dp_group for r in self.regions})


class Handshake(msgspec.Struct, tag="handshake", kw_only=True):
    """Decode -> prefill, once per peer."""
    pool: PoolInfo
    agent_metadata: bytes       # nixl get_agent_metadata(): lets the prefill agent write here
    layout: LayoutSpec
    fingerprint: str            # model identity (architecture + weights + dtype)
    protocol_version: int = TRANSFER_PROTOCOL_VERSION


class HandshakeAccept(msgspec.Struct, tag="handshake_accept", kw_only=True):
    """Prefill -> decode: writes may come; completions arrive as NIXL notifs from ``pool.agent_name``."""
    pool: PoolInfo


class HandshakeReject(msgspec.Struct, tag="handshake_reject", kw_only=True):
    reason: str                 # e.g. "page size mismatch: prefill 16, decode 32"


class KVDest(msgspec.Struct, tag="kv_dest", kw_only=True):
    """Decode -> prefill: fill these decode pages (in order, on every rank of ``dp_group``) with
    the transfer's KV."""
    transfer_id: str
    page_ids: list[int]
    dp_group: int = 0


class TransferMetrics(msgspec.Struct, kw_only=True):
    """Per-transfer numbers (kept in a bounded ring on both sides, shown on /metrics)."""
    transfer_id: str
    kv_bytes: int = 0
    num_pages: int = 0
    num_descriptors: int = 0    # contiguous runs actually posted (what costs ~8 us each)
    num_writes: int = 0         # write() calls (prefill chunks)
    setup_us: float = 0.0       # CPU time building NIXL requests (make_prepped_xfer / initialize_xfer)
    busy_ms: float = 0.0        # time with at least one write in flight (post -> seen DONE)
    wall_ms: float = 0.0        # first write posted -> completion sent
    nixl_desc_count: int = -1   # descriptors NIXL reports after its own merging (-1: not captured)

    @property
    def gbps(self) -> float:
        return self.kv_bytes / (self.busy_ms * 1e6) if self.busy_ms > 0 else 0.0


class TransferComplete(msgspec.Struct, tag="complete", kw_only=True):
    """Prefill -> decode as a NIXL notification, sent only after every write is DONE."""
    transfer_id: str
    payload: bytes              # opaque to the transfer layer: first token, logprobs...
    metrics: TransferMetrics


class Cancel(msgspec.Struct, tag="cancel", kw_only=True):
    """Either way: stop this transfer. The receiver of a Cancel answers with CancelAck once no
    write of the transfer is in flight any more (the decode side may then reuse the pages)."""
    transfer_id: str
    reason: str


class CancelAck(msgspec.Struct, tag="cancel_ack", kw_only=True):
    transfer_id: str


class Heartbeat(msgspec.Struct, tag="heartbeat", kw_only=True):
    sent_at: float              # sender's time.time(), for debugging clock-free liveness


TransferMessage = (Handshake | HandshakeAccept | HandshakeReject | KVDest | TransferComplete
                   | Cancel | CancelAck | Heartbeat)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TransferMessage)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_message(data: bytes) -> TransferMessage:
    """Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` on malformed input."""
    return _decoder.decode(data)


def check_compatible(prefill: Handshake, decode: Handshake) -> str | None:
    """None if the two nodes can exchange KV; otherwise the reason, naming both sides' values.

    ``prefill`` is the prefill node's own description in the same form as the decode's Handshake.
    The model fingerprint covers the model dtype, so a KV dtype or scale mismatch under one
    fingerprint means the two nodes were started with different ``--kv-cache-dtype``.
    """
    p, d = prefill, decode
    kv_flag = " (start both with the same --kv-cache-dtype)"
    pairs = [
        ("protocol version", p.protocol_version, d.protocol_version, ""),
        ("model fingerprint", p.fingerprint, d.fingerprint, ""),
        ("KV cache dtype", p.layout.dtype, d.layout.dtype, kv_flag),
        ("KV k_scale", p.layout.k_scale, d.layout.k_scale, kv_flag),
        ("KV v_scale", p.layout.v_scale, d.layout.v_scale, kv_flag),
        ("page size", p.layout.page_size, d.layout.page_size, ""),
        ("num layers", p.layout.num_layers, d.layout.num_layers, ""),
        ("num kv heads", p.layout.num_kv_heads, d.layout.num_kv_heads, ""),
        ("head dim", p.layout.head_dim, d.layout.head_dim, ""),
        ("layout order", p.layout.order, d.layout.order, ""),
    ]
    for what, pv, dv, hint in pairs:
        if pv != dv:
            return f"{what} mismatch: prefill {pv}, decode {dv}{hint}"
    for group in d.pool.dp_groups:
        routes = plan_routes(p.pool.regions, d.pool.regions, group)
        if isinstance(routes, str):
            return f"tensor-parallel layouts cannot be mapped: {routes}"
    return None
