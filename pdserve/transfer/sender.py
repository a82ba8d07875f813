"""Prefill side: push a request's KV pages into a decode node's pages.

One transfer, as the prefill scheduler sees it::

    poll() -> DestReady(tid, dst_pages)    # decode's KVDest arrived         -> TRANSFERRING
    sender.write(tid, src_pages, dst_index)   # per finished prefill chunk
    sender.finish(tid, payload)            # first token + logprobs
    poll() -> TransferSent(tid, metrics)   # every write DONE, completion notif sent -> DONE
    (or poll() -> TransferCancelled(tid, reason): decode cancelled, peer lost, write failed, timeout)

The KVDest may arrive before the PrefillReq (decode is fast, the request still queued) or after
it. Either way DestReady is emitted when it arrives and the sender keeps the transfer; if nothing
claims it (write / finish / expect) within ``transfer_timeout_s`` decode is told (Cancel) so it
frees its pages. Optionally ``expect(tid)`` when the PrefillReq arrives (-> WAITING_DEST): writes
issued before DestReady are then queued and posted as soon as the pages are known, and a KVDest
that never comes times out here too.

``forget(tid)`` on a live transfer aborts it quietly: it still drains and tells decode, but no
event is emitted for it any more.
"""

from __future__ import annotations

import logging
import time

import torch
from dataclasses import dataclass, field

from pdserve.config import TransferConfig
from pdserve.runtime.kv_pool import KVPool
from pdserve.transfer.base import (DestReady, MetricsRing, SenderEvent, TransferCancelled,
                                   TransferError, TransferRecord, TransferSent, TransferState)
from pdserve.transfer.channel import BootstrapChannel, PeerLost
from pdserve.transfer.nixl_backend import (NixlAgent, NixlError, PeerPool, WriteHandle, agent_name,
                                           pool_info)
from pdserve.transfer.protocol import (Cancel, CancelAck, Handshake, HandshakeAccept,
                                       HandshakeReject, KVDest, LayoutSpec, PoolInfo,
                                       TransferComplete, TransferMetrics, check_compatible, encode)
from pdserve.transfer.pools import PoolSet, StagedWriter
from pdserve.transfer.runs import coalesce
from pdserve.transfer.tp_map import Route, plan_routes

log = logging.getLogger(__name__)
S = TransferState


@dataclass
class _Send(TransferRecord):
    dst_pages: list[int] | None = None
    dp_group: int = 0                     # the decode node's DP attention group holding the pages
    staged_backlog: list[tuple[list[int], int]] = field(default_factory=list)  # waiting for staging
    queued: list[tuple[list[int], int]] = field(default_factory=list)   # writes before DestReady
    inflight: list[WriteHandle] = field(default_factory=list)
    payload: bytes | None = None          # set by finish()
    metrics: TransferMetrics | None = None
    busy_since: float | None = None       # perf_counter when in-flight went 0 -> 1
    first_post: float | None = None
    tell_peer: bool = False               # send Cancel to decode once drained (we stopped it)
    ack_peer: bool = False                # send CancelAck to decode once drained (it stopped it)
    claimed: bool = False                 # the prefill side knows it (expect / write / finish)
    forgotten: bool = False               # forget() called: no events, dropped once terminal


