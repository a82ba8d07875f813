"""Decode side: reserve pages, tell the prefill node where they are, learn when the KV is in.

One transfer, as the decode scheduler sees it::

    receiver.expect(tid, prefill_bootstrap, page_ids)   # pages already reserved -> BOOTSTRAPPING
        (first time for this prefill node: dial + Handshake; KVDest follows on the same
         connection right away, so the first transfer does not wait a round trip)
        HandshakeAccept                                               -> TRANSFERRING
    poll() -> TransferDone(tid, payload, metrics)   # NIXL notif after the writes -> DONE
    (or poll() -> TransferFailed(tid, reason): rejected, cancelled, prefill silent, timed out)

``cancel(tid)`` asks the prefill node to stop; TransferFailed comes once it confirms that no
write is in flight (CancelAck), or when it is declared dead, so freed pages are never written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec

from pdserve.config import TransferConfig
from pdserve.runtime.kv_pool import KVPool
from pdserve.transfer.base import (MetricsRing, ReceiverEvent, TransferDone, TransferError,
                                   TransferFailed, TransferRecord, TransferState)
from pdserve.transfer.channel import BootstrapChannel, PeerLost
from pdserve.transfer.nixl_backend import NixlAgent, agent_name, pool_info
from pdserve.transfer.pools import PoolSet
from pdserve.transfer.protocol import (Cancel, CancelAck, Handshake, HandshakeAccept,
                                       HandshakeReject, KVDest, LayoutSpec, TransferComplete,
                                       decode_message)

log = logging.getLogger(__name__)
S = TransferState


@dataclass
class _Recv(TransferRecord):
    page_ids: tuple[int, ...] = ()
    cancel_sent_at: float | None = None


@dataclass
class _Prefill:
    endpoint: str
    agent_name: str | None = None         # known once accepted; completions come from it


class KVReceiver:
    def __init__(self, pool: KVPool | PoolSet, fingerprint: str, cfg: TransferConfig, host: str, *,
                 metrics_capacity: int = 1024) -> None:
        """``pool``: every rank's pool of the node (``PoolSet``), or one pool."""
        self.pools = pool if isinstance(pool, PoolSet) else PoolSet.single(pool)
        self.pool, self.cfg = self.pools.ranks[0].pool, cfg
        self._nixl = NixlAgent(agent_name("decode"), [p.buffer for p in self.pools.pools],
                               [p.layout.page_nbytes for p in self.pools.pools])
        self.agent_name = self._nixl.name
        self._handshake = Handshake(pool=pool_info(self._nixl, self.pools), agent_metadata=self._nixl.metadata,
                                    layout=LayoutSpec.of(self.pools.layout, self.pools.total_kv_heads),
                                    fingerprint=fingerprint)
        # The ROUTER this binds is the node's advertised bootstrap endpoint; transfers only dial out.
        self._channel = BootstrapChannel(host, cfg.bootstrap_port, self.agent_name,
                                         heartbeat_interval_s=cfg.heartbeat_interval_s,
                                         peer_timeout_s=cfg.peer_timeout_s)
        self.bootstrap_endpoint = self._channel.endpoint
        self._peers: dict[str, _Prefill] = {}          # endpoint -> prefill node
        self._transfers: dict[str, _Recv] = {}
        self._stray: list[tuple[str, TransferComplete, float]] = []   # notifs ahead of their accept
        self._events: list[ReceiverEvent] = []
        self.metrics_ring = MetricsRing(metrics_capacity)

    # -- scheduler API ------------------------------------------------------------------------
    def expect(self, transfer_id: str, prefill_bootstrap: str, page_ids: list[int], dp_group: int = 0) -> None:
        """Ask the prefill node at ``prefill_bootstrap`` to fill ``page_ids`` (in order) of the
        ranks of DP attention group ``dp_group``."""
        old = self._transfers.get(transfer_id)
        if old is not None and not old.state.is_terminal:
            raise TransferError(f"transfer {transfer_id} is already live ({old.state.value})")
        bad = [p for p in page_ids if not 0 <= p < self.pool.num_pages]
        if bad:
            raise TransferError(f"transfer {transfer_id}: pages {bad[:8]} outside the pool")
        peer = self._peers.get(prefill_bootstrap)
        if peer is None:
            peer = self._peers[prefill_bootstrap] = _Prefill(prefill_bootstrap)
            self._channel.dial(prefill_bootstrap)
            self._channel.send(prefill_bootstrap, self._handshake)
        rec = _Recv(transfer_id, peer=prefill_bootstrap, state=S.BOOTSTRAPPING, page_ids=tuple(page_ids))
        self._transfers[transfer_id] = rec
        self._channel.send(prefill_bootstrap, KVDest(transfer_id=transfer_id, page_ids=list(page_ids),
                                                     dp_group=dp_group))
        if peer.agent_name is not None:
            rec.advance(S.TRANSFERRING)

    def cancel(self, transfer_id: str, reason: str = "cancelled by decode") -> None:
        """Stop it; TransferFailed follows once the prefill node has no write in flight."""
        rec = self._transfers.get(transfer_id)
        if rec is None or rec.state.is_terminal or rec.state is S.CANCELLING:
            return
        rec.advance(S.CANCELLING, reason)
        rec.cancel_sent_at = time.monotonic()
        self._channel.send(rec.peer, Cancel(transfer_id=transfer_id, reason=reason))

    def state(self, transfer_id: str) -> TransferState:
        rec = self._transfers.get(transfer_id)
        if rec is None:
            raise TransferError(f"unknown transfer {transfer_id}")
        return rec.state

    def forget(self, transfer_id: str) -> None:
        rec = self._transfers.get(transfer_id)
        if rec is not None and not rec.state.is_terminal:
            raise TransferError(f"transfer {transfer_id} is live ({rec.state.value}); cancel it first")
        self._transfers.pop(transfer_id, None)

    def poll(self) -> list[ReceiverEvent]:
        for peer, msg in self._channel.recv():
            self._on_message(peer, msg)
        self._on_notifs()
        self._expire(time.monotonic())
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._channel.close()
        self._nixl.close()

    # -- internals ----------------------------------------------------------------------------
    def _end(self, rec: _Recv, state: TransferState, reason: str) -> None:
        rec.advance(state, reason)
        self._events.append(TransferFailed(rec.transfer_id, rec.reason))

    def _live(self, peer: str) -> list[_Recv]:
        return [r for r in self._transfers.values() if r.peer == peer and not r.state.is_terminal]

    def _on_message(self, peer: str, msg) -> None:
        if isinstance(msg, HandshakeAccept):
            if peer not in self._peers:
                return                        # dropped meanwhile
            self._peers[peer].agent_name = msg.pool.agent_name
            for rec in self._live(peer):
                if rec.state is S.BOOTSTRAPPING:
                    rec.advance(S.TRANSFERRING)
        elif isinstance(msg, HandshakeReject):
            self._drop_peer(peer, f"handshake rejected by {peer}: {msg.reason}")
        elif isinstance(msg, (Cancel, CancelAck)):
            self._on_cancel(peer, msg)
        elif isinstance(msg, PeerLost):
            accepted = peer in self._peers and self._peers[peer].agent_name is not None
            what = "silent" if accepted else "did not answer the handshake"
            self._drop_peer(peer, f"prefill {peer} {what} for {msg.silent_s:.1f} s", dropped=True)
        else:
            log.warning("unexpected %s from %s ignored", type(msg).__name__, peer)

    def _on_cancel(self, peer: str, msg: Cancel | CancelAck) -> None:
        rec = self._transfers.get(msg.transfer_id)
        if rec is None or rec.state.is_terminal or rec.peer != peer:
            return
        if isinstance(msg, Cancel):   # the prefill node stopped it (its writes are drained)
            reason = f"cancelled by prefill: {msg.reason}"
            self._end(rec, S.CANCELLED if rec.state is S.CANCELLING else S.FAILED, reason)
        elif rec.state is S.CANCELLING:
            self._end(rec, S.CANCELLED, rec.reason)

    def _drop_peer(self, peer: str, reason: str, *, dropped: bool = False) -> None:
        for rec in self._live(peer):
            self._end(rec, S.FAILED, reason)
        self._peers.pop(peer, None)
        if not dropped:
            self._channel.drop(peer)

    def _on_notifs(self) -> None:
        incoming = [(a, m, time.monotonic()) for a, msgs in self._nixl.get_notifs().items() for m in msgs]
        stray, self._stray = self._stray, []
        for agent, raw, t in incoming:
            try:
                msg = decode_message(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("malformed notification from %s dropped: %s", agent, exc)
                continue
            if isinstance(msg, TransferComplete):
                stray.append((agent, msg, t))
        for agent, msg, t in stray:
            if not self._on_complete(agent, msg):
                self._stray.append((agent, msg, t))

    def _on_complete(self, agent: str, msg: TransferComplete) -> bool:
        """Apply a completion; False to keep it for later (its accept is not processed yet)."""
        rec = self._transfers.get(msg.transfer_id)
        if rec is None or rec.state.is_terminal:
            return True
        peer = self._peers.get(rec.peer)
        if peer is None or peer.agent_name is None:
            return False
        if peer.agent_name != agent:
            log.warning("completion for %s from %s, expected %s: ignored", msg.transfer_id, agent, peer.agent_name)
            return True
        if rec.state is S.CANCELLING:   # finished before our Cancel landed: nothing in flight
            self._end(rec, S.CANCELLED, rec.reason)
            return True
        rec.advance(S.DONE)
        self.metrics_ring.add(msg.metrics)
        self._events.append(TransferDone(msg.transfer_id, msg.payload, msg.metrics))
        return True

    def _expire(self, now: float) -> None:
        limit = self.cfg.transfer_timeout_s
        self._stray = [s for s in self._stray if now - s[2] <= limit]
        for tid, rec in list(self._transfers.items()):
            if rec.state in (S.BOOTSTRAPPING, S.TRANSFERRING) and rec.age_s(now) > limit:
                self.cancel(tid, f"timed out after {limit:g} s")
            elif rec.state is S.CANCELLING and now - rec.cancel_sent_at > self.cfg.peer_timeout_s:
                # A live prefill node that does not confirm a cancel within peer_timeout_s is
                # treated like a dead one: the pages are released.
                self._end(rec, S.FAILED, f"{rec.reason} (prefill did not confirm the cancel)")
            elif rec.state.is_terminal and now - rec.ended_at > limit:
                del self._transfers[tid]