class KVSender:
    def __init__(self, pool: KVPool | PoolSet, fingerprint: str, cfg: TransferConfig, host: str, *,
                 xfer_mode: str = "prepped", capture_telemetry: bool = False,
                 metrics_capacity: int = 1024, staging_nbytes: int = 64 << 20) -> None:
        """``pool``: the node's pools (every rank's, ``PoolSet``) or one pool; ``staging_nbytes``:
        the relayout buffer for decode nodes that split heads differently (``tp_map``)."""
        self.pools = pool if isinstance(pool, PoolSet) else PoolSet.single(pool)
        self.pool, self.cfg = self.pools.ranks[0].pool, cfg
        self.xfer_mode = xfer_mode            # "prepped" | "descs" (see nixl_backend)
        self._nixl = NixlAgent(agent_name("prefill"), [p.buffer for p in self.pools.pools],
                               [p.layout.page_nbytes for p in self.pools.pools], capture_telemetry=capture_telemetry)
        self.agent_name = self._nixl.name
        self._me = Handshake(pool=pool_info(self._nixl, self.pools), agent_metadata=b"",
                             layout=LayoutSpec.of(self.pools.layout, self.pools.total_kv_heads),
                             fingerprint=fingerprint)
        self._staged = StagedWriter(self.pools, staging_nbytes)
        self._routes: dict[tuple[str, int], list[Route]] = {}   # (decode agent, dp group) -> routes
        self._channel = BootstrapChannel(host, cfg.bootstrap_port, self.agent_name,
                                         heartbeat_interval_s=cfg.heartbeat_interval_s,
                                         peer_timeout_s=cfg.peer_timeout_s)
        self.bootstrap_endpoint = self._channel.endpoint
        self._peers: dict[str, PoolInfo] = {}                 # accepted decode agents
        self._transfers: dict[str, _Send] = {}
        self._events: list[SenderEvent] = []
        self.metrics_ring = MetricsRing(metrics_capacity)

    # -- scheduler API ------------------------------------------------------------------------
    def expect(self, transfer_id: str) -> None:
        """Optional: the prefill request for ``transfer_id`` is here (writes may precede DestReady)."""
        old = self._transfers.get(transfer_id)
        if old is not None and not old.state.is_terminal:
            if old.claimed or old.forgotten:
                raise TransferError(f"transfer {transfer_id} is already live ({old.state.value})")
            old.claimed = True                  # its KVDest came first
            return
        self._transfers[transfer_id] = self._new(transfer_id, S.WAITING_DEST, claimed=True)

    def write(self, transfer_id: str, src_pages: list[int], dst_index: int, *,
              ready_event: "torch.cuda.Event | None" = None) -> bool:
        """Write local ``src_pages`` to ``dst_page_ids[dst_index : dst_index + len]`` (non-blocking).

        On CUDA the pages' KV must be complete before NIXL reads them (its copies run on their own
        stream): this waits for ``ready_event`` (recorded after the chunk's forward) or, without
        one, for the current stream. False if the transfer is no longer live: stop prefilling it.
        """
        rec = self._get(transfer_id)
        if rec.state not in (S.WAITING_DEST, S.TRANSFERRING):
            return False
        if rec.payload is not None:
            raise TransferError(f"transfer {transfer_id}: write() after finish()")
        rec.claimed = True
        bad = [p for p in src_pages if not 0 <= p < self.pool.num_pages]
        if bad or dst_index < 0:
            raise TransferError(f"transfer {transfer_id}: bad source pages {bad} / dst_index {dst_index}")
        if rec.dst_pages is not None and dst_index + len(src_pages) > len(rec.dst_pages):
            raise TransferError(f"transfer {transfer_id}: pages {dst_index}..{dst_index + len(src_pages)} "
                                f"beyond the {len(rec.dst_pages)} decode pages")
        if self.pool.device.type == "cuda":
            (ready_event or torch.cuda.current_stream(self.pool.device)).synchronize()
        if rec.dst_pages is None:
            rec.queued.append((list(src_pages), dst_index))
        else:
            self._post(rec, list(src_pages), dst_index)
        return True

    def finish(self, transfer_id: str, payload: bytes) -> bool:
        """After the writes complete, decode gets ``payload`` (TransferDone). False if not live."""
        rec = self._get(transfer_id)
        if rec.state not in (S.WAITING_DEST, S.TRANSFERRING):
            return False
        if rec.payload is not None:
            raise TransferError(f"transfer {transfer_id}: finish() called twice")
        rec.payload = bytes(payload)
        rec.claimed = True
        self._progress(rec)
        return True

    def abort(self, transfer_id: str, reason: str = "aborted by prefill") -> None:
        """Stop; decode is told once in-flight writes drain; TransferCancelled follows.

        Aborting a transfer whose KVDest has not come yet leaves a tombstone, so a late KVDest is
        answered with Cancel at once (decode frees its pages instead of waiting for a timeout).
        """
        rec = self._transfers.get(transfer_id)
        if rec is None:
            rec = self._transfers[transfer_id] = self._new(transfer_id, S.WAITING_DEST, claimed=True)
        if rec.state in (S.WAITING_DEST, S.TRANSFERRING):
            self._stop(rec, reason, tell_peer=True)

    def state(self, transfer_id: str) -> TransferState:
        return self._get(transfer_id).state

    def metrics(self, transfer_id: str) -> TransferMetrics | None:
        """Bytes, descriptors, busy ms, GB/s so far; None for an unknown (or forgotten) transfer."""
        rec = self._transfers.get(transfer_id)
        return None if rec is None or rec.forgotten else rec.metrics

    def forget(self, transfer_id: str) -> None:
        """Drop the record; a live transfer is aborted quietly (no more events for it)."""
        rec = self._transfers.get(transfer_id)
        if rec is None:
            return
        rec.forgotten = True                 # kept (invisibly) until drained + expired
        if rec.state in (S.WAITING_DEST, S.TRANSFERRING):
            self._stop(rec, "forgotten by prefill", tell_peer=True)

    def poll(self) -> list[SenderEvent]:
        for peer, msg in self._channel.recv():
            self._on_message(peer, msg)
        for rec in list(self._transfers.values()):
            if not rec.state.is_terminal:
                self._progress(rec)
        self._expire(time.monotonic())
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        for rec in self._transfers.values():
            for h in rec.inflight:
                self._release(h)
            rec.inflight.clear()
        self._channel.close()
        self._nixl.close()

    # -- internals ----------------------------------------------------------------------------
    def _get(self, transfer_id: str) -> _Send:
        rec = self._transfers.get(transfer_id)
        if rec is None or rec.forgotten:
            raise TransferError(f"unknown transfer {transfer_id} (no KVDest and no expect() yet)")
        return rec

    def _new(self, transfer_id: str, state: TransferState, *, claimed: bool) -> _Send:
        return _Send(transfer_id, peer="", state=state, claimed=claimed,
                     metrics=TransferMetrics(transfer_id=transfer_id))

    def _emit(self, rec: _Send, event: SenderEvent) -> None:
        if not rec.forgotten:
            self._events.append(event)

    def _bind_dest(self, rec: _Send, peer: str, pages: list[int]) -> None:
        rec.peer, rec.dst_pages = peer, pages
        rec.advance(S.TRANSFERRING)
        self._emit(rec, DestReady(rec.transfer_id, list(pages)))
        queued, rec.queued = rec.queued, []
        for src, dst_index in queued:
            if rec.state is S.TRANSFERRING:
                self._post(rec, src, dst_index)

    def _post(self, rec: _Send, src: list[int], dst_index: int) -> None:
        dst = rec.dst_pages[dst_index:dst_index + len(src)]
        if len(dst) != len(src):   # only queued writes get here unchecked: decode sent too few pages
            self._stop(rec, f"decode offered {len(rec.dst_pages)} pages, prefill wrote up to page "
                            f"{dst_index + len(src)}", tell_peer=True)
            return
        if not src:
            return
        routes = self._routes[(rec.peer, rec.dp_group)]
        peer = self._nixl.peer(rec.peer)
        direct = [(r.pieces[0].src_rank, peer.region_index(r.dst_rank)) for r in routes if r.is_direct]
        staged = [r for r in routes if not r.is_direct]
        try:
            rec.metrics.num_pages += len(src)
            if direct:
                self._track(rec, self._nixl.post_write(rec.peer, coalesce(src, dst), mode=self.xfer_mode,
                                                       pairs=direct))
            if staged:
                self._post_staged(rec, staged, src, dst_index)
        except (NixlError, ValueError) as exc:
            self._stop(rec, f"write failed: {exc}", tell_peer=True)

    def _post_staged(self, rec: _Send, routes: list[Route], src: list[int], dst_index: int) -> None:
        """Relayout through staging, in slices that fit it; what does not fit now waits in
        ``rec.queued`` (as a staged-only write) for earlier writes to free staging."""
        step = self._staged.max_pages(self._nixl.peer(rec.peer), routes)
        for start in range(0, len(src), step):
            part = src[start:start + step]
            h = self._staged.post(self._nixl, rec.peer, routes, part,
                                  rec.dst_pages[dst_index + start:dst_index + start + len(part)])
            if h is None:
                rec.staged_backlog.append((src[start:], dst_index + start))
                return
            self._track(rec, h)

    def _track(self, rec: _Send, h: WriteHandle) -> None:
        m = rec.metrics
        m.kv_bytes += h.kv_bytes
        m.num_descriptors += h.num_descriptors
        m.num_writes += 1
        m.setup_us += h.setup_us
        if rec.first_post is None:
            rec.first_post = h.posted_at
        if not rec.inflight:
            rec.busy_since = h.posted_at
        rec.inflight.append(h)

    def _reap(self, rec: _Send) -> str | None:
        """Collect finished writes; the NIXL error text if one failed."""
        error = None
        for h in list(rec.inflight):
            st = self._nixl.state(h)
            if st == "PROC":
                continue
            if st == "ERR":
                error = f"NIXL write to {h.peer} failed"
            elif (n := self._nixl.desc_count(h)) >= 0:
                rec.metrics.nixl_desc_count = max(rec.metrics.nixl_desc_count, 0) + n
            self._release(h)
            rec.inflight.remove(h)
        if not rec.inflight and rec.busy_since is not None:
            rec.metrics.busy_ms += (time.perf_counter() - rec.busy_since) * 1e3
            rec.busy_since = None
        return error

    def _release(self, h: WriteHandle) -> None:
        self._nixl.release(h.xfer)
        self._staged.release(h.staging)

    def _progress(self, rec: _Send) -> None:
        error = self._reap(rec) if rec.inflight else None
        if error and rec.state is S.TRANSFERRING:
            self._stop(rec, error, tell_peer=True)
        if rec.staged_backlog and rec.state is S.TRANSFERRING:
            backlog, rec.staged_backlog = rec.staged_backlog, []
            routes = [r for r in self._routes[(rec.peer, rec.dp_group)] if not r.is_direct]
            for i, (src, dst_index) in enumerate(backlog):
                self._post_staged(rec, routes, src, dst_index)
                if rec.staged_backlog:   # still full: keep the rest, in order
                    rec.staged_backlog += backlog[i + 1:]
                    break
        if rec.inflight:
            return
        if rec.state is S.CANCELLING:
            self._finish_cancel(rec)
        elif (rec.state is S.TRANSFERRING and rec.payload is not None and not rec.queued
              and not rec.staged_backlog):
            self._complete(rec)

    def _complete(self, rec: _Send) -> None:
        m = rec.metrics
        m.wall_ms = (time.perf_counter() - rec.first_post) * 1e3 if rec.first_post else 0.0
        msg = TransferComplete(transfer_id=rec.transfer_id, payload=rec.payload, metrics=m)
        try:
            self._nixl.send_notif(rec.peer, encode(msg))
        except NixlError as exc:
            self._fail_now(rec, f"completion not delivered: {exc}")
            return
        rec.advance(S.DONE)
        self.metrics_ring.add(m)
        self._emit(rec, TransferSent(rec.transfer_id, m))

    def _stop(self, rec: _Send, reason: str, *, tell_peer: bool = False, ack_peer: bool = False) -> None:
        rec.advance(S.CANCELLING, reason)
        rec.queued.clear()
        rec.staged_backlog.clear()
        rec.tell_peer, rec.ack_peer = tell_peer, ack_peer
        self._progress(rec)

    def _finish_cancel(self, rec: _Send) -> None:
        if rec.peer and rec.peer in self._peers:
            if rec.tell_peer:
                self._channel.send(rec.peer, Cancel(transfer_id=rec.transfer_id, reason=rec.reason))
            if rec.ack_peer:
                self._channel.send(rec.peer, CancelAck(transfer_id=rec.transfer_id))
        rec.advance(S.CANCELLED)
        self._emit(rec, TransferCancelled(rec.transfer_id, rec.reason))

    def _fail_now(self, rec: _Send, reason: str) -> None:
        """The peer is gone (or hung): drop in-flight writes without waiting for them."""
        for h in rec.inflight:
            self._release(h)
        rec.inflight.clear()
        rec.queued.clear()
        rec.staged_backlog.clear()
        rec.advance(S.FAILED, reason)
        self._emit(rec, TransferCancelled(rec.transfer_id, reason))

    # -- messages from decode nodes -----------------------------------------------------------
    def _on_message(self, peer: str, msg) -> None:
        if isinstance(msg, Handshake):
            self._on_handshake(peer, msg)
        elif isinstance(msg, KVDest):
            self._on_dest(peer, msg)
        elif isinstance(msg, Cancel):
            self._on_cancel(peer, msg)
        elif isinstance(msg, PeerLost):
            self._on_peer_lost(peer, f"decode peer {peer} silent for {msg.silent_s:.1f} s")
        elif not isinstance(msg, CancelAck):
            log.warning("unexpected %s from %s ignored", type(msg).__name__, peer)

    def _on_handshake(self, peer: str, hs: Handshake) -> None:
        reason = check_compatible(self._me, hs)
        if reason is None and hs.pool.agent_name != peer:
            reason = f"agent name mismatch: routing id {peer}, handshake {hs.pool.agent_name}"
        if reason is None:
            if peer in self._peers:       # the decode re-dialed: its old transfers are gone
                self._on_peer_lost(peer, f"decode peer {peer} handshook again")
            try:
                self._nixl.add_peer(PeerPool(agent_name=peer, metadata=hs.agent_metadata,
                                             num_pages=hs.pool.num_pages,
                                             mem_type="VRAM" if hs.pool.device_kind == "cuda" else "DRAM",
                                             regions=tuple(hs.pool.regions)))
                for group in hs.pool.dp_groups:   # mappable: check_compatible said so
                    self._routes[(peer, group)] = plan_routes(self._me.pool.regions, hs.pool.regions, group)
            except NixlError as exc:
                reason = f"NIXL could not load decode agent {peer}: {exc}"
        if reason is not None:
            log.warning("handshake from %s rejected: %s", peer, reason)
            self._channel.send(peer, HandshakeReject(reason=reason))
            self._channel.drop(peer)
            return
        self._peers[peer] = hs.pool
        self._channel.send(peer, HandshakeAccept(pool=self._me.pool))

    def _on_dest(self, peer: str, dest: KVDest) -> None:
        tid, pages = dest.transfer_id, dest.page_ids
        info = self._peers.get(peer)
        if info is None:
            # This node never accepted that decode: most likely we restarted at the same endpoint
            # and its DEALER reconnected silently. A reject makes it drop us and dial afresh.
            self._channel.send(peer, HandshakeReject(reason=f"prefill {self.agent_name} has no handshake "
                                                            f"from {peer} (restarted?)"))
            self._channel.drop(peer)
            return
        reason = None
        if any(not 0 <= p < info.num_pages for p in pages):
            reason = f"destination pages outside the decode pool of {info.num_pages} pages"
        elif (peer, dest.dp_group) not in self._routes:
            reason = f"decode has no DP attention group {dest.dp_group}"
        rec = self._transfers.get(tid)
        if reason is None and rec is not None and rec.state is not S.WAITING_DEST:
            reason = f"transfer {tid} already {rec.state.value} on this prefill node"
        if reason is not None:
            self._channel.send(peer, Cancel(transfer_id=tid, reason=reason))
            return
        if rec is None:                               # ahead of (or without) the PrefillReq
            rec = self._transfers[tid] = self._new(tid, S.WAITING_DEST, claimed=False)
        rec.dp_group = dest.dp_group
        self._bind_dest(rec, peer, pages)

    def _on_cancel(self, peer: str, msg: Cancel) -> None:
        rec = self._transfers.get(msg.transfer_id)
        if rec is not None and rec.peer in ("", peer) and rec.state in (S.WAITING_DEST, S.TRANSFERRING):
            rec.peer = peer
            self._stop(rec, f"cancelled by decode: {msg.reason}", ack_peer=True)
        elif rec is not None and rec.peer == peer and rec.state is S.CANCELLING:
            rec.ack_peer = True           # already stopping: ack once its writes drained
        else:   # nothing in flight for it here: the decode may reuse its pages now
            self._channel.send(peer, CancelAck(transfer_id=msg.transfer_id))

    def _on_peer_lost(self, peer: str, reason: str) -> None:
        for rec in self._transfers.values():
            if rec.peer == peer and not rec.state.is_terminal:
                self._fail_now(rec, reason)
        if self._peers.pop(peer, None) is not None:
            self._nixl.remove_peer(peer)
        for key in [k for k in self._routes if k[0] == peer]:
            del self._routes[key]

    def _expire(self, now: float) -> None:
        limit = self.cfg.transfer_timeout_s
        for tid, rec in list(self._transfers.items()):
            age = rec.age_s(now)
            if rec.state in (S.WAITING_DEST, S.TRANSFERRING) and age > limit:
                if not rec.claimed:
                    reason = f"prefill request for {tid} did not arrive within {limit:g} s"
                elif rec.state is S.WAITING_DEST:
                    reason = f"timed out: no destination pages from decode after {limit:g} s"
                else:
                    reason = f"timed out: not finished after {limit:g} s"
                self._stop(rec, reason, tell_peer=True)
            elif rec.state is S.CANCELLING and age > limit + self.cfg.peer_timeout_s:
                self._fail_now(rec, f"{rec.reason} (writes did not drain)")
            elif rec.state.is_terminal and now - rec.ended_at > limit:
                del self._transfers[tid]     # kept a while to answer late KVDests; then no leak
